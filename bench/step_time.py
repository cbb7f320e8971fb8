"""Adapter step time relative to the frozen-base floor, measured side by side in one run.

    python bench/step_time.py                      # 134M LLaMA-style model, CPU
    python bench/step_time.py --tiny --rounds 2    # seconds; a smoke run
    python bench/step_time.py --presets lora,tl6 --ranks 8,128 --targets linear_qkv
    python bench/step_time.py --seq 1024 --batch 1 --presets tl6 --ranks 8 --no-full

The *floor* is what every adapter method pays: a forward and backward pass through the
frozen base (activation gradients all the way down, no weight gradients). Each preset's
training step (forward, backward, AdamW over its adapter tensors) is divided by it; a full
fine-tuning step is printed for scale. Configurations are interleaved round by round and
the median of each is reported, so machine noise hits all of them alike.

Targets (docs/design.md, 'Performance targets'; r=8 / r=128, QKV): every tied preset
≤ 1.03× / ≤ 1.06× the floor. ``bench/vs_peft.py`` adds Hugging Face's floor and PEFT.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiedlora.config import compose, to_object  # noqa: E402
from tiedlora.dist import init_distributed, set_seed, shutdown  # noqa: E402
from tiedlora.config import ModelConfig, ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402
from tiedlora.peft import adapter_parameters, apply_peft  # noqa: E402

LLAMA_134M = dict(name="llama_134m", num_layers=12, hidden_size=768, ffn_hidden_size=2048,
                  num_attention_heads=12, vocab_size=32000, seq_length=256, normalization="RMSNorm")
TINY = dict(name="tiny", num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
            vocab_size=512, seq_length=64)


def make_step(kind: str, model_cfg: ModelConfig, peft_name: str | None, rank: int, targets: str,
              batch: int, seq: int):
    """A closure running one training step of the given kind; built once, timed many times."""
    set_seed(0)
    model = build_gpt_model(model_cfg)
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    if kind == "full":
        params = list(model.parameters())
    elif kind == "floor":
        params = freeze_to_floor(model)
    else:
        cfg = to_object(compose("params", [f"peft={peft_name}", f"peft.rank={rank}",
                                           f"peft.target_modules=[{targets}]"])).peft
        apply_peft(model, cfg)
        params = list(adapter_parameters(model).values())
    return training_step(model, params, x, pos, y)


def freeze_to_floor(model) -> list:
    """Freeze every weight for the frozen-base floor; returns the (empty) trainable list.

    The embedding output becomes a leaf that needs a gradient, so the backward pass still runs
    through every layer (activation gradients) without any weight gradient."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.embedding.register_forward_hook(lambda m, i, o: o.detach().requires_grad_(True))
    return []


def training_step(model, params: list, x, pos, y):
    """(one AdamW training step over ``params`` as a closure, number of trainable values)."""
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(x, pos, None, labels=y).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke run)")
    ap.add_argument("--presets", default="lora,vera,tl3,tl6")
    ap.add_argument("--ranks", default="8,128")
    ap.add_argument("--targets", default="linear_qkv")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's, 256 / 64 tiny)")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning reference")
    args = ap.parse_args()

    base = dict(TINY if args.tiny else LLAMA_134M)
    if args.seq:
        base["seq_length"] = args.seq
    model_cfg = ModelConfig(**base)
    seq = model_cfg.seq_length
    init_distributed(ParallelConfig(), seed=0)
    configs = [("floor", None, 0)] + ([] if args.no_full else [("full", None, 0)])
    configs += [("adapter", p, int(r)) for r in args.ranks.split(",") for p in args.presets.split(",")]
    steps, sizes = {}, {}
    for kind, name, r in configs:
        key = kind if name is None else f"{name} r={r}"
        steps[key], sizes[key] = make_step(kind, model_cfg, name, r, args.targets, args.batch, seq)
        steps[key]()  # warm-up (allocations, first-call overheads)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["floor"]
    print(f"model={model_cfg.name} ({torch.get_num_threads()} threads) "
          f"batch={args.batch} seq={seq} targets={args.targets} rounds={args.rounds}")
    print(f"{'configuration':<16}{'trainable':>14}{'step ms':>10}{'÷ floor':>9}{'÷ LoRA':>8}")
    for k in steps:
        lora_key = f"lora r={k.split('r=')[1]}" if "r=" in k else None
        vs_lora = f"{med[k] / med[lora_key]:.3f}" if lora_key in med else "-"
        print(f"{k:<16}{sizes[k]:>14,}{1000 * med[k]:>10.1f}{med[k] / floor:>9.3f}{vs_lora:>8}")
    shutdown()


if __name__ == "__main__":
    from tiedlora import compat

    compat.install()  # once, at process start
    main()
