"""Real base models in: NeMo ``.nemo`` (GPT-2B-001 family) and Hugging Face LLaMA.

The training recipe calls three functions, all dispatching on the checkpoint path::

    cfg = model_config_from_checkpoint("/data/GPT-2B-001_bf16_tp1.nemo")   # ModelConfig
    tok = tokenizer_path(cfg.checkpoint)          # SentencePiece .model (or HF tokenizer dir)
    chunks = build_model_chunks(cfg, parallel)
    load_base_checkpoint(chunks, cfg, parallel)   # BEFORE apply_peft; any TP / PP layout

A ``.nemo`` tar file, or a folder holding ``model_config.yaml``, is read by
:mod:`tiedlora.convert.nemo`; a folder holding ``config.json`` by
:mod:`tiedlora.convert.hf_llama` (:func:`converter` picks the module; both offer the same
four functions). Both map their keys onto the layout-independent names of
:mod:`tiedlora.convert.layout`, which slices every tensor for this rank. Our own
layout-independent safetensors file (``tiedlora-base/1``, the cached mini base) is
:mod:`tiedlora.convert.base_file`.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

from tiedlora.convert.layout import CheckpointFormatError, Source, check_model_matches, load_source
from tiedlora.config import ModelConfig, ParallelConfig

FORMATS = ("nemo", "hf_llama")

__all__ = ["CheckpointFormatError", "FORMATS", "checkpoint_format", "converter", "load_base_checkpoint",
           "model_config_from_checkpoint", "read_source", "save_merged", "tokenizer_path"]


def checkpoint_format(path: os.PathLike | str) -> str:
    """``"nemo"`` (a .nemo tar, or a folder with model_config.yaml) or ``"hf_llama"``."""
    p = Path(path)
    if p.is_file():
        if tarfile.is_tarfile(p):
            return "nemo"
        raise CheckpointFormatError(f"{p}: not a .nemo (tar) file; expected a .nemo file or a model directory")
    if p.is_dir():
        if (p / "model_config.yaml").is_file():
            return "nemo"
        if (p / "config.json").is_file():
            return "hf_llama"
        raise CheckpointFormatError(
            f"{p}: neither model_config.yaml (an extracted .nemo) nor config.json (Hugging Face) here")
    raise CheckpointFormatError(f"{p}: no such checkpoint file or directory")


def converter(path: os.PathLike | str) -> ModuleType:
    """The module that reads and writes checkpoints of ``path``'s format. Each one offers
    ``model_config_from_checkpoint``, ``tokenizer_path``, ``read_source`` and ``save_merged``."""
    from tiedlora.convert import hf_llama, nemo

    return {"nemo": nemo, "hf_llama": hf_llama}[checkpoint_format(path)]


def model_config_from_checkpoint(path: os.PathLike | str) -> ModelConfig:
    """The architecture stored with a checkpoint, as a ModelConfig (``checkpoint`` set)."""
    return converter(path).model_config_from_checkpoint(path)


def tokenizer_path(path: os.PathLike | str, extract_to: Optional[os.PathLike | str] = None) -> Path:
    """The tokenizer that ships with a checkpoint.

    ``.nemo``: the SentencePiece model named by ``tokenizer.model`` (extracted from a tar into
    ``extract_to`` or a per-archive cache folder). Hugging Face: ``tokenizer.model`` if
    present, else the directory itself (``tokenizer.json``).
    """
    return converter(path).tokenizer_path(path, extract_to)


def read_source(model_cfg: ModelConfig, path: Optional[os.PathLike | str] = None) -> Tuple[str, Source]:
    """(format, canonical lazy tensors) of ``path`` (default ``model_cfg.checkpoint``).

    Raises :class:`CheckpointFormatError` naming every unknown or missing tensor, and naming
    each architecture field where ``model_cfg`` disagrees with the checkpoint.
    """
    path = path or model_cfg.checkpoint
    if not path:
        raise CheckpointFormatError("model.checkpoint is not set")
    fmt = checkpoint_format(path)
    check_model_matches(model_cfg, model_config_from_checkpoint(path), str(path))
    return fmt, converter(path).read_source(path, model_cfg)


def save_merged(src: os.PathLike | str, out: os.PathLike | str, replaced, model_cfg: ModelConfig) -> Path:
    """``src`` with the canonical tensors in ``replaced`` swapped in, in ``src``'s own format."""
    return converter(src).save_merged(src, out, replaced, model_cfg)


def load_base_checkpoint(model_chunks: List, model_cfg: ModelConfig, parallel: ParallelConfig) -> None:
    """Load ``model_cfg.checkpoint`` into this rank's model chunks (call before apply_peft).

    Every rank reads the tensors it needs (one full tensor at a time) and keeps its shard;
    vocabulary padding is adapted to this TP size. Works after ``apply_peft`` too (the
    ``.base`` of adapted linears is mapped), but adapters are left untouched.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != parallel.tp:
        raise ValueError(f"parallel.tp={parallel.tp} but megatron's tensor-parallel size is "
                         f"{ps.get_tensor_model_parallel_world_size()}")
    _, source = read_source(model_cfg)
    load_source(model_chunks, source, model_cfg, str(model_cfg.checkpoint))
