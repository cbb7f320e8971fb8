"""Worker: loss and gathered adapter gradients of a tiny GPTModel, all four targets.

Run under torchrun with 1 process (reference) or 2 (TP=2, with and without sequence
parallel). Rank 0 saves {"<preset>/sp<0|1>": {"loss": ..., "grads": {...}}} to argv[1].
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ALL_TARGETS, batch, build, perturb, preset, targets_override, tiny_model_cfg  # noqa: E402

from tiedlora.dist import init_distributed, set_seed, shutdown  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.peft import adapter_state_dict, finalize_adapter_grads  # noqa: E402

PRESETS = ["lora", "vera", "tl6", "tl3"]


def main(out: str) -> None:
    world = int(__import__("os").environ["WORLD_SIZE"])
    init_distributed(ParallelConfig(tp=world), seed=7)
    results = {}
    for sp in ([False, True] if world > 1 else [False]):
        parallel = ParallelConfig(tp=world, sp=sp)
        for name in PRESETS:
            set_seed(7)
            model = build(preset(name, target_modules=targets_override(ALL_TARGETS), alpha=16),
                          tiny_model_cfg(), parallel)
            perturb(model, seed=11)
            ids, pos, labels = batch(s=16)
            loss = model(ids, pos, None, labels=labels).mean()
            loss.backward()
            finalize_adapter_grads(model)
            grads = adapter_state_dict(model, grads=True)
            results[f"{name}/sp{int(sp)}"] = {"loss": loss.detach().clone(), "grads": grads}
    if dist.get_rank() == 0:
        torch.save(results, out)
    shutdown()


if __name__ == "__main__":
    from tiedlora import compat

    compat.install()  # once, at process start
    main(sys.argv[1])
