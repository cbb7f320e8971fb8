"""Adapter checkpoints: safetensors files, layout-independent, written atomically.

An adapter file holds only adapter tensors, full (unsharded) and named independently of
the TP/PP layout (``tied.{target}.{A|B}``, ``layers.{i}.{target}.{A|B|u|v}``; tied factors
once), and in its safetensors metadata the adapter config::

    format       "tiedlora-adapter/1"
    peft_config  JSON of PeftConfig (preset flags, rank, alpha, targets, seed)
    model        JSON of the base model's name and shape facts
    ...          anything the caller adds (step, metrics)

A training checkpoint is a directory ``<output_dir>/checkpoints/step_XXXXXXX/`` with
``adapter.safetensors`` and ``trainer_state.safetensors`` (optimizer moments by the same
names, scheduler, step, data position and RNG states); ``checkpoints/latest`` names the
newest complete one. Every file is written to a temporary name, fsynced and renamed, and
``latest`` is updated only after the whole directory exists, so a crash at any point
leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import safe_open, save_file

from tiedlora.peft.config import FACTORS, PeftConfig

FORMAT = "tiedlora-adapter/1"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.safetensors"
_ADAPTER = f"adapter file ({FORMAT} safetensors)"


class CheckpointError(ValueError):
    pass


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync and rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def peft_to_dict(cfg: PeftConfig) -> dict:
    return dataclasses.asdict(cfg)


def peft_from_dict(d: dict) -> PeftConfig:
    d = dict(d)
    return PeftConfig(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(PeftConfig)}})


def save_adapter(path: Path, tensors: Dict[str, torch.Tensor], peft_cfg: PeftConfig,
                 model_info: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    meta = {"format": FORMAT, "peft_config": json.dumps(peft_to_dict(peft_cfg)),
            "model": json.dumps(model_info or {})}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def read_safetensors(path: Path, what: str, tensors: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file (no tensors when ``tensors=False``).

    A missing, truncated or foreign file raises :class:`CheckpointError` naming the file
    and ``what`` it should be, e.g. ``"adapter file"`` (safetensors' own errors name neither).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types (SafetensorError, OSError)
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); expected: {what}") from None
    return out, meta


def read_metadata(path: Path) -> dict:
    """The metadata of an adapter file; checks its format."""
    _, meta = read_safetensors(path, _ADAPTER, tensors=False)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format={meta.get('format')!r}, expected {FORMAT!r}")
    if "peft_config" not in meta:
        raise CheckpointError(f"{path}: no 'peft_config' in its metadata; expected: {_ADAPTER}")
    return meta


def load_adapter(path: Path) -> Tuple[Dict[str, torch.Tensor], PeftConfig, dict]:
    """(tensors, adapter config, metadata) of an adapter file; validates the format."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    meta = read_metadata(path)
    try:
        cfg = peft_from_dict(json.loads(meta["peft_config"]))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable 'peft_config' metadata ({e})") from None
    tensors, _ = read_safetensors(path, _ADAPTER)
    return tensors, cfg, meta


def load_trainer_state(path: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(optimizer/RNG tensors, trainer state dict) of a ``trainer_state.safetensors`` file."""
    what = f"trainer state file ({STATE_FILE} of a tiedlora.finetune checkpoint)"
    tensors, meta = read_safetensors(path, what)
    try:
        state = json.loads(meta["trainer"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: no readable 'trainer' metadata ({type(e).__name__}: {e}); "
                              f"expected: {what}") from None
    if not isinstance(state, dict) or "step" not in state or "sampler" not in state:
        raise CheckpointError(f"{path}: its 'trainer' metadata lacks 'step'/'sampler'; expected: {what}")
    return tensors, state


def check_compatible(saved: PeftConfig, current: PeftConfig, where: str = "adapter") -> None:
    """Refuse to load an adapter saved under another preset, rank or targets."""
    diffs = []
    if saved.rank != current.rank:
        diffs.append(f"rank {saved.rank} != {current.rank}")
    if list(saved.target_modules) != list(current.target_modules):
        diffs.append(f"target_modules {saved.target_modules} != {current.target_modules}")
    for f in FACTORS:
        a, b = getattr(saved, f), getattr(current, f)
        if (a.trainable, a.tied) != (b.trainable, b.tied):
            diffs.append(f"{f}: trainable/tied ({a.trainable}, {a.tied}) != ({b.trainable}, {b.tied})")
    if diffs:
        raise CheckpointError(
            f"{where} was saved with preset {saved.name!r} and cannot be loaded into preset "
            f"{current.name!r}: " + "; ".join(diffs))


# ----------------------------------------------------------------- training checkpoints
def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint directory, or None."""
    root = checkpoint_dir(output_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / ADAPTER_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path}, which is incomplete")
    return path


def commit_checkpoint(output_dir: Path, step: int, write_files, keep_last: int) -> Path:
    """Write a checkpoint directory via ``write_files(tmp_dir)``, then publish it atomically.

    The directory is built under a temporary name and renamed into place; ``latest`` is
    rewritten last; only then are checkpoints beyond the newest ``keep_last`` deleted.
    """
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write_files(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    if keep_last > 0:
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*"):  # temp dirs of a crashed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final
