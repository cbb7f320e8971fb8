"""python -m tiedlora.report over a small sweep folder: paper-style tables (Markdown, CSV), seeds as
mean ± spread, learning rate chosen on validation loss, every missing cell listed with why, PNGs."""

import csv
import json

import pytest
import yaml

from tiedlora import report, submit

TASK, MODEL = "mini_sum", "mini"
SHARE = {"lora": 1.0, "tl6": 0.345}
PARAMS = {("lora", 2): 6144, ("lora", 8): 24576, ("tl6", 2): 2144, ("tl6", 8): 8480}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(root, name, preset, rank, *, seed, lr, rouge, val_loss, task=TASK, metrics=True):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"task": {"name": task}, "model": {"name": MODEL},
                                                   "peft": {"name": preset, "rank": rank},
                                                   "trainer": {"seed": seed}, "optim": {"lr": lr}}))
    res = {"task": task, "model": MODEL, "preset": preset, "rank": rank,
           "trainable_params": PARAMS[(preset, rank)], "share_of_lora": SHARE[preset],
           "metrics": {"rougeL": rouge, "rouge1": rouge + 5} if metrics else None,
           "metrics_before": {"rougeL": 4.1}, "best_val_loss": val_loss, "steps": 200, "wall_time_s": 60}
    (d / "results.json").write_text(json.dumps(res))
    return d


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A 2-preset x 2-rank grid of mini_sum (plus one mini_qa cell): two seeds per cell, an lr sweep
    in one cell, one job failed, one still running, one never started, and a whole grid cell of
    mini_qa never submitted."""
    root = tmp_path / "sweep"
    jobs = []

    def job(name, preset, rank, task=TASK):
        jobs.append({"index": len(jobs), "name": name, "output_dir": str(root / name),
                     "overrides": [f"task={task}", f"peft={preset}", f"peft.rank={rank}"]})

    for seed, off in ((1, 0.0), (2, 2.0)):
        _run(root, f"lora_r8_s{seed}", "lora", 8, seed=seed, lr=3e-3, rouge=48.0 + off, val_loss=1.0)
        job(f"lora_r8_s{seed}", "lora", 8)
        _run(root, f"lora_r2_s{seed}", "lora", 2, seed=seed, lr=3e-3, rouge=40.0 + off, val_loss=1.2)
        job(f"lora_r2_s{seed}", "lora", 2)
        # tl6 r8: two rates; 1e-3 has the better validation loss but the WORSE test metric
        _run(root, f"tl6_r8_lr1e-3_s{seed}", "tl6", 8, seed=seed, lr=1e-3, rouge=42.0 + off, val_loss=1.1)
        job(f"tl6_r8_lr1e-3_s{seed}", "tl6", 8)
        _run(root, f"tl6_r8_lr1e-2_s{seed}", "tl6", 8, seed=seed, lr=1e-2, rouge=47.0 + off, val_loss=1.3)
        job(f"tl6_r8_lr1e-2_s{seed}", "tl6", 8)
    _run(root, "tl6_r2_s1", "tl6", 2, seed=1, lr=3e-3, rouge=30.0, val_loss=1.5)
    job("tl6_r2_s1", "tl6", 2)
    job("tl6_r2_s2", "tl6", 2)                 # failed in Slurm: folder with a config, no results
    (root / "tl6_r2_s2").mkdir()
    job("lora_r8_qa", "lora", 8, task="mini_qa")  # still running
    _run(root, "tl6_r8_qa", "tl6", 8, seed=1, lr=3e-3, rouge=12.0, val_loss=2.0, task="mini_qa")
    job("tl6_r8_qa", "tl6", 8, task="mini_qa")
    job("lora_r2_qa", "lora", 2, task="mini_qa")  # planned, never submitted (no Slurm id)
    # mini_qa tl6 r2: in no job at all -> never submitted
    plan = [{"kind": "train", "job_id": "100", "array": True, "indices": list(range(len(jobs) - 1))}]
    (root / "sweep.json").write_text(json.dumps({"jobs": jobs, "submissions": plan}))
    states = {f"100_{j['index']}": "COMPLETED" for j in jobs}
    states["100_9"] = "FAILED exit 1:0"
    states["100_10"] = "RUNNING"
    monkeypatch.setattr(submit, "_squeue", lambda ids: {k: v for k, v in states.items() if v == "RUNNING"})
    monkeypatch.setattr(submit, "_sacct", lambda ids: {k: v for k, v in states.items() if v != "RUNNING"})
    assert jobs[9]["name"] == "tl6_r2_s2" and jobs[10]["name"] == "lora_r8_qa"
    return root


def test_report_tables_missing_cells_and_figures(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "tl6_r2" not in printed and "lora" in printed  # the per-run table
    out = sweep / "report"

    md = (out / f"{TASK}__{MODEL}.md").read_text()
    assert "| preset | r=2 | r=8 |" in md
    # lora: mean over two seeds ± half the range, share of LoRA
    assert "| lora | 41.0 ±1.0 (100.0%) | 49.0 ±1.0 (100.0%) |" in md
    # tl6 r=8: the rate with the lower validation loss (1e-3), though its test metric is lower
    # tl6 r=2: one seed -> no spread; the other seed's job failed -> counted as one seed
    assert "| tl6 | 30.0 (34.5%) | 43.0 ±1.0 (34.5%) lr=0.001 |" in md

    rows = list(csv.DictReader((out / f"{TASK}__{MODEL}.csv").open()))
    got = {(r["preset"], r["rank"]): r for r in rows}
    assert got[("tl6", "8")]["lr"] == "0.001" and got[("tl6", "8")]["seeds"] == "2"
    assert float(got[("tl6", "8")]["mean"]) == pytest.approx(43.0)
    assert got[("lora", "2")]["trainable_params"] == "6144"

    qa = (out / f"mini_qa__{MODEL}.md").read_text()
    assert "| tl6 | — (never submitted) | 12.0 (34.5%) |" in qa
    assert "| lora | — (never submitted) | — (running) |" in qa

    missing = {(r["task"], r["preset"], r["rank"]): r["status"]
               for r in csv.DictReader((out / "missing.csv").open())}
    assert missing == {
        (TASK, "tl6", "2"): "failed (FAILED exit 1:0)",
        ("mini_qa", "lora", "8"): "running",
        ("mini_qa", "lora", "2"): "never submitted",
        ("mini_qa", "tl6", "2"): "never submitted",
    }
    assert "failed (FAILED exit 1:0)" in (out / "missing.md").read_text()

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{MODEL}__average.png", f"{MODEL}__pareto.png",
                    f"mini_qa__{MODEL}__rank.png", f"{TASK}__{MODEL}__rank.png"]
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p
    index = (out / "README.md").read_text()
    assert f"![{MODEL}__pareto]({MODEL}__pareto.png)" in index and "Missing cells" in index


def test_without_slurm_missing_cells_come_from_the_folders(sweep, monkeypatch):
    def no_slurm(ids):
        raise FileNotFoundError("squeue")
    monkeypatch.setattr(submit, "_squeue", no_slurm)
    res = report.write_report(sweep, sweep / "r2", figures=False)
    status = {(m.task, m.preset, m.rank): m.status for m in res["missing"]}
    assert status[(TASK, "tl6", 2)].startswith("started; no results.json")
    assert status[("mini_qa", "lora", 8)] == "not started"
    assert not list((sweep / "r2").glob("*.png"))


def test_runs_without_metrics_are_missing_not_zero(tmp_path):
    _run(tmp_path, "a", "lora", 8, seed=1, lr=1e-3, rouge=1.0, val_loss=1.0, metrics=False)
    _run(tmp_path, "b", "tl6", 8, seed=1, lr=1e-3, rouge=20.0, val_loss=1.0)
    res = report.write_report(tmp_path, tmp_path / "rep", figures=False)
    assert [(m.preset, m.status) for m in res["missing"]] == [("lora", "not evaluated (results.json has no metrics)")]
    assert "| lora | — (not evaluated (results.json has no metrics)) |" in (tmp_path / "rep" / f"{TASK}__{MODEL}.md").read_text()


def test_pareto_front():
    pts = [(100, 10.0), (50, 12.0), (200, 11.0), (400, 20.0), (50, 9.0), (1000, 19.0)]
    assert report.pareto_front(pts) == [(50, 12.0), (400, 20.0)]


def test_bad_results_file_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json: not a results.json file"):
        report.main([str(tmp_path)])


def test_a_copied_sweep_folder_reports_the_same(sweep, tmp_path, monkeypatch):
    """A sweep folder moved or copied (e.g. committed into a repository) keeps its manifest's
    absolute output paths; the report finds the runs beside the manifest instead."""
    import shutil

    def no_slurm(ids):
        raise FileNotFoundError("squeue")
    monkeypatch.setattr(submit, "_squeue", no_slurm)
    here = report.write_report(sweep, tmp_path / "here", figures=False)
    moved = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(sweep, moved)
    both = report.write_report(moved, tmp_path / "both", figures=False)  # the original still there
    assert [(m.task, m.preset, m.rank, m.status) for m in both["missing"]] == \
        [(m.task, m.preset, m.rank, m.status) for m in here["missing"]]
    shutil.rmtree(sweep)
    there = report.write_report(moved, tmp_path / "there", figures=False)
    assert [(m.task, m.preset, m.rank, m.status) for m in there["missing"]] == \
        [(m.task, m.preset, m.rank, m.status) for m in here["missing"]]
    assert (tmp_path / "there" / f"{TASK}__{MODEL}.md").read_text() == \
        (tmp_path / "here" / f"{TASK}__{MODEL}.md").read_text()


def test_several_sweeps_make_one_report(tmp_path, capsys):
    """An lr sweep and the grid that used its rates, given together: one set of tables with both
    folders' runs and both manifests' missing jobs."""
    lr, grid = tmp_path / "lr", tmp_path / "grid"
    for root, runs in ((lr, [("tl6_r8_a", "tl6", 8, 1e-3, 1.2, 30.0), ("tl6_r8_b", "tl6", 8, 1e-2, 1.0, 40.0)]),
                       (grid, [("tl6_r2", "tl6", 2, 1e-2, 1.3, 20.0), ("lora_r8", "lora", 8, 3e-3, 0.9, 50.0)])):
        jobs = []
        for name, preset, rank, rate, vl, rouge in runs:
            _run(root, name, preset, rank, seed=1, lr=rate, rouge=rouge, val_loss=vl)
            jobs.append({"index": len(jobs), "name": name, "output_dir": str(root / name),
                         "overrides": [f"peft={preset}", f"peft.rank={rank}"]})
        (root / "sweep.json").write_text(json.dumps({"jobs": jobs + [
            {"index": len(jobs), "name": "lora_r2", "output_dir": str(root / "lora_r2"),
             "overrides": ["peft=lora", "peft.rank=2"]}], "submissions": []}))
    with pytest.raises(ValueError, match="--out"):
        report.main([str(lr), str(grid)])
    assert report.main([str(lr), str(grid), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    md = (tmp_path / "rep" / f"{TASK}__{MODEL}.md").read_text()
    assert "| tl6 | 20.0" in md and "40.0" in md and "lr=0.01" in md and "| lora | — " in md
    missing = (tmp_path / "rep" / "missing.csv").read_text().splitlines()
    assert len([m for m in missing if ",lora,2," in m]) == 2, missing   # one per manifest


def test_a_diverged_run_is_never_a_result(tmp_path, capsys):
    """Even with scores in it (an adapter evaluated into the folder afterwards), a results.json that
    says the run diverged is listed as diverged, and its rate is not among those compared."""
    d = _run(tmp_path, "a", "tl6", 8, seed=1, lr=1e-1, rouge=5.0, val_loss=0.5)
    res = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps({**res, "status": "diverged", "diverged": {"step": 7, "reason": "x"}}))
    _run(tmp_path, "b", "tl6", 8, seed=1, lr=1e-3, rouge=20.0, val_loss=1.0)
    out = report.write_report(tmp_path, tmp_path / "rep", figures=False)
    cell = out["cells"][(TASK, MODEL, "tl6", 8)]
    assert cell.mean == 20.0 and cell.lr is None and [r["lr"] for r in cell.runs] == [1e-3]
    assert [(m.preset, m.status) for m in out["missing"]] == [("tl6", "diverged at step 7")]
    assert "diverged at step 7" in report.render(out["rows"])


def test_learning_rate_table_names_each_choice_its_neighbours_and_flags_edges(tmp_path, capsys):
    """tl6: 1e-2 best, 3e-3 below, 3e-2 diverged above: bracketed. lora: the best at the highest
    rate tried: EDGE. Seeds average; a cell at one rate is not in the table."""
    for seed in (1, 2):
        _run(tmp_path, f"tl6_a{seed}", "tl6", 8, seed=seed, lr=3e-3, rouge=40.0, val_loss=1.2 + seed / 10)
        _run(tmp_path, f"tl6_b{seed}", "tl6", 8, seed=seed, lr=1e-2, rouge=45.0, val_loss=1.0 + seed / 10)
    d = _run(tmp_path, "tl6_c", "tl6", 8, seed=1, lr=3e-2, rouge=1.0, val_loss=0.1)
    res = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps({**res, "status": "diverged", "diverged": {"step": 3}}))
    _run(tmp_path, "lora_a", "lora", 8, seed=1, lr=3e-3, rouge=40.0, val_loss=1.4)
    _run(tmp_path, "lora_b", "lora", 8, seed=1, lr=1e-2, rouge=41.0, val_loss=1.1)
    _run(tmp_path, "lora_r2", "lora", 2, seed=1, lr=1e-2, rouge=30.0, val_loss=1.3)
    assert report.main([str(tmp_path), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    rows = {(r["preset"], r["rank"]): r for r in csv.DictReader((tmp_path / "rep" / "learning_rates.csv").open())}
    assert set(rows) == {("lora", "8"), ("tl6", "8")}
    tl6, lora = rows[("tl6", "8")], rows[("lora", "8")]
    assert (float(tl6["lr"]), float(tl6["val_loss"]), tl6["state"]) == (1e-2, 1.15, "bracketed")
    assert (float(tl6["lower_lr"]), float(tl6["lower_val_loss"])) == (3e-3, pytest.approx(1.35))
    assert (float(tl6["upper_lr"]), tl6["upper_val_loss"]) == (3e-2, "")
    assert lora["state"] == "edge" and float(lora["lr"]) == 1e-2 and lora["why"] == "nothing tried above it"
    md = (tmp_path / "rep" / "learning_rates.md").read_text()
    assert "| tl6 | 8 | 0.01 | 1.1500 | 0.003 (1.3500) | 0.03 (diverged) |" in md
    assert "| lora | 8 | 0.01 | 1.1000 | 0.003 (1.4000) | none tried |" in md and "**EDGE**" in md
    out = capsys.readouterr().out
    assert "learning rates: 1 choice(s) at the EDGE" in out and "mini_sum mini lora 8" in out
