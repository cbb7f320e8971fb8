"""The launchers against a real one-node Slurm (start it with .ci/slurm/start.sh; .ci/slurm-tests).

Every job is submitted the way a user does it (``python -m tiedlora.submit`` or Hydra multirun)
and fine-tunes the tiny base on CPU/gloo.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_util import RESTART_SOON, ROOT, job_records, logs, manifest, submit, submitted_ids, wait_jobs

pytestmark = pytest.mark.slurm

NASTY = "sw eep 'q' \"d\" $(touch PWNED); echo x; 50%"  # a folder name a shell must not interpret


def _adapter(path: Path):
    from tiedlora.checkpoint import load_adapter

    return load_adapter(path)[0]


def test_two_task_tp2_job_through_srun_then_evaluation_job_after_it(tiny, tmp_path):
    sweep = tmp_path / NASTY / "tp2"
    submit(tiny, "--eval", "--sweep-dir", str(sweep), "launcher=local", "launcher.ntasks_per_node=2",
           "parallel.tp=2", "peft=tl6", "trainer.max_steps=4", "eval.after=false", *tiny["args"])
    ids = submitted_ids(sweep)
    ev = subprocess.run(["scontrol", "show", "job", "-o", ids["eval"]], capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{ids['train']}" in ev, ev  # queued behind its training job
    recs = wait_jobs([ids["train"], ids["eval"]])
    train, evaluation = recs[ids["train"]], recs[ids["eval"]]
    assert train["JobState"] == "COMPLETED" and evaluation["JobState"] == "COMPLETED", logs(sweep)
    assert train["NumTasks"] == "2"
    assert evaluation["StartTime"] >= train["EndTime"]
    out = sweep / manifest(sweep)["jobs"][0]["name"]
    res = json.loads((out / "results.json").read_text())
    assert res["layout"]["tp"] == 2 and res["steps"] == 4 and res["preset"] == "tl6"
    assert "exact_match" in res["metrics"]  # written by the evaluation job (training had eval.after=false)
    # the odd folder name arrived literally: nothing was executed, logs landed in it
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()
    assert len(list((sweep / "logs").glob("train-*.out"))) == 1


def test_job_array_of_four_runs_throttled_and_status(tiny, tmp_path):
    sweep = tmp_path / "array"
    submit(tiny, "--sweep-dir", str(sweep), "launcher=local", "launcher.array_parallelism=2",
           "peft=lora,tl6", "peft.rank=2,4", "trainer.max_steps=3", "eval.after=false", *tiny["args"])
    jid = submitted_ids(sweep)["train"]
    script = (sweep / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in script
    shown = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    assert "ArrayTaskThrottle=2" in shown, shown
    recs = wait_jobs([jid])
    assert sorted(recs) == [f"{jid}_{i}" for i in range(4)], recs.keys()
    assert all(r["JobState"] == "COMPLETED" for r in recs.values()), logs(sweep)
    jobs = manifest(sweep)["jobs"]
    got = {(json.loads((Path(j["output_dir"]) / "results.json").read_text())["preset"],
            json.loads((Path(j["output_dir"]) / "results.json").read_text())["rank"]) for j in jobs}
    assert got == {("lora", 2), ("lora", 4), ("tl6", 2), ("tl6", 4)}
    res = submit(tiny, "status", str(sweep))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("00")]
    assert len(lines) == 4 and all("COMPLETED" in ln and ln.rstrip().endswith("yes") for ln in lines), res.stdout
    assert "4/4 jobs have results.json" in res.stdout


def _planned_steps(tiny, common: list, out: Path) -> tuple:
    """How many steps make the job train for about :data:`PLANNED_TRAIN_S` on this machine, now.

    A short local run of the same configuration gives the step time (the median of its later
    steps, where start-up no longer counts). The job and the reference then train side by side,
    one thread each, as the calibration did, so a loaded machine plans fewer, slower steps and an
    idle one more, faster ones: the run lasts about as long either way.
    """
    res = subprocess.run([sys.executable, "-m", "tiedlora.finetune", *common, f"trainer.max_steps={CALIBRATION_STEPS}",
                          f"output_dir={out}"], cwd=ROOT, env=tiny["env"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    times = sorted(json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
                   [CALIBRATION_STEPS // 3:])
    step_s = times[len(times) // 2]
    return max(MIN_STEPS, math.ceil(PLANNED_TRAIN_S / step_s)), step_s


# Slurm sends a due warning signal from its periodic time-limit check (every ~30 s), so the job
# must still be training well over 30 s after the signal becomes due. The run length is planned
# from a measured step time, not from a guess of steps per second: the adapter got faster once
# and a fixed 300 steps finished in 15 s, before any signal could arrive.
PLANNED_TRAIN_S = 90  # the signal is made due as training starts: ~3 periodic checks of margin
CALIBRATION_STEPS = 30
MIN_STEPS = 100


def test_time_limit_signal_checkpoints_requeues_and_resumes_to_the_same_adapter(tiny, tmp_path):
    """The real Slurm warning signal (--signal=USR1@lead), the exit-3 requeue, the resume."""
    common = ["peft=lora", "eval.after=false", *tiny["args"], "trainer.global_batch_size=16",
              "trainer.micro_batch_size=1"]
    steps, step_s = _planned_steps(tiny, common, tmp_path / "calibration")
    common.append(f"trainer.max_steps={steps}")
    plan = f"{steps} steps planned at {step_s * 1000:.1f} ms/step measured (~{steps * step_s:.0f} s)"
    ref = tmp_path / "reference"
    reference = subprocess.Popen([sys.executable, "-m", "tiedlora.finetune", *common, f"output_dir={ref}"],
                                 cwd=ROOT, env=tiny["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
    sweep = tmp_path / "preempt"
    lead = 150
    submit(tiny, "--sweep-dir", str(sweep), "launcher=local", "launcher.time=00:10:00",
           f"launcher.signal_lead_s={lead}", *common)
    jid = submitted_ids(sweep)["train"]
    out = sweep / manifest(sweep)["jobs"][0]["name"]
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    # as soon as training has started (the signal handler is installed before the first step)
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert time.time() < deadline, logs(sweep)
        time.sleep(0.2)
    # Bring the time limit close: Slurm's warning is now due and arrives at its next check.
    elapsed = _seconds(job_records(jid)[jid]["RunTime"])
    limit_min = math.ceil((elapsed + 70) / 60)
    assert limit_min * 60 - lead <= elapsed
    subprocess.run(["scontrol", "update", f"JobId={jid}", f"TimeLimit={limit_min}"], check=True)
    due = time.time()

    def restart_now(job):  # the rerun gets its long time limit back and starts at once
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10", RESTART_SOON], check=False)

    rec = wait_jobs([jid], timeout=360 + 2 * steps * step_s, on_pending_requeue=restart_now)[jid]
    # the whole logs without the progress lines (hundreds of them would push the requeue out of a tail)
    text = "\n".join(ln for ln in logs(sweep, tail=None).splitlines() if not ln.startswith("step "))
    assert int(rec["Restarts"]) >= 1, (
        f"the job ended {rec['JobState']} without a requeue, {time.time() - due:.0f} s after the signal "
        f"became due ({plan}): it finished before Slurm's warning arrived\n{text}")
    assert rec["JobState"] == "COMPLETED", text
    assert "checkpoint saved after a signal: requeueing" in text and "resumed from" in text, text
    assert len(metrics.read_text().splitlines()) == steps
    assert reference.wait(timeout=300 + 2 * steps * step_s) == 0, reference.stderr.read()[-3000:]
    a, b = _adapter(ref / "adapter.safetensors"), _adapter(out / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _seconds(runtime: str) -> int:
    days = 0
    if "-" in runtime:
        d, runtime = runtime.split("-")
        days = int(d)
    h, m, s = (int(x) for x in runtime.split(":"))
    return days * 86400 + h * 3600 + m * 60 + s


def test_hydra_multirun_on_slurm_with_two_task_jobs(tiny, tmp_path):
    """``-m hydra/launcher=slurm``: submitit array, env export for 2 ranks, rank 0 writes."""
    out = tmp_path / "hydra"
    cmd = [sys.executable, "-m", "tiedlora.finetune", "-m", "hydra/launcher=slurm", "hydra.launcher.cluster=local",
           "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={out}/multirun", "parallel.tp=2",
           "peft=lora,tl6", "trainer.max_steps=3", "eval.after=false", *tiny["args"],
           f"output_dir={out}/${{peft.name}}"]
    res = subprocess.run(cmd, cwd=ROOT, env=tiny["env"], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    for name in ("lora", "tl6"):
        r = json.loads((out / name / "results.json").read_text())
        assert r["preset"] == name and r["layout"]["tp"] == 2 and r["steps"] == 3
    sbatch = next((out / "multirun" / ".submitit").rglob("*submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in sbatch and "#SBATCH --partition=debug" in sbatch
    assert "#SBATCH --requeue" in sbatch and "export OMP_NUM_THREADS=1" in sbatch


def test_lr_sweep_on_slurm_takes_a_diverged_job_as_its_upper_bracket(tiny, tmp_path):
    """``+sweep=lr hydra/launcher=slurm``: the rounds run as Slurm jobs; a job whose run diverges
    (1e6 without clipping) hands its results back instead of failing the sweep."""
    out = tmp_path / "lr"
    args = [a for a in tiny["args"] if a != "trainer.val_check_interval=0"]
    cmd = [sys.executable, "-m", "tiedlora.finetune", "-m", "+sweep=lr", "hydra/launcher=slurm",
           "hydra.launcher.cluster=local", f"hydra.sweep.dir={out}/multirun", "peft=tl6", *args,
           "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.max_skipped_steps=1",
           "optim.grad_clip=0", "optim.lr=1e-3,1e6", "hydra.sweeper.max_rounds=1", "hydra.sweeper.allow_edge=true",
           f"output_dir={out}/lr${{optim.lr}}"]
    res = subprocess.run(cmd, cwd=ROOT, env=tiny["env"], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    runs = {r["lr"]: r for r in (json.loads(f.read_text()) for f in out.glob("lr*/results.json"))}
    assert set(runs) == {1e-3, 1e6} and runs[1e6]["status"] == "diverged", runs
    (choice,) = json.loads((out / "multirun" / "lr_bracket.json").read_text()).values()
    assert choice["lr"] == 1e-3 and choice["upper"] == {"lr": 1e6, "val_loss": None, "diverged": True}, choice
    assert choice["state"] == "edge" and "nothing tried below it" in choice["why"], choice  # one round only


def test_torchrun_script_under_slurm_takes_the_rendezvous_from_slurm(tiny, tmp_path):
    """launch/slurm_torchrun.sbatch -> srun -> launch/torchrun_multi_node.sh -> 2 ranks, TP=2."""
    out = tmp_path / "torchrun out"
    env = {**tiny["env"], "NPROC": "2", "PYTHON": sys.executable}
    res = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/torchrun-%j.out",
                          str(ROOT / "launch" / "slurm_torchrun.sbatch"), "parallel.tp=2", "peft=tl6",
                          "trainer.max_steps=3", "eval.after=false", *tiny["args"], f"output_dir='{out}'"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    jid = res.stdout.strip()
    rec = wait_jobs([jid])[jid]
    log = "".join(p.read_text() for p in tmp_path.glob("torchrun-*.out"))
    assert rec["JobState"] == "COMPLETED", log[-5000:]
    r = json.loads((out / "results.json").read_text())
    assert r["layout"]["tp"] == 2 and r["steps"] == 3
