"""Worker: Tied-LoRA training under PP=2, PP=2xVPP=2, DP=2 and TP=2+SP (2 processes, gloo).

argv: <out.pt> <base.safetensors> <scratch dir>. For every layout and preset (lora, vera,
tl6; all four targets) it runs the loop of tests/dist/parallel_train.py; rank 0 saves::

    run/<layout>/<preset>            losses, grad norms, gradients, adapter tensors (initial
                                     and final), optimizer moments, tied-copy spread, ...
    batch_p2p_comm/<layout>          the megatron config value the schedule ran with
    xload/<src>-><dst>               the tl6 checkpoint (adapter file + optimizer moments)
                                     saved under <src>, loaded under <dst> and gathered
                                     again; and the forward-only loss of the step-0 batch
                                     under <dst> (evaluation)

Compared against the single-process reference by tests/test_parallel_layouts.py.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel_train as pt  # noqa: E402

from tiedlora import checkpoint as ckpt  # noqa: E402
from tiedlora.dist import init_distributed, shutdown  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.peft import adapter_state_dict, load_adapter_state_dict  # noqa: E402
from tiedlora.checkpoint import load_training_state_tensors, training_state_tensors  # noqa: E402
from tiedlora.peft.model import trainable_params  # noqa: E402
from tiedlora.training import build_optimizer  # noqa: E402

LAYOUTS = {
    "pp2": ParallelConfig(pp=2),
    "pp2_vpp2": ParallelConfig(pp=2, vpp=2),
    "dp2": ParallelConfig(),
    "tp2_sp": ParallelConfig(tp=2, sp=True),
}
# (saved under, loaded under): PP=2 <-> TP=2(+SP), interleaved PP <-> DP
XLOAD = [("pp2", "tp2_sp"), ("tp2_sp", "pp2"), ("pp2_vpp2", "dp2"), ("dp2", "pp2_vpp2")]


def main(out: str, base_path: str, scratch: str) -> None:
    base = load_file(base_path)
    scratch = Path(scratch)
    results = {}
    for lname, par in LAYOUTS.items():
        init_distributed(par, seed=pt.SEED)
        for name in pt.PRESETS:
            res, chunks, _ = pt.train(par, name, base)
            results[f"run/{lname}/{name}"] = res
            if name == "tl6":  # checkpoint written the way finetune does (rank 0, safetensors)
                if dist.get_rank() == 0:
                    ckpt.save_adapter(scratch / f"{lname}.adapter.safetensors", res["final"],
                                      pt.peft_cfg(name), {"layout": lname})
                    save_file({k: v.contiguous() for k, v in res["train_state"].items()},
                              str(scratch / f"{lname}.state.safetensors"))
        results[f"batch_p2p_comm/{lname}"] = bool(chunks[0].config.batch_p2p_comm)
        dist.barrier()

    for src, dst in XLOAD:
        init_distributed(LAYOUTS[dst], seed=pt.SEED)
        tensors, saved_cfg, meta = ckpt.load_adapter(scratch / f"{src}.adapter.safetensors")
        assert json.loads(meta["model"])["layout"] == src
        chunks = pt.build(LAYOUTS[dst], saved_cfg.name, base)
        load_adapter_state_dict(chunks, tensors)
        optimizer = build_optimizer(trainable_params(chunks), pt.OPTIM)
        load_training_state_tensors(chunks, optimizer, load_file(str(scratch / f"{src}.state.safetensors")))
        state = training_state_tensors(chunks, optimizer)
        results[f"xload/{src}->{dst}"] = {
            "adapter": adapter_state_dict(chunks),
            "train_state": {k: v for k, v in state.items() if k.startswith("optim.")},
            "eval_loss": pt.eval_loss(chunks),
        }

    if dist.get_rank() == 0:
        torch.save(results, out)
    shutdown()


if __name__ == "__main__":
    from tiedlora import compat

    compat.install()  # once, at process start
    main(*sys.argv[1:4])
