"""The adapter's own arithmetic at a model's shapes, timed against the plain choices.

    python bench/adapter_ops.py                     # QKV of the 134M model, 1024 tokens, r = 8, 128
    python bench/adapter_ops.py --batch 4           # the floor at seq 256 × batch 4 instead
    python bench/adapter_ops.py --tokens 8192 --ranks 8 --no-floor
    python bench/adapter_ops.py --tiny --rounds 3   # seconds; a smoke run

Each timed call is the forward and backward of one adapted layer's adapter path: x
[tokens, d_in] (which needs a gradient, as every layer's input does in training) to
``base + ΔW x`` [tokens, d_out], for a preset whose factors are all trained (TL6) and one
with A and B frozen and u, v trained (VeRA). Three ways of computing the same thing:

    plain      s·u folded into A, v into B, ``torch.addmm`` for the add (autograd's backward)
    u on h     as plain, but s·u scales the r-wide ``A x`` instead of A
    tiedlora   the real ``TiedLoRAAdapter`` (u on h, then ``_AddLowRank``: the add in the base
               output's storage and dL/dh, dL/dB in the layouts fastest for a skinny r)

All are interleaved round by round; the median of each is printed with its ratio to plain.
Unless ``--no-floor``, the frozen-base floor step of the whole model (``bench/step_time.py``;
``--batch`` sequences of tokens ÷ batch) is timed in the same rounds, and ``× L ÷ floor`` is
the adapter's direct share of a training step: L layers' adapter time over the floor's
step. That is what ``step ÷ floor − 1`` estimates as a small difference of two large noisy
numbers. (Not in it: AdamW over the adapter tensors and adding the adapter's dL/dx to the
base's, each well under 1% of a layer's work.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import LLAMA_134M, TINY, make_step  # noqa: E402
from tiedlora.config import ModelConfig, ParallelConfig  # noqa: E402
from tiedlora.dist import init_distributed, shutdown  # noqa: E402
from tiedlora.peft.layer import TiedLoRAAdapter  # noqa: E402

PRESETS = {"tl6": dict(A=True, B=True, u=True, v=True), "vera": dict(A=False, B=False, u=True, v=True)}


def make_case(trainable: dict, tokens: int, d_in: int, d_out: int, r: int):
    """{variant: closure running one forward + backward}, over shared factors and inputs."""
    from megatron.core import parallel_state

    g = torch.Generator().manual_seed(r)
    A = nn.Parameter(torch.randn(r, d_in, generator=g) / d_in ** 0.5, requires_grad=trainable["A"])
    B = nn.Parameter(torch.randn(d_out, r, generator=g) / r ** 0.5, requires_grad=trainable["B"])
    u = nn.Parameter(1 + 0.1 * torch.randn(r, generator=g), requires_grad=trainable["u"])
    v = nn.Parameter(1 + 0.1 * torch.randn(d_out, generator=g), requires_grad=trainable["v"])
    x = torch.randn(tokens, 1, d_in, generator=g, requires_grad=True)
    base_out = torch.randn(tokens, 1, d_out, generator=g)
    grad = torch.randn(tokens, 1, d_out, generator=g)
    scale = 2.0
    adapter = TiedLoRAAdapter("column", "bench", 1, scale, 0.0,
                              parallel_state.get_tensor_model_parallel_group(), False)
    adapter.A, adapter.B, adapter.u, adapter.v = A, B, u, v

    def add_second_product(base, h):  # the previous arithmetic's add: v folded into B, addmm
        return torch.addmm(base.view(-1, d_out), h.view(-1, r), (B * v.unsqueeze(1)).t()).view(base.shape)

    def plain(base):
        return add_second_product(base, F.linear(x, A * (u * scale).unsqueeze(1)))

    def u_on_h(base):
        return add_second_product(base, F.linear(x, A) * (u * scale))

    def run(fn):
        def call():
            for p in (A, B, u, v, x):
                p.grad = None
            base = base_out.clone()  # fresh each call: tiedlora may add into it in place
            t0 = time.perf_counter()
            fn(base).backward(grad)
            return time.perf_counter() - t0
        return call

    variants = {"plain": plain, "u on h": u_on_h, "tiedlora": lambda base: adapter(x, base_out=base)}
    _check_same(variants, [t for t in (A, B, u, v, x) if t.requires_grad], base_out, grad, d_in + r + tokens)
    return {k: run(fn) for k, fn in variants.items()}


def _check_same(variants: dict, leaves: list, base_out, grad, terms: int) -> None:
    """Refuse to time variants that do not compute the same output and gradients: they may
    differ only by fp32 rounding of sums of at most ``terms`` terms (twice, for two evaluations)."""
    results = {}
    for k, fn in variants.items():
        out = fn(base_out.clone())
        results[k] = [out.detach()] + list(torch.autograd.grad(out, leaves, grad))
    for k, got in results.items():
        for i, (a, b) in enumerate(zip(got, results["plain"])):
            bound = 2 * terms * 2.0 ** -24 * b.abs().max()
            if (a - b).abs().max() > bound:
                raise SystemExit(f"adapter_ops: variant {k!r} differs from 'plain' in "
                                 f"{'the output' if i == 0 else f'gradient {i}'}: "
                                 f"{(a - b).abs().max():.3g} > {bound:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the 2-layer smoke model's shapes")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per call (default 1024; 64 with --tiny)")
    ap.add_argument("--batch", type=int, default=1, help="the floor's batch; its seq is tokens ÷ batch")
    ap.add_argument("--ranks", default="8,128")
    ap.add_argument("--rounds", type=int, default=15, help="timed calls per variant (the floor: the same)")
    ap.add_argument("--no-floor", action="store_true", help="skip the whole-model floor step")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be at least 1")

    base = dict(TINY if args.tiny else LLAMA_134M)
    tokens = args.tokens or (64 if args.tiny else 1024)
    if args.batch < 1 or tokens % args.batch:
        ap.error(f"--batch {args.batch}: must be at least 1 and divide the {tokens} tokens")
    seq = tokens // args.batch
    base["seq_length"] = seq
    cfg = ModelConfig(**base)
    d_in, d_out = cfg.hidden_size, cfg.qkv_width
    init_distributed(ParallelConfig(), seed=0)
    calls = {}
    for name, trainable in PRESETS.items():
        for r in (int(x) for x in args.ranks.split(",")):
            for variant, fn in make_case(trainable, tokens, d_in, d_out, r).items():
                calls[(name, r, variant)] = fn
    floor = None
    if not args.no_floor:
        print(f"building the {cfg.name} floor (seq {seq}, batch {args.batch}) ...", flush=True)
        step, _ = make_step("floor", cfg, None, 0, "linear_qkv", args.batch, seq)

        def floor():
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0
    for fn in calls.values():
        fn()  # warm-up
    if floor:
        floor()
    times = {k: [] for k in calls}
    floor_times = []
    for i in range(args.rounds):
        for k, fn in calls.items():
            times[k].append(fn())
        if floor:
            floor_times.append(floor())
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_s = statistics.median(floor_times) if floor else None
    print(f"adapter on {cfg.name} linear_qkv ({d_in} -> {d_out}), {tokens} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds")
    if floor:
        print(f"floor step (whole model, seq {seq}, batch {args.batch}): {1000 * floor_s:.1f} ms")
    print(f"{'preset':<8}{'r':>5}  {'variant':<10}{'ms':>9}{'÷ plain':>9}"
          + (f"{'× L ÷ floor':>13}" if floor else ""))
    for (name, r, variant), t in med.items():
        row = f"{name:<8}{r:>5}  {variant:<10}{1000 * t:>9.3f}{t / med[(name, r, 'plain')]:>9.3f}"
        if floor:
            row += f"{cfg.num_layers * t / floor_s:>13.4f}"
        print(row)
    shutdown()


if __name__ == "__main__":
    from tiedlora import compat

    compat.install()  # once, at process start
    main()
