"""launch/miniature_grid.py end to end on the one-node Slurm: the lr phase in bracketing rounds,
the rate chosen per (task, preset) on validation loss (rates.json), the grid at that rate (reusing
the lr phase's run), the report. The rule's every branch: tests/test_lr_bracket.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import FAST, TINY_TASK
from slurm_util import ROOT

pytestmark = pytest.mark.slurm


def test_miniature_grid_lr_phase_grid_and_report(tiny, tmp_path):
    root = tmp_path / "grid"
    # validation on (FAST turns it off): the rates are chosen on validation loss
    overrides = [*tiny["model"], *[a for a in TINY_TASK if not a.startswith("task=")], *FAST,
                 "trainer.max_steps=3", "trainer.val_check_interval=3"]
    args = ["launch/miniature_grid.py", "--root", str(root), "--tasks", "mini_qa", "--presets", "lora,tl6",
            "--ranks", "2,4", "--lr-rank", "4", "--seeds", "7,8", "--lrs", "3e-3,1e-2", "--max-rounds", "2",
            "--allow-edge", "--", *overrides]
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=tiny["env"], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = res.stdout
    assert "[3/3] report" in out and " lora: lr " in out and " tl6: lr " in out, out
    # round 1 ran both rates at rank 4, seed 7; round 2 (if any pair asked) one more rate per pair
    assert len(list((root / "lr" / "round1").glob("*/results.json"))) == 4
    rates = json.loads((root / "rates.json").read_text())["mini_qa"]
    for preset in ("lora", "tl6"):
        b = rates[preset]
        assert b["state"] in ("bracketed", "edge") and b["lr"] in b["tried"], rates
        assert (b["state"] == "bracketed") == (b["lower"] is not None and b["upper"] is not None), rates
        if b["tried"] != [3e-3, 1e-2]:  # widened: the new rate is one ladder step beyond round 1's
            assert set(b["tried"]) - {3e-3, 1e-2} <= {1e-3, 3e-2}, rates
            assert list((root / "lr" / "round2").glob("*/*/results.json")), rates
        # the grid ran the other rank at both seeds, and rank 4 only at the second seed (the first
        # is the lr phase's run), all at the chosen rate
        grid = [*(root / "grid" / f"mini_qa-{preset}").glob("*/config.yaml"),
                *(root / "grid" / f"mini_qa-{preset}-r4").glob("*/config.yaml")]
        assert len(grid) == 3
        assert {yaml_lr(p) for p in grid} == {b["lr"]}, (grid, rates)
    rows = list(csv.DictReader((root / "report" / "mini_qa__tiny.csv").open()))
    cells = {(r["preset"], r["rank"]): r for r in rows}
    assert set(cells) == {("lora", "2"), ("lora", "4"), ("tl6", "2"), ("tl6", "4")}, rows
    assert all(r["seeds"] == "2" and r["mean"] for r in rows), rows
    missing = list(csv.DictReader((root / "report" / "missing.csv").open()))
    assert missing == [], missing
    assert list((root / "report").glob("*.png"))
    # a rerun submits nothing again: every phase's sweep.json exists
    again = subprocess.run([sys.executable, *args], cwd=ROOT, env=tiny["env"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("submitted before, not again") >= 3, again.stdout


def yaml_lr(path):
    import yaml

    return float(yaml.safe_load(path.read_text())["optim"]["lr"])


def test_miniature_grid_refuses_to_choose_rates_without_validation(tiny, tmp_path):
    root = tmp_path / "grid"
    overrides = [*tiny["model"], *[a for a in TINY_TASK if not a.startswith("task=")], *FAST,
                 "trainer.max_steps=2"]
    res = subprocess.run([sys.executable, "launch/miniature_grid.py", "--root", str(root), "--tasks", "mini_qa",
                          "--presets", "lora", "--ranks", "4", "--lr-rank", "4", "--seeds", "7",
                          "--lrs", "1e-3", "--", *overrides],
                         cwd=ROOT, env=tiny["env"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "trainer.val_check_interval=0" in res.stderr and "1 runs with results" in res.stderr, res.stderr
    assert not (root / "grid").exists() and not (root / "report").exists()
