"""A run never trains on NaN, never shares its folder, and fails cleanly on a full disk.

The cases as a user meets them, each through ``python -m tiedlora.finetune`` in a subprocess:
the learning rate that makes the embedded base diverge, two runs started on one output_dir,
every rank of a distributed run meeting a held folder, a save that fails with ENOSPC (and the
rerun that resumes), skipped steps across a kill and a resume, and how ``report`` and
``submit status`` show what came of them. Faults that a test cannot provoke for real (a NaN
gradient in a chosen step, a full disk at a chosen write, a kill right after a checkpoint) are
injected where they would strike by ``tests/faults.py``.

``make test`` runs the two cases a user first met (the diverging run, the doubled run), the
strict-JSON check and the report; the tests marked ``slow`` start several processes each and
run in CI (``.ci/run``: ``make test-slow``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, HeldLock, tiny_base_args

TIMEOUT = 300
TINY_TASK = ["task=mini_qa", "task.num_train=64", "task.num_validation=16", "task.num_test=8",
             "task.max_length=64", "task.max_new_tokens=4"]
FAST = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.val_check_interval=0",
        "eval.before=false", "eval.after=false", "optim.warmup_steps=2", "optim.lr=3e-3"]
# a diverging run as a new user typed it on the embedded base; before non-finite steps were caught it
# exited 0 with "best (step 4, val loss nan)", NaN tensors in both adapters and a bare NaN in results.json
DIVERGING = ["optim.lr=1e6", "optim.grad_clip=0", "trainer.max_steps=12", "trainer.val_check_interval=4"]
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_RESTART_COUNT", "RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")


# ------------------------------------------------------------------------ helpers
def _env(base_env: dict, **extra) -> dict:
    e = {k: v for k, v in base_env.items() if k not in SLURM_VARS}
    e.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, **extra)
    return e


def finetune(env: dict, *args: str, faults: dict | None = None, extra_env: dict | None = None, tiny: bool = True,
             popen: bool = False):
    """``python -m tiedlora.finetune`` (through tests/faults.py when ``faults`` are given)."""
    entry = [str(ROOT / "tests" / "faults.py")] if faults else ["-m", "tiedlora.finetune"]
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    cmd = [sys.executable, *entry, *flags, *(tiny_base_args(env) + TINY_TASK if tiny else []),
           *[a for a in args if not a.startswith("-")]]
    e = _env(env["env"], **(faults or {}), **(extra_env or {}))
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=TIMEOUT)


def one_error(res, status: int, *needles: str) -> str:
    """Exit ``status``, exactly one ``error:`` line holding ``needles``, no traceback."""
    err = res.stderr
    assert res.returncode == status, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and err.count("error: ") == 1, err[-4000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _reject(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict(text: str):
    """A strict JSON parser (as jq or JavaScript): NaN, Infinity and -Infinity are refused."""
    return json.loads(text, parse_constant=_reject)


def check_strict_json(folder: Path) -> int:
    """Every JSON text below ``folder`` parses strictly: *.json, each line of *.jsonl, and the
    JSON values of safetensors metadata. Returns how many were checked."""
    from safetensors import safe_open

    n = 0
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".json":
            strict(p.read_text())
            n += 1
        elif p.suffix == ".jsonl":
            for line in p.read_text().splitlines():
                strict(line)
                n += 1
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k, v in (f.metadata() or {}).items():
                    if k in ("peft_config", "model", "trainer", "step", "val_loss"):
                        strict(v)
                        n += 1
    return n


def metrics(folder: Path) -> list:
    return [strict(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


def same_steps(a: list, b: list) -> bool:
    """The same steps with bit-identical numbers (timings aside)."""
    drop = ("tokens_per_s", "step_time_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


def leftovers(folder: Path) -> list:
    """Temporary files or folders of an interrupted write (named ``.<target>.*``)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# ------------------------------------------------------------------ non-finite values
@pytest.fixture(scope="module")
def diverged(tiny_base, tmp_path_factory):
    """The diverging run on the embedded base: lr=1e6, no clipping, 12 steps."""
    out = tmp_path_factory.mktemp("diverged") / "run"
    res = finetune(tiny_base, *DIVERGING, f"output_dir={out}", tiny=False)
    return out, res


def test_a_diverging_run_stops_with_status_4_and_no_adapter(diverged):
    out, res = diverged
    line = one_error(res, 4, "diverged", "non-finite gradients at step 6", "learning rate", "optim.lr",
                     "5 optimizer steps skipped in a row", "results.json")
    assert "gradient clipping (optim.grad_clip=1.0)" in line  # the hint fits the settings
    results = strict((out / "results.json").read_text())
    assert results["status"] == "diverged" and results["diverged"]["step"] == 6
    assert results["metrics"] is None and results["adapter"] is None and results["skipped_steps"] == 5
    assert not (out / "adapter.safetensors").exists()
    lines = metrics(out)
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert all(r["skipped"] == "gradients" and r["grad_norm"] is None for r in lines[1:])
    assert [r["skipped_steps"] for r in lines[1:]] == [1, 2, 3, 4, 5]
    # the skipped steps never touched the adapter: whatever best/ holds is finite and was chosen on a finite loss
    from tiedlora.checkpoint import load_adapter

    if (out / "best" / "adapter.safetensors").exists():
        tensors, _, meta = load_adapter(out / "best")  # refuses non-finite values
        assert all(torch.isfinite(t).all() for t in tensors.values())
        assert json.loads(meta["val_loss"]) == results["best_val_loss"]


# a run with validation, a best adapter, checkpoints and evaluation, as array task 100_1 of a Slurm job
COMPLETE = ["peft=tl6", "trainer.max_steps=12", *FAST, "checkpoint.every_n_steps=4", "trainer.val_check_interval=4",
            "eval.after=true", "eval.limit=4"]
ARRAY_TASK_1 = {"SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "101"}


@pytest.fixture(scope="module")
def completed(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("completed") / "001-tl6"
    res = finetune(tiny_base, *COMPLETE, f"output_dir={out}", extra_env=ARRAY_TASK_1)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_every_json_file_we_write_parses_strictly(diverged, completed):
    assert check_strict_json(diverged[0]) >= 8
    assert strict((completed / "results.json").read_text())["status"] == "completed"
    assert check_strict_json(completed) >= 12


@pytest.mark.slow  # several fresh processes: run by .ci/run (make test-slow)
def test_nonfinite_raise_stops_at_the_first_bad_step(tiny_base, tmp_path):
    out = tmp_path / "raise"
    res = finetune(tiny_base, "peft=tl6", "trainer.max_steps=8", *FAST, "checkpoint.every_n_steps=2",
                   "trainer.nonfinite=raise", f"output_dir={out}", faults={"FAULT_NAN_STEPS": "3"})
    one_error(res, 4, "non-finite gradients at step 3", "learning rate", "the last checkpoint, step_0000002")
    assert [r.get("skipped") for r in metrics(out)] == [None, None, "gradients"]
    assert strict((out / "results.json").read_text())["diverged"]["step"] == 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"


@pytest.mark.slow  # several fresh processes: run by .ci/run (make test-slow)
def test_a_nonfinite_validation_loss_is_never_best_and_overflowed_parameters_are_never_saved(tiny_base, tmp_path):
    """The first validation loss (step 2) is NaN: not best (before, the first check was best
    whatever it was, and nothing finite beats NaN); step 4's is. After step 5 an adapter value
    overflows to infinity: step 6 is skipped, and its checkpoint is refused, ending the run."""
    out = tmp_path / "overflow"
    res = finetune(tiny_base, "peft=tl6", "trainer.max_steps=8", *FAST, "trainer.val_check_interval=2",
                   "checkpoint.every_n_steps=2", f"output_dir={out}",
                   faults={"FAULT_NAN_VAL_STEPS": "2", "FAULT_NAN_PARAM_STEP": "5"})
    one_error(res, 4, "parameters became non-finite by step 6", "no checkpoint was written",
              "the last checkpoint, step_0000004")
    lines = metrics(out)
    assert lines[1]["val_loss"] is None and lines[3]["val_loss"] is not None and lines[5]["skipped"] == "loss and gradients"
    results = strict((out / "results.json").read_text())
    assert results["best_step"] == 4 and results["best_val_loss"] == lines[3]["val_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert not (out / "adapter.safetensors").exists()


@pytest.mark.slow  # several fresh processes: run by .ci/run (make test-slow)
@pytest.mark.numerics  # bit-identical to the undisturbed run under every CPU kernel set
def test_skipped_steps_survive_a_kill_and_resume_bit_exactly(tiny_base, tmp_path):
    """NaN gradients in steps 3, 8, 9, 10 with max_skipped_steps=3: step 3 is skipped and the run
    goes on; 8-10 are three in a row, so the run stops at step 10. A run killed right after step
    8's checkpoint must, resumed, stop at step 10 too: the count of skips in a row (1 at step 8)
    is part of the checkpoint. Every step's numbers are bit-identical to the uninterrupted run."""
    common = ["peft=tl6", "trainer.max_steps=12", *FAST, "checkpoint.every_n_steps=4", "trainer.max_skipped_steps=3"]
    nan = {"FAULT_NAN_STEPS": "3,8,9,10"}
    ref, run = tmp_path / "ref", tmp_path / "killed"
    one_error(finetune(tiny_base, *common, f"output_dir={ref}", faults=nan), 4, "at step 10", "3 optimizer steps")
    killed = finetune(tiny_base, *common, f"output_dir={run}", faults={**nan, "FAULT_KILL_AFTER_CHECKPOINT": "8"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    one_error(finetune(tiny_base, *common, f"output_dir={run}", faults=nan), 4, "at step 10")
    a, b = metrics(ref), metrics(run)
    assert [r["step"] for r in a] == list(range(1, 11)) and same_steps(a, b)
    assert [r["step"] for r in a if "skipped" in r] == [3, 8, 9, 10]
    assert a[3]["grad_norm"] is not None and "skipped" not in a[3]  # step 4 trained again


@pytest.mark.slow  # several fresh processes: run by .ci/run (make test-slow)
def test_a_diverged_job_does_not_stop_a_local_multirun(tiny_base, tmp_path):
    """A learning-rate sweep where one rate diverges: the other job still runs, the comparison
    table shows the diverged one as such, and the multirun exits 4."""
    fast = [a for a in FAST if not a.startswith("optim.")]
    res = finetune(tiny_base, "-m", "optim.lr=1e6,3e-3", "optim.warmup_steps=0", "trainer.max_steps=3",
                   "trainer.max_skipped_steps=1", *fast, "eval.after=true", "eval.limit=4",
                   f"output_dir={tmp_path}/lr" + "${optim.lr}")
    one_error(res, 4, "training diverged", "at step 2")
    assert strict((tmp_path / "lr1000000.0" / "results.json").read_text())["status"] == "diverged"
    assert strict((tmp_path / "lr0.003" / "results.json").read_text())["status"] == "completed"
    table = res.stdout[res.stdout.rindex("preset"):]
    assert "diverged at step 2" in table and "exact_match" in table


# -------------------------------------------------------------------- one run per folder
def test_a_second_run_on_the_same_output_dir_exits_2_naming_the_first(tiny_base, tmp_path):
    """``output_dir=r5`` twice, the second while the first runs (before the lock both ran to the
    end with status 0, writing the same files). The first is paused meanwhile, so it is still
    mid-run however slow the second is to start."""
    out = tmp_path / "r5"
    args = ["peft=tl6", "trainer.max_steps=12", *FAST, f"output_dir={out}"]
    first = finetune(tiny_base, *args, popen=True)
    deadline = time.time() + TIMEOUT
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        config_written = (out / "config.yaml").stat().st_mtime_ns
        second = finetune(tiny_base, *args)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    one_error(second, 2, f"output_dir {out} is in use by another run", f"pid {first.pid} on ", "started 20")
    assert first.wait(TIMEOUT) == 0, first.communicate()[1][-3000:]
    # the second run wrote nothing: the folder is the first run's alone
    assert [r["step"] for r in metrics(out)] == list(range(1, 13))
    assert strict((out / "results.json").read_text())["run"]["pid"] == first.pid
    assert (out / "config.yaml").stat().st_mtime_ns == config_written  # not rewritten by the second run


@pytest.mark.slow  # several fresh processes: run by .ci/run (make test-slow)
def test_every_rank_exits_2_together_when_the_folder_is_held(tiny_base, tmp_path):
    """Two ranks (as torchrun or srun start them): rank 0 finds the folder held by a Slurm job,
    both ranks exit 2, and only rank 0 prints the one message."""
    out = tmp_path / "held"
    with HeldLock(out, tiny_base["env"], SLURM_JOB_ID="4242"):
        codes, errs = _two_ranks(tiny_base, "peft=tl6", "trainer.max_steps=2", *FAST, f"output_dir={out}")
    assert codes == [2, 2], [e[-2000:] for e in errs]
    assert (errs[0] + errs[1]).count("error: ") == 1 and "Traceback" not in errs[0] + errs[1]
    assert f"output_dir {out} is in use by another run" in errs[0] and "Slurm job 4242" in errs[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def _two_ranks(env: dict, *args: str, faults: dict | None = None):
    """Run rank 0 and rank 1 as torchrun or srun would start them; (exit statuses, stderr of both)."""
    from tiedlora.dist import _free_port

    port = str(_free_port())
    procs = [finetune(env, *args, popen=True, faults=faults, extra_env={
        "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        for r in (0, 1)]
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    return [p.returncode for p in procs], errs


@pytest.mark.slow  # several fresh processes: run by .ci/run (make test-slow)
def test_every_rank_exits_5_together_when_rank_0_cannot_write(tiny_base, tmp_path):
    """Data parallel over two ranks; rank 0's checkpoint write meets a full disk: both ranks
    stop with status 5 (rank 1 is not left waiting in the next collective), one message."""
    out = tmp_path / "dp2"
    codes, errs = _two_ranks(tiny_base, "peft=tl6", "trainer.max_steps=4", *FAST, "checkpoint.every_n_steps=2",
                             f"output_dir={out}",
                             faults={"FAULT_ENOSPC": f"{out}/checkpoints/.step_0000004.*/.adapter.safetensors.*"})
    assert codes == [5, 5], [e[-2000:] for e in errs]
    assert (errs[0] + errs[1]).count("error: ") == 1 and "Traceback" not in errs[0] + errs[1]
    assert f"could not write {out}/checkpoints/step_0000004/adapter.safetensors" in errs[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002" and leftovers(out) == []


# ---------------------------------------------------------------------- a full disk
@pytest.mark.slow  # several fresh processes: run by .ci/run (make test-slow)
@pytest.mark.numerics  # bit-identical to the undisturbed run under every CPU kernel set
def test_disk_full_while_saving_ends_cleanly_and_the_rerun_resumes(tiny_base, completed, tmp_path):
    """A write that fails with ENOSPC halfway, three times over (a metrics line, a checkpoint's
    state file, results.json): one ``error:`` line with the path, the operation and the free
    space, exit 5, the last whole checkpoint still ``latest``, no partial file or temporary folder;
    the rerun without the fault resumes and ends exactly where an undisturbed run ends."""
    common, ref, out = COMPLETE, completed, tmp_path / "full"  # the undisturbed run: `completed`
    latest = out / "checkpoints" / "latest"

    res = finetune(tiny_base, *common, f"output_dir={out}", faults={"FAULT_ENOSPC": f"{out}/metrics.jsonl@6"})
    one_error(res, 5, f"could not write {out}/metrics.jsonl", "append this step's line", "No space left on device",
              "left on its file system", "checkpoints/latest still names step_0000004")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]  # whole lines only: the half line was cut off
    assert latest.read_text().strip() == "step_0000004" and leftovers(out) == []

    res = finetune(tiny_base, *common, f"output_dir={out}",
                   faults={"FAULT_ENOSPC": f"{out}/checkpoints/.step_0000008.*/.trainer_state.safetensors.*"})
    one_error(res, 5, f"could not write {out}/checkpoints/step_0000008/trainer_state.safetensors",
              "save the training checkpoint of step 8", "checkpoints/latest still names step_0000004")
    assert latest.read_text().strip() == "step_0000004" and leftovers(out) == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000004"]

    res = finetune(tiny_base, *common, f"output_dir={out}", faults={"FAULT_ENOSPC": f"{out}/.results.json.*"})
    one_error(res, 5, f"could not write {out}/results.json", "write results.json",
              "checkpoints/latest still names step_0000012")
    assert not (out / "results.json").exists() and leftovers(out) == []

    res = finetune(tiny_base, *common, f"output_dir={out}")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert same_steps(metrics(ref), metrics(out))
    from tiedlora.checkpoint import load_adapter

    a, b = load_adapter(ref / "adapter.safetensors")[0], load_adapter(out / "adapter.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert strict((out / "results.json").read_text())["metrics"] == strict((ref / "results.json").read_text())["metrics"]


# ------------------------------------------------------------------- what reports show
def test_report_and_submit_status_show_diverged_and_doubled_runs(diverged, completed, tiny_base, tmp_path,
                                                                 monkeypatch, capsys):
    """A sweep of three jobs: the diverged run, a completed run, and a second submission of the
    completed run's folder (it met the lock and exited 2). The report counts one result, lists
    the diverged cell as diverged; status names each job's outcome."""
    import shutil

    from tiedlora import report, submit

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copytree(diverged[0], sweep / "000-diverged")
    done = sweep / "001-tl6"
    shutil.copytree(completed, done)  # array task 100_1 wrote it
    with HeldLock(done, tiny_base["env"], **ARRAY_TASK_1):  # ... and still runs when task 100_2 starts on it
        doubled = finetune(tiny_base, *COMPLETE, f"output_dir={done}",
                           extra_env={**ARRAY_TASK_1, "SLURM_JOB_ID": "103", "SLURM_ARRAY_TASK_ID": "2"})
    one_error(doubled, 2, f"output_dir {done} is in use by another run", "Slurm job 100_1")
    jobs = [{"index": 0, "name": "000-diverged", "output_dir": str(sweep / "000-diverged"),
             "overrides": ["optim.lr=1e6"]},
            {"index": 1, "name": "001-tl6", "output_dir": str(done), "overrides": []},
            {"index": 2, "name": "002-tl6-again", "output_dir": str(done), "overrides": []}]
    (sweep / "sweep.json").write_text(json.dumps(
        {"jobs": jobs, "submissions": [{"kind": "train", "job_id": "100", "array": True, "indices": [0, 1, 2]}]}))
    states = {"100_0": "FAILED exit 4:0", "100_1": "COMPLETED", "100_2": "FAILED exit 2:0"}
    monkeypatch.setattr(submit, "_squeue", lambda ids: {})
    monkeypatch.setattr(submit, "_sacct", lambda ids: states)

    assert submit.main(["status", str(sweep)]) == 0
    shown = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("00")}
    assert "FAILED exit 4:0" in shown["000-diverged"] and shown["000-diverged"].endswith("no: diverged at step 6")
    assert "COMPLETED" in shown["001-tl6"] and " yes exact_match=" in shown["001-tl6"]
    assert "FAILED exit 2:0" in shown["002-tl6-again"]
    assert shown["002-tl6-again"].endswith("no (its folder's results.json is job 100_1's)")

    assert report.main([str(sweep), "--no-figures"]) == 0
    table = capsys.readouterr().out
    row = next(ln for ln in table.splitlines() if " mini_sum " in f" {ln} ")
    assert "diverged at step 6" in row and "nan" not in row.lower()
    missing = (sweep / "report" / "missing.md").read_text()
    assert "| mini_sum | mini | tl6 | 8 | diverged at step 6 |" in missing
    cells = report.build_cells(report.load_results([sweep]))
    assert list(cells) == [("mini_qa", "tiny", "tl6", 8)] and cells[("mini_qa", "tiny", "tl6", 8)].seeds == 1
