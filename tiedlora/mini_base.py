"""The embedded CPU base model: a few-million-parameter GPT pretrained on generated text.

``model=mini`` sets ``model.checkpoint: builtin:mini``. On first use the base is built
here — a SentencePiece tokenizer trained on the generated corpus
(:func:`tiedlora.data.mini_tasks.pretraining_corpus`), then full-parameter pretraining
of the GPT on packed corpus text — and cached under
``$TIEDLORA_CACHE/mini_base/<hash>/`` (``base.safetensors``, ``tokenizer.model``,
``info.json``). The hash covers the architecture, the pretraining settings and the
corpus generator's source, so changing any of them builds a new base. The corpus never contains a task
instance, so fine-tuning starts from a model that has never seen the task formats.

Run by hand (it is also run automatically, once)::

    python -m tiedlora.mini_base            # build (or report) the cached base
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN = "builtin:mini"
VERSION = 1


@dataclass(frozen=True)
class PretrainSettings:
    corpus_sentences: int = 60000
    corpus_seed: int = 0
    vocab_size: int = 1024
    seq_length: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0


SETTINGS = PretrainSettings()


def _arch(model_cfg) -> dict:
    d = dataclasses.asdict(model_cfg)
    for k in ("name", "checkpoint", "tokenizer", "params_dtype"):
        d.pop(k, None)
    return d


def _corpus_fingerprint() -> str:
    """Hash of the corpus generator's source: any change to the generated text rebuilds."""
    from tiedlora.data import mini_tasks

    return hashlib.sha256(Path(mini_tasks.__file__).read_bytes()).hexdigest()[:16]


def cache_dir(model_cfg, settings: PretrainSettings = SETTINGS) -> Path:
    from tiedlora.tasks import cache_root

    key = json.dumps({"v": VERSION, "arch": _arch(model_cfg), "pretrain": dataclasses.asdict(settings),
                      "corpus": _corpus_fingerprint()}, sort_keys=True)
    return cache_root() / "mini_base" / hashlib.sha256(key.encode()).hexdigest()[:16]


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(model_cfg) -> tuple[Path, Path]:
    """(base.safetensors, tokenizer.model) of the mini base, building it once if needed.

    Safe under concurrency: processes on one machine serialise on a lock file; the
    build runs in a child process (single-process megatron state of its own).
    """
    d = cache_dir(model_cfg)
    weights, tok = d / "base.safetensors", d / "tokenizer.model"
    if (d / "info.json").is_file():
        return weights, tok
    with _lock(d.parent / f"{d.name}.lock"):
        if not (d / "info.json").is_file():
            print(f"[tiedlora] building the embedded mini base model once (cached in {d}) ...",
                  flush=True)
            cfg_json = json.dumps(dataclasses.asdict(model_cfg))
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
            subprocess.run([sys.executable, "-m", "tiedlora.mini_base", "--build", cfg_json],
                           check=True, env=env)
    return weights, tok


def _packed_batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    n = (ids.numel() - 1) // seq
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen) * seq
        x = torch.stack([ids[s:s + seq] for s in starts])
        y = torch.stack([ids[s + 1:s + seq + 1] for s in starts])
        yield x, y


def build(model_cfg, settings: PretrainSettings = SETTINGS) -> Path:
    """Tokenizer + pretraining; writes the cache directory atomically (rename at the end)."""
    import shutil
    import tempfile

    from tqdm import tqdm

    from tiedlora.data.mini_tasks import pretraining_corpus
    from tiedlora.data.tokenizers import train_sentencepiece
    from tiedlora.dist import init_distributed, shutdown
    from tiedlora.models.gpt import ParallelConfig, build_gpt_model
    from tiedlora.models.io import save_base

    final = cache_dir(model_cfg, settings)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    t0 = time.time()
    corpus = pretraining_corpus(settings.corpus_sentences, settings.corpus_seed)
    tok = train_sentencepiece(corpus, tmp / "tokenizer", settings.vocab_size)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces > model.vocab_size={model_cfg.vocab_size}")
    ids = []
    for line in corpus:
        ids.extend(tok.encode(line) + [tok.eos_id])
    ids = torch.tensor(ids, dtype=torch.long)

    init_distributed(ParallelConfig(), seed=settings.seed)
    model = build_gpt_model(model_cfg)
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(settings.seed)
    batches = _packed_batches(ids, settings.seq_length, settings.batch_size, gen)
    pos = torch.arange(settings.seq_length).unsqueeze(0).expand(settings.batch_size, -1)
    tty = sys.stderr.isatty()
    bar = tqdm(range(settings.steps), desc="pretrain mini base", dynamic_ncols=True, disable=not tty)
    loss_val = float("nan")
    for step in bar:
        if step < settings.warmup:
            lr = settings.lr * (step + 1) / settings.warmup
        else:
            p = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
            lr = settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * p))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(batches)
        loss = model(x, pos, None, labels=y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_val = loss.item()
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.1e}", refresh=False)
        if not tty and ((step + 1) % 50 == 0 or step + 1 == settings.steps):
            print(f"pretrain mini base: step {step + 1}/{settings.steps} loss={loss_val:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    info = {"version": VERSION, "arch": _arch(model_cfg), "pretrain": dataclasses.asdict(settings),
            "final_loss": loss_val, "tokens": int(ids.numel()),
            "parameters": sum(p.numel() for p in params), "seconds": round(time.time() - t0, 1)}
    save_base(tmp / "base.safetensors", [model], {"name": model_cfg.name, **info["arch"]})
    shutdown()
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    print(f"[tiedlora] mini base ready: {info['parameters']:,} parameters, final loss "
          f"{loss_val:.3f}, {info['seconds']} s -> {final}", flush=True)
    return final


def main() -> None:
    from tiedlora.models.gpt import ModelConfig

    if len(sys.argv) == 3 and sys.argv[1] == "--build":
        build(ModelConfig(**json.loads(sys.argv[2])))
        return
    from tiedlora.config import compose, to_object

    cfg = to_object(compose("finetune", ["model=mini"] + sys.argv[1:])).model
    weights, tok = ensure(cfg)
    print(f"mini base: {weights}\ntokenizer: {tok}\n{(weights.parent / 'info.json').read_text()}")


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
