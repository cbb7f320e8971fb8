"""Start-up, timing, target lines and the JSON record shared by bench/eval_speed.py and bench/packing.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def start(device: str, threads: int) -> None:
    """Check the device, set CPU threads, install the CPU compatibility layer and start
    a single-process megatron parallel state (TP = PP = DP = 1)."""
    from tiedlora import compat
    from tiedlora.config import ParallelConfig
    from tiedlora.dist import init_distributed

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    if device == "cpu":
        torch.set_num_threads(threads)
    compat.install()
    init_distributed(ParallelConfig(), seed=1234)


def where(device: str, threads: int) -> str:
    """The device in words, for the header line."""
    return f"cpu, {threads} threads" if device == "cpu" else f"cuda, {torch.cuda.get_device_name()}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def finish(result: dict, targets: list, json_path) -> dict:
    """Print the target lines (``targets``: (what, value, bound, "le" | "ge")), add them to
    ``result``, write it to ``json_path`` when given, and end the parallel state."""
    import json

    from tiedlora.dist import shutdown

    print("\ntargets (✓ met, ✗ not met)")
    for what, value, bound, how in targets:
        ok = value <= bound if how == "le" else value >= bound
        print(f"  {what:<56}{value:8.3f} {'✓' if ok else '✗'}")
    result["targets"] = {what: value for what, value, _, _ in targets}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    shutdown()
    return result


def lognormal_lengths(n: int, mean: float, std: float, lo: int, hi: int, seed: int) -> list:
    """n integers from a log-normal with this mean and standard deviation, clipped to [lo, hi]."""
    s2 = np.log(1 + std ** 2 / mean ** 2)
    draw = np.random.default_rng(seed).lognormal(np.log(mean) - s2 / 2, np.sqrt(s2), n)
    return np.clip(draw.round(), lo, hi).astype(int).tolist()
