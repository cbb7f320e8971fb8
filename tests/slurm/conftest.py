"""Fixtures for the tests against a real Slurm (marker `slurm`; run them with .ci/slurm-tests).

The cluster is the one-node loopback cluster of .ci/slurm/start.sh. A session fixture builds a
tiny base model (tokenizer + a few pretraining steps) that every job fine-tunes on CPU/gloo.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

TINY_PRETRAIN = dict(corpus_sentences=3000, vocab_size=400, seq_length=64, batch_size=8, steps=10,
                     lr=1e-2, min_lr=1e-3, warmup=2)
TINY_TASK = ["task=mini_qa", "task.num_train=64", "task.num_validation=16", "task.num_test=8",
             "task.max_length=64", "task.max_new_tokens=4"]
FAST = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.val_check_interval=0",
        "eval.before=false", "eval.limit=4", "optim.warmup_steps=2", "checkpoint.every_n_steps=0"]


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
    from helpers import build_tiny_base, tiny_base_args

    d = tmp_path_factory.mktemp("slurm")
    b = build_tiny_base(d, pretrain=TINY_PRETRAIN, extra_env={"PYTHONUNBUFFERED": "1"}, check_learned=False)
    env, model = b["env"], tiny_base_args(b)
    return {"env": env, "dir": d, "model": model, "args": [*model, *TINY_TASK, *FAST]}
