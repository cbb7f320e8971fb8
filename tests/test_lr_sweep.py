"""``+sweep=lr`` (tiedlora/launch/lr_sweep.py) on the tiny base, as a user runs it: real fine-tunes in
a Hydra multirun, round after round, each round's rates asked of tiedlora.lr_bracket from the
results.json files the round wrote. The rule's every branch is in tests/test_lr_bracket.py."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT, tiny_base_args
from tiedlora.lr_bracket import decide, outcome_of

TINY_TASK = ["task=mini_qa", "task.num_train=32", "task.num_validation=8", "task.num_test=8",
             "task.max_length=64", "task.max_new_tokens=4"]
QUICK = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=4",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "eval.before=false", "eval.after=false",
         "optim.warmup_steps=1", "checkpoint.every_n_steps=0", "peft=tl6"]


def sweep(env, tmp_path, *args):
    cmd = [sys.executable, "-m", "tiedlora.finetune", "-m", "+sweep=lr", *tiny_base_args(env), *TINY_TASK, *QUICK,
           f"hydra.sweep.dir={tmp_path}/multirun", f"output_dir={tmp_path}/runs/lr${{optim.lr}}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=900)


def test_a_choice_without_a_tried_rate_beside_it_is_refused(tiny_base, tmp_path):
    res = sweep(tiny_base, tmp_path, "optim.lr=1e-2", "hydra.sweeper.max_rounds=1")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "learning-rate choice(s) without a tried rate on both sides" in res.stderr, res.stderr[-3000:]
    assert "EDGE: hydra.sweeper.max_rounds=1 reached; it still asked for 0.003, 0.03" in res.stdout, res.stdout
    doc = json.loads((tmp_path / "multirun" / "lr_bracket.json").read_text())
    (only,) = doc.values()
    assert only["lr"] == 1e-2 and only["state"] == "edge" and only["tried"] == [1e-2]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["lr0.01"]


def test_rounds_widen_around_the_best_and_a_divergence_bounds_it(tiny_base, tmp_path):
    # 1e6 without clipping diverges at its second step (the first one's update is non-finite);
    # 1e-3 is then the best rate, with nothing tried below and 1e6 far above: round 2 asks for
    # 3e-4 and 3e-3, and later rounds go on from what those give
    res = sweep(tiny_base, tmp_path, "optim.lr=1e-3,1e6", "optim.grad_clip=0", "trainer.max_skipped_steps=1",
                "hydra.sweeper.max_rounds=3", "hydra.sweeper.allow_edge=true")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]  # a diverged rate is an outcome, not 4
    out = res.stdout
    assert "round 1: (run) at 0.001, 1e+06" in out and "round 2: (run) at 0.0003, 0.003" in out, out
    runs = {float(p.name[2:]): json.loads((p / "results.json").read_text()) for p in (tmp_path / "runs").iterdir()}
    assert runs[1e6]["status"] == "diverged" and {3e-4, 1e-3, 3e-3} <= set(runs)
    # the sweeper's choice is the rule's, applied to what the runs wrote
    expect = decide({lr: outcome_of(r) for lr, r in runs.items()})
    (got,) = json.loads((tmp_path / "multirun" / "lr_bracket.json").read_text()).values()
    assert got["lr"] == expect.chosen and got["tried"] == sorted(runs), (got, expect)
    assert got["state"] == ("bracketed" if expect.state == "bracketed" else "edge"), (got, expect)
    assert f"lr {expect.chosen:g} (val loss" in out
