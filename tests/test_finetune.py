"""The fine-tuning recipe end to end on the tiny model (CPU, subprocesses, random-init base).

Each test runs ``python -m tiedlora.finetune`` as a user would; a session fixture trains a
small SentencePiece tokenizer and points TIEDLORA_CACHE at a temporary folder.
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

from helpers import PRESETS, ROOT, tiny_base_args

TINY_TASK = ["task=mini_qa", "task.num_train=64", "task.num_validation=16", "task.num_test=8",
             "task.max_length=64", "task.max_new_tokens=4"]
MANY_STEPS = 100_000  # a run meant to be stopped by a signal, never to finish
FAST = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.val_check_interval=0",
        "eval.before=false", "eval.after=false", "optim.warmup_steps=2", "optim.lr=3e-3"]


@pytest.fixture(scope="session")
def env(tiny_base):
    """A tiny base pretrained on the generated corpus (shared: tests/conftest.py)."""
    return tiny_base


def finetune(env, *args, check=True, timeout=600):
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    args = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "tiedlora.finetune", *flags, *base_args(env), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def base_args(env):
    return [*tiny_base_args(env), *TINY_TASK]


def losses(out_dir: Path):
    return [json.loads(l)["loss"] for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_every_preset_and_comparison_table(env):
    out = env["dir"] / "presets"
    res = finetune(env, "-m", f"peft={','.join(PRESETS)}", "trainer.max_steps=2", *FAST,
                   f"output_dir={out}/${{peft.name}}", "eval.after=true", "eval.limit=4")
    for name in PRESETS:
        d = out / name
        ls = losses(d)
        assert len(ls) == 2 and all(torch.isfinite(torch.tensor(ls))), (name, ls)
        rec = json.loads((d / "metrics.jsonl").read_text().splitlines()[0])
        assert {"step", "loss", "lr"} <= set(rec)
        r = json.loads((d / "results.json").read_text())
        assert r["preset"] == name and r["steps"] == 2 and "exact_match" in r["metrics"]
        assert (d / "adapter.safetensors").is_file()
        assert list((d / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    # the multirun prints one table row per preset
    table = res.stdout[res.stdout.rindex("preset"):]
    for name in PRESETS:
        assert f" {name} " in table


def _toy_task(d: Path) -> list:
    """A toy task a random base can learn fast: a fixed answer after a varying prompt."""
    import random

    rng = random.Random(0)
    words = "red blue green cat dog fox lamp boat kite drum".split()
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 64), ("validation", 16), ("test", 8)):
        lines = [json.dumps({"input": " ".join(rng.choices(words, k=6)), "output": "the answer is blue"})
                 for _ in range(n)]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return [f"task.data_dir={d}", "task.generator=null", "task.name=toy"]


def test_loss_decreases_over_30_steps(env):
    out = env["dir"] / "decrease"
    toy = _toy_task(env["dir"] / "toy")
    finetune(env, "-m", "peft=lora,tl6", "trainer.max_steps=30", *FAST, *toy, "optim.lr=1e-2",
             "peft.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]",
             f"output_dir={out}/${{peft.name}}")
    for name in ("lora", "tl6"):
        ls = losses(out / name)
        first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
        assert last < 0.5 * first, (name, first, last)


@pytest.mark.parametrize("packing", [  # unpacked: run by .ci/run (make test-slow)
    pytest.param(False, marks=pytest.mark.slow), True], ids=["unpacked", "packed"])
def test_kill_and_resume_is_bit_exact(env, packing):
    common = ["peft=tl6", "trainer.max_steps=12", "checkpoint.every_n_steps=4", *FAST,
              f"data.packing={str(packing).lower()}"]
    ref_dir, run_dir = env["dir"] / f"uninterrupted_{packing}", env["dir"] / f"killed_{packing}"
    finetune(env, *common, f"output_dir={ref_dir}")
    cmd = [sys.executable, "-m", "tiedlora.finetune", *base_args(env), *common, f"output_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, latest = run_dir / "metrics.jsonl", run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    # kill as soon as the first checkpoint is committed (``latest`` is written atomically). How
    # many steps run before the kill lands depends on the machine's speed and load, so the test
    # accepts either checkpoint before the last: what it checks is the resume from it.
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(metrics.read_text().splitlines()) < 12, \
        "run finished before it could be killed"
    saved = latest.read_text().strip()
    assert saved in ("step_0000004", "step_0000008"), saved
    res = finetune(env, *common, f"output_dir={run_dir}")
    assert f"resumed from {run_dir / 'checkpoints' / saved} at step {int(saved[5:])}" in res.stdout
    assert losses(run_dir) == losses(ref_dir)  # bit-exact on CPU
    from tiedlora.checkpoint import load_adapter

    a, _, _ = load_adapter(ref_dir / "adapter.safetensors")
    b, _, _ = load_adapter(run_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_0000008", "step_0000012"]  # keep_last=2
    # every step and the run report their padding and useful-token throughput
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["padding_fraction"] < 1 and r["tokens_per_s"] > 0 for r in records)
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["padding_fraction"] < 1 and results["tokens_per_s"] > 0


def test_preemption_signal_checkpoints_and_exits_for_requeue(env):
    # the run stops at the signal, so its length costs nothing: make it too long to end first on any machine
    common = ["peft=lora", f"trainer.max_steps={MANY_STEPS}", "checkpoint.every_n_steps=0", *FAST]
    out = env["dir"] / "preempt"
    cmd = [sys.executable, "-m", "tiedlora.finetune", *base_args(env), *common, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, stdout[-2000:]
    step = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= step < MANY_STEPS and f"checkpoint saved at step {step}" in stdout


@pytest.mark.slow  # fresh processes, three runs: run by .ci/run (make test-slow)
def test_loading_adapter_of_another_preset_fails_clearly(env):
    out = env["dir"] / "mismatch"
    finetune(env, "peft=tl6", "trainer.max_steps=2", *FAST, f"output_dir={out}")
    res = finetune(env, "peft=lora", "trainer.max_steps=4", *FAST, f"output_dir={out}", check=False)
    assert res.returncode != 0
    assert "saved with preset 'tl6' and cannot be loaded into preset 'lora'" in res.stderr
    res = finetune(env, "peft=tl6", "peft.rank=4", "trainer.max_steps=4", *FAST, f"output_dir={out}", check=False)
    assert "rank 8 != 4" in res.stderr


def test_evaluate_command_reproduces_results(env):
    out = env["dir"] / "evalcmd"
    finetune(env, "peft=tl6", "trainer.max_steps=3", *FAST, "eval.after=true", f"output_dir={out}")
    first = json.loads((out / "results.json").read_text())
    res = subprocess.run([sys.executable, "-m", "tiedlora.evaluate", f"output_dir={out}"], cwd=ROOT,
                         env=env["env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["metrics"] == first["metrics"] and again["preset"] == "tl6"
