"""Helpers of the Slurm tests: submit as a user does, read job states, wait for jobs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

ROOT = Path(__file__).resolve().parents[2]
# job states after which nothing more happens (others: PENDING, RUNNING, SIGNALING, REQUEUED, ...)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT = 240  # seconds a test waits for its jobs (a tiny job takes ~15-40 s on 2 cores)


def submit(tiny, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m tiedlora.submit ARGS`` as a user runs it."""
    res = subprocess.run([sys.executable, "-m", "tiedlora.submit", *args], cwd=ROOT, env=tiny["env"],
                         capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"submit failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def manifest(sweep: Path) -> dict:
    return json.loads((sweep / "sweep.json").read_text())


def submitted_ids(sweep: Path) -> Dict[str, str]:
    return {s["kind"]: s["job_id"] for s in manifest(sweep)["submissions"]}


def job_records(job_id: str) -> Dict[str, Dict[str, str]]:
    """``scontrol show job -o`` as {job id (array tasks: 12_3): {field: value}}."""
    res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    out = {}
    for line in res.stdout.splitlines():
        rec = dict(re.findall(r"(\w+)=(\S*)", line))
        if not rec:
            continue
        key = rec["JobId"]
        if rec.get("ArrayJobId") and rec.get("ArrayTaskId") and "[" not in rec.get("ArrayTaskId", ""):
            key = f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}"
        out[key] = rec
    return out


# A few seconds, not "now": slurmd revokes the previous run's job credential at the requeue,
# with one-second resolution, so a restart in the same second is killed ("Killing
# non-startable batch JobId=N: Job credential revoked") and the job ends FAILED.
RESTART_SOON = "StartTime=now+3"


def wait_jobs(job_ids: Iterable[str], timeout: float = JOB_TIMEOUT,
              on_pending_requeue: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, str]]:
    """Wait until every job (and array task) has ended; requeued jobs are started within seconds.

    A requeued job waits ~2 minutes (BeginTime) before it may run again; ``on_pending_requeue``
    (default: ``scontrol update`` with :data:`RESTART_SOON`) shortens that.
    """
    ids = [str(j) for j in job_ids]
    deadline = time.time() + timeout
    restarted: set = set()
    while True:
        recs = {}
        for j in ids:
            recs.update(job_records(j))
        active = {k: r for k, r in recs.items() if r.get("JobState") not in FINAL}
        for k, r in active.items():
            # once per requeue: StartTime=now+3 sent every second would never arrive
            if (r.get("JobState") == "PENDING" and r.get("Reason") == "BeginTime"
                    and (k, r.get("Restarts")) not in restarted):
                restarted.add((k, r.get("Restarts")))
                (on_pending_requeue or (lambda jid: subprocess.run(
                    ["scontrol", "update", f"JobId={jid}", RESTART_SOON], check=False)))(r["JobId"])
        if recs and not active:
            return recs
        if time.time() > deadline:
            subprocess.run(["scancel", *ids], check=False)
            raise AssertionError(f"jobs {ids} still active after {timeout} s: "
                                 + "; ".join(f"{k} {r.get('JobState')} {r.get('Reason')}" for k, r in recs.items()))
        time.sleep(1)


def logs(sweep: Path, tail: Optional[int] = 4000) -> str:
    """The sweep's job logs, each cut to its last ``tail`` characters (None: whole, for assertions)."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail if tail else 0:]}"
                     for p in sorted((sweep / "logs").glob("*")))
