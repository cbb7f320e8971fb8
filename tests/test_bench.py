"""bench/step_time.py runs and reports every configuration (a smoke run, not a timing)."""

import subprocess
import sys

from helpers import ROOT


def test_step_time_bench_smoke():
    res = subprocess.run([sys.executable, "bench/step_time.py", "--tiny", "--rounds", "1",
                          "--presets", "lora,tl6", "--ranks", "8", "--no-full"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split()[0] + " " + line.split()[1]: line for line in res.stdout.splitlines()
            if line.startswith(("lora", "tl6"))}
    assert set(rows) == {"lora r=8", "tl6 r=8"}
    assert "floor" in res.stdout and "÷ floor" in res.stdout
