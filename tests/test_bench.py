"""bench/step_time.py, bench/adapter_ops.py, bench/vs_peft.py, bench/eval_speed.py and
bench/packing.py run and report every configuration (smoke runs, not timings). Each starts
fresh processes (torch and megatron imports): marked slow, run by .ci/run (make test-slow)."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def test_step_time_bench_smoke():
    res = subprocess.run([sys.executable, "bench/step_time.py", "--tiny", "--rounds", "1",
                          "--presets", "lora,tl6", "--ranks", "8", "--no-full", "--seq", "32", "--batch", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split()[0] + " " + line.split()[1]: line for line in res.stdout.splitlines()
            if line.startswith(("lora", "tl6"))}
    assert set(rows) == {"lora r=8", "tl6 r=8"}
    assert "floor" in res.stdout and "÷ floor" in res.stdout
    assert "batch=2 seq=32 " in res.stdout, res.stdout


def test_adapter_ops_bench_smoke():
    """Every preset × rank × variant row, and the floor share; the script itself refuses to
    time variants whose outputs or gradients differ (checked before timing)."""
    res = subprocess.run([sys.executable, "bench/adapter_ops.py", "--tiny", "--rounds", "1", "--ranks", "4,16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith(("tl6", "vera"))]
    assert {(r[0], r[1], " ".join(r[2:-3])) for r in rows} == {
        (p, r, v) for p in ("tl6", "vera") for r in ("4", "16") for v in ("plain", "u on h", "tiedlora")}
    assert all(float(r[-1]) > 0 for r in rows)  # × L ÷ floor
    assert "floor step (whole model, seq 64, batch 1)" in res.stdout


def test_vs_peft_bench_smoke(tmp_path):
    out = tmp_path / "vs_peft.json"
    res = subprocess.run([sys.executable, "bench/vs_peft.py", "--tiny", "--methods", "hf-lora,tl6",
                          "--ranks", "8", "--seqs", "32", "--rounds", "2", "--steps", "1", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split()[0] + " " + line.split()[1] for line in res.stdout.splitlines()
            if line.startswith(("hf-lora", "tl6"))}
    assert rows == {"hf-lora r=8", "tl6 r=8"}
    assert "÷ HF floor" in res.stdout and "targets" in res.stdout
    runs = json.loads(out.read_text())["32"]["runs"]
    assert set(runs) == {"hf-floor", "ours-floor", "hf-lora r=8", "tl6 r=8"}
    assert runs["tl6 r=8"]["trainable"] > 0 and runs["hf-floor"]["trainable"] == 0
    assert all(len(r["times"]) == 2 and r["step_s"] > 0 for r in runs.values())  # 2 rounds × 1 step
    assert all(r["peak_rss_gb"] > 0.1 for r in runs.values())  # each from its own process


def test_eval_speed_bench_smoke(tmp_path):
    """bench/eval_speed.py on a 2-layer model: every configuration timed, both sides agree
    on the tokens and on the picked choices, targets printed (timings mean nothing here)."""
    out = tmp_path / "eval_speed.json"
    res = subprocess.run([sys.executable, "bench/eval_speed.py", "--tiny", "--rounds", "1", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["decode"]["median"]) == {"ours", "ours before", "HF sorted", "HF as given"}
    assert set(r["choice"]["median"]) == {"ours", "one per pass"}
    assert "identical outputs, ours vs HF sorted: 100%" in res.stdout
    assert "same choice picked: 100%" in res.stdout and "targets" in res.stdout


@pytest.mark.parametrize("memory", [False, True])
def test_packing_bench_smoke(tmp_path, memory):
    """bench/packing.py on a 2-layer model: the four configurations and their padding; with
    the peak-memory comparison, each configuration's step in its own process."""
    out = tmp_path / "packing.json"
    res = subprocess.run([sys.executable, "bench/packing.py", "--tiny", "--rounds", "1", "--json", str(out)]
                         + ([] if memory else ["--no-memory"]), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["configs"]) == {"unpacked", "unpacked, PP", "packed", "packed, PP"}
    pad = {k: v["padding"] for k, v in r["configs"].items()}
    assert pad["packed"] < pad["unpacked"] <= pad["unpacked, PP"] and pad["packed"] < pad["packed, PP"]
    assert "targets" in res.stdout
    if memory:
        assert set(r["peak_gb"]) == {"unpacked", "packed"} and all(v > 0 for v in r["peak_gb"].values())
