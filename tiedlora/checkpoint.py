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
leaves the previous checkpoint as ``latest``; a disk that fills up on the way ends the
run with :class:`tiedlora.errors.WriteFailed` and leaves no temporary folder behind.

Non-finite values never get into an adapter file: :func:`save_adapter` refuses them,
:func:`save_training_checkpoint` stops a run whose parameters went non-finite (before
anything is written), and :func:`load_adapter` refuses a file that holds any (one written
by an older version, or by hand).

This module owns the whole of it: the adapter file format, the training state
(:func:`training_state_tensors`, gathered to full tensors so that it too is
layout-independent), the atomic commit with ``latest`` and keep-last
(:func:`commit_checkpoint`), and the two calls a training loop makes,
:func:`save_training_checkpoint` and :func:`resume_training`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from tiedlora import compat
from tiedlora.dist import ProcessGroups, process_groups, rank0_writes
from tiedlora.errors import RunDiverged
from tiedlora.files import atomic_write_bytes, atomic_write_text, staged_dir, to_json
from tiedlora.config import FACTORS, PeftConfig
from tiedlora.peft.model import adapter_state_dict, load_adapter_state_dict, trainable_params
from tiedlora.sharding import gather_full, shard

FORMAT = "tiedlora-adapter/1"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.safetensors"
_ADAPTER = f"adapter file ({FORMAT} safetensors)"


class CheckpointError(ValueError):
    pass


def peft_to_dict(cfg: PeftConfig) -> dict:
    return dataclasses.asdict(cfg)


def peft_from_dict(d: dict) -> PeftConfig:
    d = dict(d)
    return PeftConfig(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(PeftConfig)}})


def nonfinite_tensors(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_adapter(path: Path, tensors: Dict[str, torch.Tensor], peft_cfg: PeftConfig,
                 model_info: Optional[dict] = None, extra: Optional[dict] = None,
                 operation: str = "save the adapter") -> Path:
    bad = nonfinite_tensors(tensors)
    if bad:  # finetune never hands it one (save_training_checkpoint checks on every rank): a bug
        raise RuntimeError(f"{path}: refusing to write an adapter with non-finite values in {bad[:3]}")
    meta = {"format": FORMAT, "peft_config": to_json(peft_to_dict(peft_cfg)), "model": to_json(model_info or {})}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else to_json(v)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # bytes, then our own write: a full disk raises a real OSError (files.storage_errors)
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata=meta), operation)
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
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{path}: non-finite values (NaN or infinity) in {', '.join(bad[:3])}"
                              f"{' and more' if len(bad) > 3 else ''}: the adapter of a diverged training, "
                              "which cannot be used; train again with a lower optim.lr")
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


def commit_checkpoint(output_dir: Path, step: int, write_files, keep_last: int,
                      operation: str = "save a training checkpoint") -> Path:
    """Write a checkpoint directory via ``write_files(tmp_dir)``, then publish it atomically.

    The directory is built under a temporary name and renamed into place; ``latest`` is
    rewritten last; only then are checkpoints beyond the newest ``keep_last`` deleted.
    """
    root = checkpoint_dir(output_dir)
    name = f"step_{step:07d}"
    final = root / name
    with staged_dir(final, replace=True, operation=operation) as tmp:
        write_files(tmp)
    atomic_write_text(root / "latest", name + "\n", operation)
    if keep_last > 0:
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*"):  # temp dirs of a crashed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


# ---------------------------------------------------------------------- training state
def rng_state() -> Dict[str, torch.Tensor]:
    """This rank's RNG states: torch's, CUDA's and megatron's model-parallel tracker's."""
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state()}
    if compat.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, s in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = s
    return state


def set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "cuda" in state and compat.cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k[len("tracker."):]: v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def training_state_tensors(chunks: List[nn.Module], optimizer: torch.optim.Optimizer,
                           groups: Optional[ProcessGroups] = None) -> Dict[str, torch.Tensor]:
    """Optimizer moments (full, by adapter name) and every rank's RNG states. Collective."""
    groups = groups or process_groups()
    params = trainable_params(chunks)
    out: Dict[str, torch.Tensor] = {}
    for key in ("exp_avg", "exp_avg_sq"):
        items = [(r.name, optimizer.state[r.param][key], r.shard_dim, r.stride)
                 for r in params if key in optimizer.state.get(r.param, {})]
        for name, t in gather_full(items, groups.tp, groups.pp).items():
            out[f"optim.{key}.{name}"] = t
    steps = [optimizer.state[r.param]["step"] for r in params if r.param in optimizer.state]
    if steps:
        out["optim.step"] = torch.tensor(float(steps[0]), dtype=torch.float64)
    mine = rng_state()
    ranks = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    for r, st in enumerate(ranks):
        for k, v in st.items():
            out[f"rng.{r}.{k}"] = v
    return out


def load_training_state_tensors(chunks: List[nn.Module], optimizer: torch.optim.Optimizer,
                                state: Dict[str, torch.Tensor], groups: Optional[ProcessGroups] = None) -> bool:
    """Restore optimizer moments (sliced for this layout) and, when the world size is the
    same as when saved, every rank's RNG states. Returns whether RNG states were restored."""
    groups = groups or process_groups()
    tp_rank, tp = groups.rank(groups.tp), groups.size(groups.tp)
    if "optim.step" in state:
        step_val = state["optim.step"].to(torch.float32)
        for r in trainable_params(chunks):
            p = r.param
            st = {"step": step_val.clone().to(p.device) if compat.cuda_available() else step_val.clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                full = state.get(f"optim.{key}.{r.name}")
                if full is None:
                    raise KeyError(f"training state lacks optim.{key}.{r.name}")
                t = shard(full, r.shard_dim, tp_rank, tp, r.stride) if r.shard_dim is not None else full
                st[key] = t.to(p.device, p.dtype).clone()
            optimizer.state[p] = st
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world = len({k.split(".")[1] for k in state if k.startswith("rng.")})
    if saved_world != world:
        return False
    set_rng_state({k[len(f"rng.{rank}."):]: v for k, v in state.items()
                   if k.startswith(f"rng.{rank}.")})
    return True


# ------------------------------------------------------------------ the loop's two calls
def save_training_checkpoint(output_dir: Path, step: int, chunks: List[nn.Module],
                             optimizer: torch.optim.Optimizer, peft_cfg: PeftConfig, model_info: dict,
                             trainer_meta: dict, keep_last: int, groups: Optional[ProcessGroups] = None) -> None:
    """Gather the adapter and training state (collective), then rank 0 commits
    ``checkpoints/step_<step>`` and moves ``latest``; every rank returns after the commit.

    ``trainer_meta``: the loop's JSON-able state (step, best validation loss, data
    position, ...), stored in the state file's metadata and returned by :func:`resume_training`.
    """
    adapter = adapter_state_dict(chunks, groups=groups)
    bad = nonfinite_tensors(adapter)  # every rank holds the full adapter: the same answer everywhere
    if bad:
        raise RunDiverged(f"the adapter's parameters became non-finite by step {step} (in {', '.join(bad[:3])}): "
                          "an update overflowed; no checkpoint was written")
    tstate = training_state_tensors(chunks, optimizer, groups)
    what = f"save the training checkpoint of step {step}"

    def write(d: Path):
        save_adapter(d / ADAPTER_FILE, adapter, peft_cfg, model_info, {"step": step}, what)
        state = safetensors_bytes({k: v.contiguous() for k, v in tstate.items()},
                                  metadata={"trainer": to_json(trainer_meta)})
        atomic_write_bytes(d / STATE_FILE, state, what)
    rank0_writes(lambda: commit_checkpoint(output_dir, step, write, keep_last, what))


def resume_training(output_dir: Path, chunks: List[nn.Module], optimizer: torch.optim.Optimizer,
                    peft_cfg: PeftConfig, groups: Optional[ProcessGroups] = None
                    ) -> Optional[Tuple[Path, dict, bool]]:
    """Load the latest checkpoint of ``output_dir`` into ``chunks`` and ``optimizer``.

    Returns None when there is none, else (its directory, the trainer metadata saved with
    it, whether every rank's RNG state was restored: not when the world size changed).
    Refuses a checkpoint of another preset, rank or targets.
    """
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    tensors, saved_cfg, _ = load_adapter(latest)
    check_compatible(saved_cfg, peft_cfg, where=str(latest / ADAPTER_FILE))
    load_adapter_state_dict(chunks, tensors, groups=groups)
    state_tensors, meta = load_trainer_state(latest / STATE_FILE)
    exact = load_training_state_tensors(chunks, optimizer, state_tensors, groups)
    return latest, meta, exact
