"""Distributed kill-and-resume through the real entry point.

``torchrun --nproc_per_node 2 -m tiedlora.finetune`` at PP=2 x VPP=2 (tl6 on all four
targets, adapter dropout on, so the RNG states must be restored too) is SIGKILLed mid-run,
rerun with the same command, and must end with exactly the losses and adapter of an
uninterrupted run (bit-exact on CPU). Three torchrun launches, 2 processes each (gloo).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ALL_TARGETS, ROOT, TEST_THREADS, targets_override, tiny_model_cfg

pytestmark = pytest.mark.numerics  # tests/numerics.py; run under other CPU kernels by .ci/numerics-tests

MAX_STEPS = 10
EVERY = 3  # checkpoint every EVERY steps
KILL_AFTER = 5  # metric lines seen before the SIGKILL (so at least one checkpoint exists)
LAYOUT = ["parallel.pp=2", "parallel.vpp=2"]
ARGS = ["peft=tl6", f"peft.target_modules={targets_override(ALL_TARGETS)}", "peft.dropout=0.1",
        "task=mini_qa", "task.num_train=64", "task.num_validation=16", "task.num_test=8",
        "task.max_length=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
        f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=0", "eval.before=false",
        "eval.after=false", "optim.warmup_steps=2", "optim.lr=3e-3",
        f"checkpoint.every_n_steps={EVERY}", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mp1):
    """A SentencePiece tokenizer and a random 4-layer base file (layout-independent)."""
    from tiedlora.data.mini_tasks import pretraining_corpus
    from tiedlora.data.tokenizers import train_sentencepiece
    from tiedlora.dist import set_seed
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.convert.base_file import save_base

    d = tmp_path_factory.mktemp("resume")
    train_sentencepiece(pretraining_corpus(1000), d / "tok", 400)
    set_seed(0)
    save_base(d / "base.safetensors", [build_gpt_model(tiny_model_cfg(num_layers=4, vocab_size=512))],
              {"name": "tiny"})
    env = {**os.environ, "TIEDLORA_CACHE": str(d / "cache"), "OMP_NUM_THREADS": str(TEST_THREADS),
           "PYTHONWARNINGS": "ignore"}
    model = ["model=tiny", "model.num_layers=4", f"model.checkpoint={d / 'base.safetensors'}",
             f"model.tokenizer={d / 'tok.model'}"]
    return {"dir": d, "env": env, "model": model}


def _cmd(setup, out: Path) -> list:
    from tiedlora.dist import _free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), "-m", "tiedlora.finetune",
            *setup["model"], *ARGS, *LAYOUT, f"output_dir={out}"]


def _run(setup, out: Path) -> str:
    res = subprocess.run(_cmd(setup, out), cwd=ROOT, env=setup["env"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res.stdout


def _records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _children(pid: int) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:  # a zombie (state Z) is dead; it is just not reaped by its new parent yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _same_trajectory(records: list) -> list:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records]


@pytest.mark.slow  # fresh processes, a 2-rank torchrun killed and resumed: run by .ci/run (make test-slow)
@pytest.mark.dist
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_torchrun_resumes_with_the_same_losses(setup):
    ref_dir, run_dir = setup["dir"] / "uninterrupted", setup["dir"] / "killed"
    _run(setup, ref_dir)

    proc = subprocess.Popen(_cmd(setup, run_dir), cwd=ROOT, env=setup["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= KILL_AFTER:
            break
        time.sleep(0.02)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)  # the launcher only, as `kill -9 <torchrun>` would
    proc.wait()
    # torchrun starts its workers in sessions of their own: they must die with it
    # (tiedlora.dist.die_with_launcher), or they would go on writing into run_dir.
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    orphans = [w for w in workers if _alive(w)]
    for w in orphans:
        os.kill(w, signal.SIGKILL)
    assert len(workers) == 2 and not orphans, f"workers {orphans} outlived their torchrun"

    before = _records(run_dir)
    assert KILL_AFTER <= len(before) < MAX_STEPS, "run finished before it could be killed"
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert saved % EVERY == 0 and EVERY <= saved <= len(before)

    stdout = _run(setup, run_dir)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved:07d}'} at step {saved}" in stdout
    after, ref = _records(run_dir), _records(ref_dir)
    assert _same_trajectory(after) == _same_trajectory(ref)  # bit-exact
    assert _same_trajectory(after[:len(before)]) == _same_trajectory(before)  # redone steps too
    from tiedlora.checkpoint import load_adapter

    a, _, _ = load_adapter(ref_dir / "adapter.safetensors")
    b, _, _ = load_adapter(run_dir / "adapter.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("tied.") for k in a)
