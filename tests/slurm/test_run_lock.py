"""One run per output folder, against a real one-node Slurm (marker `slurm`; .ci/slurm-tests).

A job whose folder another run holds fails at once with status 2 and is not requeued (the
scripts requeue on status 3 only); a requeued job whose previous run has not let go of the
folder yet waits for it (``trainer.requeue_lock_wait_s``), then resumes. The "other run" is a
process of the test holding the lock as a fine-tune does (``tiedlora.files.lock_run_dir``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from helpers import HeldLock
from slurm_util import RESTART_SOON, job_records, logs, manifest, submit, submitted_ids, wait_jobs

pytestmark = pytest.mark.slurm


def _wait_for(predicate, what: str, sweep: Path, timeout: float = 180):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}\n{logs(sweep)}"
        time.sleep(0.2)


def test_a_job_on_a_folder_another_run_holds_fails_with_2_and_is_not_requeued(tiny, tmp_path):
    sweep = tmp_path / "held"
    submit(tiny, "--sweep-dir", str(sweep), "launcher=local", "launcher.extra_sbatch=[--begin=now+8]",
           "peft=tl6", "trainer.max_steps=3", "eval.after=false", *tiny["args"])
    jid, out = submitted_ids(sweep)["train"], Path(manifest(sweep)["jobs"][0]["output_dir"])
    holder = HeldLock(out, tiny["env"], SLURM_JOB_ID="999")  # before the job may start (--begin)
    try:
        rec = wait_jobs([jid])[jid]
    finally:
        holder.release()
    text = logs(sweep)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "2:0" and rec["Restarts"] == "0", text
    assert f"error: output_dir {out} is in use by another run (pid {holder.pid} on " in text, text
    assert "Slurm job 999)" in text and "Traceback" not in text and "requeueing" not in text, text
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # the job wrote nothing there


def test_a_requeued_job_waits_for_its_previous_run_to_let_go_then_resumes(tiny, tmp_path):
    """The job checkpoints on a signal, exits 3 and is requeued; before it restarts, a process
    takes the folder (as a previous run still ending would). The restarted job waits, says so,
    and resumes once the folder is free, within trainer.requeue_lock_wait_s."""
    steps = 300
    sweep = tmp_path / "requeue"
    submit(tiny, "--sweep-dir", str(sweep), "launcher=local", "peft=tl6", f"trainer.max_steps={steps}",
           "eval.after=false", "trainer.requeue_lock_wait_s=120", *tiny["args"])
    jid, out = submitted_ids(sweep)["train"], Path(manifest(sweep)["jobs"][0]["output_dir"])
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, "training steps", sweep)
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)  # as the time-limit warning does
    _wait_for(lambda: job_records(jid)[jid].get("Restarts") == "1"
              and job_records(jid)[jid].get("JobState") == "PENDING", "the requeue", sweep)
    holder = HeldLock(out, tiny["env"], SLURM_JOB_ID=jid)  # the "previous run" has not let go yet
    try:
        subprocess.run(["scontrol", "update", f"JobId={jid}", RESTART_SOON], check=True)
        waiting = f"is held by pid {holder.pid} on "
        _wait_for(lambda: waiting in logs(sweep), "the rerun to wait for the folder", sweep)
        time.sleep(3)  # it keeps waiting while the folder is held
        assert job_records(jid)[jid]["JobState"] == "RUNNING" and "resumed from" not in logs(sweep)
    finally:
        holder.release()
    rec = wait_jobs([jid], timeout=300)[jid]
    text = logs(sweep)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", text
    assert f"Slurm job {jid}; waiting up to 120 s for it to end" in text, text
    assert "checkpoint saved after a signal: requeueing" in text and "resumed from" in text, text
    assert len(metrics.read_text().splitlines()) == steps
