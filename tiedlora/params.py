"""Parameter report: trainable adapter parameters of a preset on a base model.

The model is built on the *meta* device (no weights are allocated), the adapter config is
applied exactly as in training, and the trainable tensors are counted (tied factors once).
The count is checked against the formula computed from the preset's flags, and compared
with LoRA at the same rank and targets.

Usage::

    python -m tiedlora.params                                   # GPT-2B-001, TL6, r=8
    python -m tiedlora.params model=llama2_7b peft=vera peft.rank=32
    python -m tiedlora.params model=gpt2b_001 peft=tl6 peft.rank=8 format=json
    python -m tiedlora.params --all                             # every preset × r ∈ {2,8,32,128}
    python -m tiedlora.params --all format=json model=llama2_7b
"""

from __future__ import annotations

import sys
from typing import List

from tiedlora import compat
from tiedlora.config import ModelConfig, ParallelConfig, ParamsConfig, PeftConfig
from tiedlora.files import to_json


def count(model_cfg: ModelConfig, peft_cfg: PeftConfig) -> dict:
    """One report row. Builds the model on the meta device (needs parallel state)."""
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft.model import adapter_parameters, apply_peft

    model = build_gpt_model(model_cfg, ParallelConfig(), meta=True)
    apply_peft(model, peft_cfg)
    trainable = sum(p.numel() for p in adapter_parameters(model).values())
    base = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    shapes = {t: model_cfg.target_shape(t) for t in peft_cfg.target_modules}
    formula = peft_cfg.trainable_count(shapes, model_cfg.num_layers)
    lora = peft_cfg.lora_count(shapes, model_cfg.num_layers)
    return {
        "model": model_cfg.name,
        "preset": peft_cfg.name,
        "rank": peft_cfg.rank,
        "targets": list(peft_cfg.target_modules),
        "trainable": trainable,
        "formula": formula,
        "lora_trainable": lora,
        "share_of_lora": trainable / lora,
        "frozen_params": base,
    }


def preset_names() -> List[str]:
    from tiedlora.config import CONF_DIR

    names = sorted(p.stem for p in (CONF_DIR / "peft").glob("*.yaml"))
    order = {"lora": 0, "vera": 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


def rows_for(cfg: ParamsConfig, overrides: List[str]) -> List[dict]:
    """All rows the config asks for; ``--all`` composes each preset YAML at each rank."""
    if not cfg.all:
        return [count(cfg.model, cfg.peft)]
    from tiedlora.config import compose, to_object

    keep = [o for o in overrides if not o.split("=")[0].lstrip("+~") in ("peft", "peft.rank", "all")]
    rows = []
    for name in preset_names():
        for r in cfg.ranks:
            c = to_object(compose("params", keep + [f"peft={name}", f"peft.rank={r}"]))
            rows.append(count(c.model, c.peft))
    return rows


def render_table(rows: List[dict]) -> str:
    head = ["preset", "rank", "trainable", "formula", "LoRA (same r)", "share of LoRA"]
    body = [[r["preset"], str(r["rank"]), f"{r['trainable']:,}", f"{r['formula']:,}",
             f"{r['lora_trainable']:,}", f"{100 * r['share_of_lora']:.2f}%"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    first = rows[0]
    title = (f"model={first['model']}  targets={','.join(first['targets'])}  "
             f"frozen base parameters={first['frozen_params']:,}")
    lines = [title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    bad = [r for r in rows if r["trainable"] != r["formula"]]
    if bad:
        lines.append(f"WARNING: {len(bad)} row(s) where the counted parameters differ from the formula")
    return "\n".join(lines)


def main() -> None:
    """The command line (exits; a user's mistake ends with one message: tiedlora.cli)."""
    from tiedlora.cli import hydra_main
    from tiedlora.config import to_object
    from tiedlora.dist import init_distributed, shutdown

    # Friendly flags on top of Hydra overrides.
    sys.argv = [{"--all": "all=true", "--json": "format=json"}.get(a, a) for a in sys.argv]
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]

    @hydra_main("params")
    def _run(dcfg) -> None:
        cfg: ParamsConfig = to_object(dcfg)
        compat.install()  # CPU machines: megatron-core's CUDA-only calls go to the CPU
        init_distributed(ParallelConfig())
        try:
            rows = rows_for(cfg, overrides)
        finally:
            shutdown()
        if cfg.format == "json":
            print(to_json(rows if cfg.all else rows[0], indent=None if cfg.all else 2))
        else:
            print(render_table(rows))

    _run()


if __name__ == "__main__":
    main()
