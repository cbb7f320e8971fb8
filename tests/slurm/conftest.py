"""Fixtures for the tests against a real Slurm (marker `slurm`; run them with .ci/slurm-tests).

The cluster is the one-node loopback cluster of .ci/slurm/start.sh. A session fixture builds a
tiny base model (tokenizer + a few pretraining steps) that every job fine-tunes on CPU/gloo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

TINY_PRETRAIN = dict(corpus_sentences=3000, vocab_size=400, seq_length=64, batch_size=8, steps=10,
                     lr=1e-2, min_lr=1e-3, warmup=2)
TINY_TASK = ["task=mini_qa", "task.num_train=64", "task.num_validation=16", "task.num_test=8",
             "task.max_length=64", "task.max_new_tokens=4"]
FAST = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.val_check_interval=0",
        "eval.before=false", "eval.limit=4", "optim.warmup_steps=2", "checkpoint.every_n_steps=0"]
JOB_TIMEOUT = 240  # seconds a test waits for its jobs (a tiny job takes ~15-40 s on 2 cores)


@pytest.fixture(scope="session")
def cluster():
    """The running test cluster; fails (does not skip) when there is none."""
    if shutil.which("sbatch") is None:
        pytest.fail("no sbatch on PATH: start the test cluster with .ci/slurm/start.sh")
    res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if res.returncode != 0 or "UP" not in res.stdout:
        pytest.fail(f"slurmctld is not answering ({res.stdout.strip()} {res.stderr.strip()}): .ci/slurm/start.sh")
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    return {"cpus": cpus}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, cluster):
    """A tiny pretrained base (tests/test_finetune.py's approach, fewer steps) and the jobs' env."""
    from tiedlora import mini_base
    from helpers import tiny_model_cfg

    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "TIEDLORA_CACHE": str(d / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    cfg = tiny_model_cfg(vocab_size=512)
    code = ("import json, sys; from tiedlora import mini_base; from tiedlora.models.gpt import ModelConfig; "
            "mini_base.build(ModelConfig(**json.loads(sys.argv[1])), mini_base.PretrainSettings(**json.loads(sys.argv[2])))")
    import dataclasses

    subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg)), json.dumps(TINY_PRETRAIN)],
                   env=env, check=True, capture_output=True, timeout=600)
    os.environ["TIEDLORA_CACHE"] = env["TIEDLORA_CACHE"]
    base = mini_base.cache_dir(cfg, mini_base.PretrainSettings(**TINY_PRETRAIN))
    model = ["model=tiny", f"model.checkpoint={base / 'base.safetensors'}",
             f"model.tokenizer={base / 'tokenizer.model'}"]
    return {"env": env, "dir": d, "model": model, "args": [*model, *TINY_TASK, *FAST]}


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


def wait_jobs(job_ids: Iterable[str], timeout: float = JOB_TIMEOUT,
              on_pending_requeue: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, str]]:
    """Wait until every job (and array task) has ended; requeued jobs are started at once.

    A requeued job waits ~2 minutes (BeginTime) before it may run again; ``on_pending_requeue``
    (default: ``scontrol update StartTime=now``) shortens that.
    """
    ids = [str(j) for j in job_ids]
    deadline = time.time() + timeout
    while True:
        recs = {}
        for j in ids:
            recs.update(job_records(j))
        active = {k: r for k, r in recs.items() if r.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING",
                                                                          "COMPLETING", "REQUEUED", "SUSPENDED")}
        for k, r in active.items():
            if r.get("JobState") == "PENDING" and r.get("Reason") == "BeginTime":
                (on_pending_requeue or (lambda jid: subprocess.run(
                    ["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=False)))(r["JobId"])
        if recs and not active:
            return recs
        if time.time() > deadline:
            subprocess.run(["scancel", *ids], check=False)
            raise AssertionError(f"jobs {ids} still active after {timeout} s: "
                                 + "; ".join(f"{k} {r.get('JobState')} {r.get('Reason')}" for k, r in recs.items()))
        time.sleep(1)


def logs(sweep: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                     for p in sorted((sweep / "logs").glob("*")))
