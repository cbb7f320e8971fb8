"""The learning-rate bracketing rule (tiedlora.lr_bracket) and the miniature grid's lr phase that
runs it in rounds (launch/miniature_grid.py), here with a fake submit that writes the results a
sweep would, from a known loss curve; the real end-to-end run is tests/slurm/test_miniature_grid.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tiedlora.lr_bracket import (DIVERGED, EdgeError, decide, give_up, ladder, mean_outcome, outcome_of,
                                 require_bracketed, step_down, step_up)

ROOT = Path(__file__).resolve().parents[1]


def test_ladder_is_one_and_three_per_decade_with_clean_values():
    assert ladder(1e-4, 1e-2) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert step_up(1e-2) == 3e-2 and step_up(3e-2) == 0.1 and step_down(1e-2) == 3e-3 and step_down(3e-3) == 1e-3
    assert step_up(5e-5) == 1e-4 and step_down(5e-5) == 3e-5  # off the ladder: its neighbours on it
    assert repr(step_up(1e-2)) == "0.03"


def test_best_at_the_top_asks_for_the_next_rate_up():
    b = decide({1e-3: 2.0, 3e-3: 1.8, 1e-2: 1.5})
    assert (b.chosen, b.state, b.next) == (1e-2, "widen", [3e-2])
    assert b.lower.lr == 3e-3 and b.lower.outcome == 1.8 and b.upper is None


def test_best_at_the_bottom_asks_for_the_next_rate_down():
    b = decide({1e-3: 1.2, 3e-3: 1.8})
    assert (b.chosen, b.state, b.next) == (1e-3, "widen", [3e-4])


def test_a_single_rate_asks_for_both_sides():
    assert decide({1e-3: 1.0}).next == [3e-4, 3e-3]


def test_a_tried_rate_on_both_sides_is_bracketed_and_reports_both_losses():
    b = decide({1e-3: 2.0, 3e-3: 1.4, 1e-2: 1.6})
    assert (b.chosen, b.state, b.next) == (3e-3, "bracketed", [])
    assert (b.lower.lr, b.lower.outcome, b.upper.lr, b.upper.outcome) == (1e-3, 2.0, 1e-2, 1.6)
    assert "3e-3" not in b.describe() and "lr 0.003 (val loss 1.4000)" in b.describe()
    assert b.as_json()["upper"] == {"lr": 1e-2, "val_loss": 1.6, "diverged": False}


def test_a_divergence_above_the_best_is_its_upper_bracket():
    b = decide({3e-3: 1.8, 1e-2: 1.5, 3e-2: DIVERGED})
    assert (b.chosen, b.state, b.upper.outcome) == (1e-2, "bracketed", DIVERGED)
    assert b.as_json()["upper"] == {"lr": 3e-2, "val_loss": None, "diverged": True}


def test_a_neighbour_more_than_one_step_away_asks_for_the_step_between():
    b = decide({1e-3: 1.2, 1e-1: DIVERGED})
    assert (b.chosen, b.state, b.next) == (1e-3, "widen", [3e-4, 3e-3])
    b = decide({1e-4: 1.5, 3e-4: 1.0, 3e-3: 1.1})
    assert (b.state, b.next) == ("widen", [1e-3])
    assert decide({5e-5: 1.3, 1e-4: 1.0, 2e-4: 1.1}).state == "bracketed"  # off the ladder, adjacent


def test_every_rate_diverged_steps_below_the_lowest():
    b = decide({1e-2: DIVERGED, 3e-2: DIVERGED})
    assert (b.chosen, b.state, b.next) == (None, "widen", [3e-3])


def test_the_rate_limits_make_an_edge_that_says_which():
    b = decide({0.3: 1.5, 0.1: 1.7}, max_lr=0.5)
    assert b.state == "edge" and b.chosen == 0.3 and "above the highest rate allowed (0.5)" in b.why
    b = decide({1e-6: 1.0, 3e-6: 2.0}, min_lr=1e-6)
    assert b.state == "edge" and "below the lowest rate allowed" in b.why
    b = decide({1e-6: DIVERGED}, min_lr=1e-6)
    assert b.state == "edge" and b.chosen is None and "every rate tried diverged" in b.why


def test_ties_choose_the_smaller_rate():
    assert decide({1e-3: 1.0, 3e-3: 1.0, 1e-2: 1.2}).chosen == 1e-3


def test_give_up_turns_an_unfinished_choice_into_an_edge_and_leaves_others():
    b = give_up(decide({1e-3: 2.0, 3e-3: 1.5}), "--max-rounds=1 reached")
    assert b.state == "edge" and "--max-rounds=1 reached" in b.why and "0.01" in b.why
    ok = decide({1e-3: 2.0, 3e-3: 1.4, 1e-2: 1.6})
    assert give_up(ok, "x") is ok


def test_require_bracketed_names_each_edge_unless_allowed():
    brackets = {"mini_sum tl6": decide({1e-3: 2.0, 3e-3: 1.5}), "mini_sum lora": decide({1e-3: 2, 3e-3: 1, 1e-2: 3})}
    with pytest.raises(EdgeError) as e:
        require_bracketed(brackets)
    msg = str(e.value)
    assert "1 learning-rate choice(s)" in msg and "mini_sum tl6" in msg and "lr 0.003" in msg
    assert "tried 0.001, 0.003" in msg and "mini_sum lora" not in msg and "--allow-edge" in msg
    require_bracketed(brackets, allow_edge=True)
    require_bracketed({"a": brackets["mini_sum lora"]})


def test_outcomes_from_results_json():
    assert outcome_of({"status": "diverged", "best_val_loss": 1.0}) == DIVERGED
    assert outcome_of({"best_val_loss": 1.25}) == 1.25
    assert outcome_of({"best_val_loss": None}) is None and outcome_of({}) is None
    assert outcome_of({"best_val_loss": math.inf}) == DIVERGED
    assert mean_outcome([1.0, 2.0]) == 1.5 and mean_outcome([1.0, DIVERGED]) == DIVERGED


# ------------------------------------------------------------------ the miniature grid's rounds
def _grid_module():
    spec = importlib.util.spec_from_file_location("miniature_grid", ROOT / "launch" / "miniature_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_sweeps(best: dict, diverge_above: dict):
    """submit/wait that write what a sweep's runs would: a val loss that is lowest at ``best[preset]``
    (a parabola in log rate), diverged above ``diverge_above[preset]``."""
    calls = []

    def submit(sweep_dir, overrides, dry_run):
        calls.append((sweep_dir, overrides))
        if dry_run or (Path(sweep_dir) / "sweep.json").is_file():
            return
        kv = dict(o.split("=", 1) for o in overrides)
        i = 0
        for task in kv["task"].split(","):
            for preset in kv["peft"].split(","):
                for lr in map(float, kv["optim.lr"].split(",")):
                    out = Path(sweep_dir) / str(i)
                    out.mkdir(parents=True)
                    i += 1
                    res = {"task": task, "preset": preset, "model": "mini", "rank": int(kv["peft.rank"])}
                    if lr > diverge_above.get(preset, math.inf):
                        res.update(status="diverged", best_val_loss=None)
                    else:
                        res["best_val_loss"] = 1.0 + (math.log10(lr) - math.log10(best[preset])) ** 2
                    (out / "results.json").write_text(json.dumps(res))
                    (out / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}, "trainer": {"seed": 7}}))
        (Path(sweep_dir) / "sweep.json").write_text("{}")
    return submit, (lambda dirs: None), calls


def _args(tmp_path, **kw):
    a = dict(root=tmp_path, lrs="3e-3,1e-2,3e-2", lr_rank=8, max_rounds=5, max_lr=1.0, dry_run=False)
    a.update(kw)
    return SimpleNamespace(**a)


def test_lr_rounds_widen_until_every_pair_is_bracketed(tmp_path):
    grid = _grid_module()
    submit, wait, calls = _fake_sweeps({"lora": 1e-2, "tl6": 0.1, "vera": 1e-3}, {"tl6": 0.2})
    brackets, rounds = grid.choose_rates(_args(tmp_path), ["mini_sum"], ["lora", "tl6", "vera"], "7", [],
                                         submit=submit, wait=wait)
    assert {k: (b.chosen, b.state) for k, b in brackets.items()} == {
        ("mini_sum", "lora"): (1e-2, "bracketed"),
        ("mini_sum", "tl6"): (0.1, "bracketed"),     # 0.3 diverged: the upper bracket
        ("mini_sum", "vera"): (1e-3, "bracketed")}   # two steps down from round 1's lowest
    b = brackets[("mini_sum", "tl6")]
    assert b.upper.lr == 0.3 and b.upper.outcome == DIVERGED and b.lower.lr == 3e-2
    # round 1 all pairs; round 2 tl6 up (0.1) and vera down (1e-3); round 3 tl6 up (0.3, diverges),
    # vera down (3e-4); lora was bracketed after round 1 and never ran again
    assert [c[0].relative_to(tmp_path).as_posix() for c in calls] == [
        "lr/round1", "lr/round2/mini_sum-lr0.001", "lr/round2/mini_sum-lr0.1",
        "lr/round3/mini_sum-lr0.0003", "lr/round3/mini_sum-lr0.3"]
    assert "peft=vera" in calls[1][1] and "optim.lr=0.001" in calls[1][1]
    grid.write_rates(tmp_path / "rates.json", brackets)
    doc = json.loads((tmp_path / "rates.json").read_text())
    assert doc["mini_sum"]["tl6"]["upper"] == {"lr": 0.3, "val_loss": None, "diverged": True}
    assert doc["mini_sum"]["vera"]["lower"]["lr"] == 3e-4 and doc["mini_sum"]["vera"]["state"] == "bracketed"


def test_lr_rounds_stop_at_max_rounds_and_report_an_edge(tmp_path):
    grid = _grid_module()
    submit, wait, calls = _fake_sweeps({"tl6": 1.0}, {})
    brackets, _ = grid.choose_rates(_args(tmp_path, max_rounds=2), ["mini_sum"], ["tl6"], "7", [],
                                    submit=submit, wait=wait)
    b = brackets[("mini_sum", "tl6")]
    assert (b.chosen, b.state) == (0.1, "edge") and "--max-rounds=2 reached" in b.why and len(calls) == 2


def test_miniature_grid_refuses_an_edge_unless_allowed(tmp_path, monkeypatch, capsys):
    grid = _grid_module()
    submit, wait, calls = _fake_sweeps({"tl6": 1.0}, {})
    monkeypatch.setattr(grid, "submit", submit)
    monkeypatch.setattr(grid, "wait", wait)
    argv = ["--root", str(tmp_path), "--tasks", "mini_sum", "--presets", "tl6", "--max-rounds", "1"]
    assert grid.main(argv) == 2
    err = capsys.readouterr().err
    assert "mini_sum tl6: lr 0.03" in err and "tried 0.003, 0.01, 0.03" in err and "--allow-edge" in err
    assert not (tmp_path / "grid").exists()
    assert json.loads((tmp_path / "rates.json").read_text())["mini_sum"]["tl6"]["state"] == "edge"
    # allowed: it goes on to the grid at the edge rate (stopped here before the report)
    monkeypatch.setattr(grid.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0))
    assert grid.main(argv + ["--allow-edge", "--ranks", "8", "--seeds", "7,8"]) == 0
    assert any("grid/mini_sum-tl6-r8" in str(d) and "optim.lr=0.03" in o for d, o in calls)
