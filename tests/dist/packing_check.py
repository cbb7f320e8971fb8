"""Worker: packed training under TP=2+SP, PP=2 and DP=2 (2 processes, gloo).

argv: <out.pt> <base.safetensors>. For every layout and preset (lora, vera, tl6; all four
targets) it runs the loop of tests/dist/parallel_train.py on the packed micro-batches of
``parallel_train.packed_batches`` (each rank packs the examples its share of the step
holds); rank 0 saves ``run/<layout>/<preset>`` (losses, grad norms, gradients, adapter
tensors, optimizer moments) and ``micro_batches/<layout>`` (how many packs rank 0 ran per
step). tests/test_packing.py compares them with unpacked training in one process.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel_train as pt  # noqa: E402

from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.dist import init_distributed, shutdown  # noqa: E402

LAYOUTS = {"tp2_sp": ParallelConfig(tp=2, sp=True), "pp2": ParallelConfig(pp=2), "dp2": ParallelConfig()}


def main(out: str, base_path: str) -> None:
    base = load_file(base_path)
    results = {}
    for lname, par in LAYOUTS.items():
        init_distributed(par, seed=pt.SEED)
        for name in pt.PRESETS:
            results[f"run/{lname}/{name}"] = pt.train(par, name, base, batches=pt.packed_batches)[0]
        results[f"micro_batches/{lname}"] = [len(pt.packed_batches(s)) for s in range(pt.STEPS)]
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, out)
    shutdown()


if __name__ == "__main__":
    from tiedlora import compat

    compat.install()  # once, at process start
    main(*sys.argv[1:3])
