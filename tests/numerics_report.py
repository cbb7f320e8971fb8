"""Tabulate the comparisons logged by tests/numerics.py (``TIEDLORA_NUMERICS_LOG``).

    python tests/numerics_report.py LOG.jsonl [LOG2.jsonl ...]

Prints, per test file and setting (CPU capability, threads), the number of comparisons,
the largest error/bound ratio and the comparison it came from. A ratio <= 1 passes.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(paths) -> int:
    worst = defaultdict(lambda: (0, -1.0, ""))
    settings = set()
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                group = r["test"].split("::")[0].rsplit("/", 1)[-1].removesuffix(".py") or "?"
                setting = f"{r['capability'].lower()}, threads={r['threads']}"
                settings.add(setting)
                n, ratio, what = worst[group, setting]
                worst[group, setting] = (n + 1, max(ratio, r["ratio"]), r["what"] if r["ratio"] > ratio else what)
    if not worst:
        print("no comparisons logged")
        return 1
    print(f"{'test file':<28} {'setting':<22} {'compared':>8} {'max err/bound':>13}  worst")
    for (group, setting), (n, ratio, what) in sorted(worst.items()):
        print(f"{group:<28} {setting:<22} {n:>8} {ratio:>13.3g}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
