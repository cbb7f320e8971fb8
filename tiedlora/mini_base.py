"""The embedded CPU base model: a few-million-parameter GPT pretrained on generated text.

``model=mini`` sets ``model.checkpoint: builtin:mini``, which loads the base shipped with
the package in ``tiedlora/assets/mini_base/``:

    base.safetensors   the weights (fp32, tiedlora-base/1 format)
    tokenizer.model    a SentencePiece tokenizer trained on the generated corpus
    info.json          architecture, pretraining settings, the generator's fingerprint
                       (sha256 of the corpus text), final loss, and each file's sha256

Shipping the weights (instead of pretraining on each machine) makes the base identical
everywhere: pretraining sums floats in an order that depends on the CPU's kernels, so
bases pretrained on two machines differ, and so do the fine-tuning results built on them.

The generator is kept here and can rebuild the files: a SentencePiece tokenizer trained on
:func:`tiedlora.data.mini_tasks.pretraining_corpus`, then full-parameter pretraining of
the GPT on packed corpus text (``SETTINGS``; ~5 min on 2 idle CPU cores). The corpus never
contains a task instance, so fine-tuning starts from a model that has never seen the task
formats. A rebuild on another machine gives a base of the same quality but not the same
bits; commit the new files and the README's demo numbers together.

    python -m tiedlora.mini_base                 # rebuild into tiedlora/assets/mini_base/
    python -m tiedlora.mini_base --out DIR       # build elsewhere (then model.checkpoint=DIR/base.safetensors
                                                 #   model.tokenizer=DIR/tokenizer.model)
    python -m tiedlora.mini_base --check         # verify the shipped files and the generator
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tiedlora import compat
from tiedlora.files import to_json

BUILTIN = "builtin:mini"
VERSION = 2
ASSETS = Path(__file__).resolve().parent / "assets" / "mini_base"
WEIGHTS, TOKENIZER, INFO = "base.safetensors", "tokenizer.model", "info.json"


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


class MiniBaseError(ValueError):
    """The shipped (or a rebuilt) mini base is missing, corrupt or does not fit the config."""


def _arch(model_cfg) -> dict:
    """The fields that decide the weights' shapes and meaning (not how they are computed:
    attention kernel and activation recomputation are free to change)."""
    d = dataclasses.asdict(model_cfg)
    for k in ("name", "checkpoint", "tokenizer", "params_dtype", "attention_backend",
              "recompute_granularity", "recompute_method", "recompute_num_layers"):
        d.pop(k, None)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corpus_fingerprint(settings: PretrainSettings = SETTINGS) -> str:
    """sha256 of the pretraining text the generator produces for ``settings``.

    It changes exactly when the generated corpus changes (not on edits that leave the text
    alone), which is when the shipped base no longer matches its generator.
    """
    from tiedlora.data.mini_tasks import pretraining_corpus

    h = hashlib.sha256()
    for line in pretraining_corpus(settings.corpus_sentences, settings.corpus_seed):
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def read_info(d: Path = ASSETS) -> dict:
    path = Path(d) / INFO
    if not path.is_file():
        if Path(d).resolve() == ASSETS:
            raise MiniBaseError(
                f"{path}: missing, so the package's mini base is not installed. Reinstall tiedlora "
                "(the package ships it), or rebuild it with `python -m tiedlora.mini_base`")
        raise MiniBaseError(f"{path}: missing, so {d} holds no mini base "
                            f"(build one with `python -m tiedlora.mini_base --out {d}`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MiniBaseError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e


def verify(d: Path = ASSETS, info: dict | None = None) -> dict:
    """Check each file of the base in ``d`` against the sha256 recorded in its info.json."""
    d = Path(d)
    info = read_info(d) if info is None else info
    for name in (WEIGHTS, TOKENIZER):
        want = info.get("files", {}).get(name)
        path = d / name
        if want is None:
            raise MiniBaseError(f"{d / INFO}: field files.{name} missing (no recorded sha256)")
        if not path.is_file():
            raise MiniBaseError(f"{path}: missing (reinstall tiedlora or rebuild: python -m tiedlora.mini_base)")
        got = _sha256(path)
        if got != want:
            raise MiniBaseError(
                f"{path}: sha256 {got[:16]}... differs from {d / INFO} files.{name}={want[:16]}... "
                "(a partial download, a Git LFS pointer or an edited file); reinstall tiedlora or "
                "rebuild with `python -m tiedlora.mini_base`")
    return info


def shipped(model_cfg, d: Path = ASSETS) -> tuple[Path, Path]:
    """(base.safetensors, tokenizer.model) of the shipped mini base, checked against
    ``model_cfg``'s architecture and the recorded checksums. Reads nothing else, writes
    nothing, trains nothing."""
    d = Path(d)
    info = verify(d)
    arch = _arch(model_cfg)
    for k, want in info["arch"].items():
        if arch.get(k) != want:
            raise MiniBaseError(
                f"model.{k}={arch.get(k)!r}, but the shipped mini base ({d / INFO}) has {k}={want!r}. "
                "Keep conf/model/mini.yaml's architecture, or train another base with "
                "`python -m tiedlora.mini_base --out DIR` and point model.checkpoint and "
                "model.tokenizer at its files")
    return d / WEIGHTS, d / TOKENIZER


def _packed_batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    n = (ids.numel() - 1) // seq
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen) * seq
        x = torch.stack([ids[s:s + seq] for s in starts])
        y = torch.stack([ids[s + 1:s + seq + 1] for s in starts])
        yield x, y


def build(model_cfg, settings: PretrainSettings = SETTINGS, out: Path = ASSETS) -> Path:
    """Tokenizer + pretraining into ``out`` (replaced atomically: written next to it, then
    renamed). Runs megatron single-process; call it in a process of its own."""
    import shutil
    import tempfile

    from tqdm import tqdm

    from megatron.core import __version__ as mcore_version

    from tiedlora.data.mini_tasks import pretraining_corpus
    from tiedlora.data.tokenizers import train_sentencepiece
    from tiedlora.dist import init_distributed, shutdown
    from tiedlora.config import ParallelConfig
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.convert.base_file import save_base

    final = Path(out).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    t0 = time.time()
    corpus = pretraining_corpus(settings.corpus_sentences, settings.corpus_seed)
    tok = train_sentencepiece(corpus, tmp / "tokenizer", settings.vocab_size)
    (tmp / "tokenizer.vocab").unlink(missing_ok=True)  # human-readable copy; not shipped
    if tok.vocab_size > model_cfg.vocab_size:
        raise MiniBaseError(f"tokenizer has {tok.vocab_size} pieces > model.vocab_size={model_cfg.vocab_size}")
    ids = []
    for line in corpus:
        ids.extend(tok.encode(line) + [tok.eos_id])
    ids = torch.tensor(ids, dtype=torch.long)

    compat.install()  # CPU machines: megatron-core's CUDA-only calls go to the CPU
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
    save_base(tmp / WEIGHTS, [model], {"name": model_cfg.name, **_arch(model_cfg)})
    shutdown()
    info = {"version": VERSION, "arch": _arch(model_cfg), "pretrain": dataclasses.asdict(settings),
            "generator": {"corpus_sha256": corpus_fingerprint(settings),
                          "corpus": "tiedlora.data.mini_tasks.pretraining_corpus"},
            "final_loss": loss_val, "tokens": int(ids.numel()),
            "parameters": sum(p.numel() for p in params), "seconds": round(time.time() - t0, 1),
            "built_with": {"torch": torch.__version__, "megatron_core": mcore_version,
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "threads": torch.get_num_threads()},
            "files": {name: _sha256(tmp / name) for name in (WEIGHTS, TOKENIZER)}}
    (tmp / INFO).write_text(to_json(info, indent=2) + "\n", encoding="utf-8")
    tmp.chmod(0o755)  # mkdtemp makes it private; the files are package data, readable by all
    for name in (WEIGHTS, TOKENIZER, INFO):
        (tmp / name).chmod(0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    print(f"[tiedlora] mini base built: {info['parameters']:,} parameters, final loss "
          f"{loss_val:.3f}, {info['seconds']} s -> {final}", flush=True)
    return final


def check(d: Path = ASSETS, settings: PretrainSettings | None = None) -> dict:
    """Verify the files in ``d`` and that the generator still produces the recorded corpus."""
    info = verify(d)
    settings = settings or PretrainSettings(**info["pretrain"])
    want = info.get("generator", {}).get("corpus_sha256")
    got = corpus_fingerprint(settings)
    if got != want:
        raise MiniBaseError(
            f"{Path(d) / INFO}: generator.corpus_sha256={str(want)[:16]}..., but "
            f"tiedlora.data.mini_tasks.pretraining_corpus now produces {got[:16]}...: the corpus "
            "generator changed since the base was built. Rebuild it (python -m tiedlora.mini_base) "
            "and update the README's demo numbers, or revert the generator change")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tiedlora.mini_base",
        description="Rebuild the embedded mini base (tokenizer + pretraining, ~5 min on 2 idle CPU "
                    "cores) or check the shipped one.")
    ap.add_argument("--out", type=Path, default=ASSETS, help=f"output folder (default: {ASSETS})")
    ap.add_argument("--check", action="store_true",
                    help="verify the files in --out against info.json and the generator; build nothing")
    args = ap.parse_args(argv)
    if args.check:  # a mismatch raises MiniBaseError (a ValueError): one message, status 2
        info = check(args.out)
        print(f"mini base in {args.out}: files match info.json; the generator still produces "
              f"corpus {info['generator']['corpus_sha256'][:16]}...; {info['parameters']:,} "
              f"parameters, final pretraining loss {info['final_loss']:.3f}")
        return 0
    from tiedlora.config import compose, to_object

    cfg = to_object(compose("finetune", ["model=mini"])).model
    build(cfg, SETTINGS, args.out)
    return 0

if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
