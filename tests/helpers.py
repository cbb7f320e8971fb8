"""Shared test utilities: tiny models, deterministic adapter perturbation, torchrun launch,
the tiny pretrained base of the end-to-end fine-tuning tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import torch

from tiedlora.config import compose, to_object
from tiedlora.models.gpt import ModelConfig, ParallelConfig, build_gpt_model
from tiedlora.peft import PeftConfig, adapter_state_dict, apply_peft, load_adapter_state_dict

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5", "tl6", "tl7"]
ALL_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# Threads of every process a numerical test starts (torchrun workers, fine-tuning runs) and
# of the reference computed inside pytest: TIEDLORA_TEST_THREADS=2 runs them all with 2.
TEST_THREADS = int(os.environ.get("TIEDLORA_TEST_THREADS", "1"))
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
            vocab_size=256, make_vocab_size_divisible_by=128, seq_length=64)


def tiny_model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def preset(name: str, **overrides) -> PeftConfig:
    """A preset exactly as composed from conf/peft/<name>.yaml, plus overrides."""
    ov = [f"peft={name}"] + [f"peft.{k}={v}" for k, v in overrides.items()]
    return to_object(compose("params", ov)).peft


def targets_override(targets) -> str:
    return "[" + ",".join(targets) + "]"


def build(peft_cfg: PeftConfig, model_cfg: ModelConfig | None = None,
          parallel: ParallelConfig | None = None):
    model = build_gpt_model(model_cfg or tiny_model_cfg(), parallel or ParallelConfig())
    return apply_peft(model, peft_cfg)


def perturb(model, seed: int = 0, scale: float = 0.2) -> dict:
    """Give every adapter tensor deterministic non-zero values (same at every TP size)."""
    full = adapter_state_dict(model)
    new = {}
    for name, t in full.items():
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
        new[name] = torch.randn(t.shape, generator=g) * scale + (1.0 if name.endswith((".u", ".v")) else 0.0)
    load_adapter_state_dict(model, new)
    return new


def batch(vocab: int = 256, b: int = 2, s: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s + 1), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    return ids[:, :-1].contiguous(), pos, ids[:, 1:].contiguous()


def run_torchrun(script: str, nproc: int, out: Path, *args: str, timeout: int = 300) -> dict:
    """Run tests/dist/<script> under torchrun (gloo, CPU); return rank 0's JSON/pt output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "PYTHONWARNINGS": "ignore"}
    from tiedlora.dist import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(ROOT / "tests" / "dist" / script), str(out), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{script} (nproc={nproc}) failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return torch.load(out, weights_only=True) if out.suffix == ".pt" else json.loads(out.read_text())


# ------------------------------------------------------------ tiny pretrained base
TINY_PRETRAIN = dict(corpus_sentences=3000, vocab_size=400, seq_length=64, batch_size=8, steps=120,
                     lr=1e-2, min_lr=1e-3, warmup=10)


def build_tiny_base(d: Path, pretrain: dict = TINY_PRETRAIN, extra_env: dict | None = None,
                    check_learned: bool = True) -> dict:
    """A tiny base pretrained on the generated corpus (the mini-base builder, ``pretrain``
    settings), built into ``d/base``; sets ``TIEDLORA_CACHE`` (task data) to ``d/cache`` for
    this process too. ``check_learned``: assert the pretraining loss fell well below uniform
    (needs the default 120 steps).

    Returns ``{"env": subprocess environment, "tokenizer", "base": paths, "dir": d, "info": info.json}``.
    """
    import dataclasses

    e = {**os.environ, "TIEDLORA_CACHE": str(d / "cache"), "OMP_NUM_THREADS": "1",
         "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    cfg = tiny_model_cfg(vocab_size=512)
    base = d / "base"
    code = ("import json, sys; from tiedlora import mini_base; from tiedlora.config import ModelConfig; "
            "mini_base.build(ModelConfig(**json.loads(sys.argv[1])), "
            "mini_base.PretrainSettings(**json.loads(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg)), json.dumps(pretrain),
                    str(base)], env=e, check=True, capture_output=True, timeout=600)
    os.environ["TIEDLORA_CACHE"] = e["TIEDLORA_CACHE"]
    info = json.loads((base / "info.json").read_text())
    if check_learned:
        assert info["final_loss"] < 4.0, info  # it learned something (uniform would be ln 400 = 6.0)
    return {"env": e, "tokenizer": str(base / "tokenizer.model"), "base": str(base / "base.safetensors"),
            "dir": d, "info": info}


def tiny_base_args(base: dict) -> list:
    """Hydra overrides that point ``python -m tiedlora.finetune`` at the tiny base."""
    return ["model=tiny", f"model.checkpoint={base['base']}", f"model.tokenizer={base['tokenizer']}"]


class HeldLock:
    """Another process holding ``folder``'s run lock as a running fine-tune does, with the
    Slurm variables given (e.g. ``SLURM_JOB_ID="12"``) instead of this process's; ``pid`` is its pid."""

    def __init__(self, folder: Path, env: dict, **slurm: str):
        code = ("import sys; from tiedlora.files import lock_run_dir; held = lock_run_dir(sys.argv[1]); "
                "print('held', flush=True); sys.stdin.read()")
        env = {**{k: v for k, v in env.items() if not k.startswith("SLURM_")}, **slurm}
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

