"""Comparison table of fine-tuning results (``results.json`` files).

    python -m tiedlora.report outputs/            # every results.json below a folder
    python -m tiedlora.report outputs/ --json     # the rows as JSON

A Hydra multirun of ``tiedlora.finetune`` prints the same table when it ends.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, List


def load_results(paths: Iterable[str | Path]) -> List[dict]:
    """The ``results.json`` files given, or found below the folders given (a missing path or
    a file that is not one JSON object raises ``FileNotFoundError``/``ValueError`` naming it)."""
    rows = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory (give results.json files or run folders)")
        files = [p] if p.is_file() else sorted(p.rglob("results.json"))
        for f in files:
            try:
                r = json.loads(f.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{f}: not a results.json file ({e})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{f}: expected one JSON object, got {type(r).__name__}")
            r["_path"] = str(f.parent)
            rows.append(r)
    return rows


def _main_metric(m: dict | None):
    if not m:
        return None, None
    k = next(iter(m))
    return k, m[k]


def render(rows: List[dict]) -> str:
    if not rows:
        return "no results.json found"
    head = ["task", "model", "preset", "rank", "trainable", "% of LoRA", "metric", "before", "after",
            "steps", "wall s"]
    body = []
    for r in sorted(rows, key=lambda r: (r.get("task", ""), r.get("model", ""), r.get("rank", 0), r.get("preset", ""))):
        k, after = _main_metric(r.get("metrics"))
        _, before = _main_metric(r.get("metrics_before"))
        body.append([r.get("task", "?"), r.get("model", "?"), r.get("preset", "?"), str(r.get("rank", "?")),
                     f"{r.get('trainable_params', 0):,}", f"{100 * r.get('share_of_lora', 0):.1f}",
                     k or "-", "-" if before is None else f"{before:.1f}",
                     "-" if after is None else f"{after:.1f}", str(r.get("steps", "-")),
                     f"{r.get('wall_time_s', 0):.0f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = load_results(args or ["outputs"])
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=2))
    else:
        print(render(rows))


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
