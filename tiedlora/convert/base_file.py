"""Base-model weights in our own layout-independent safetensors format (``tiedlora-base/1``).

The file holds every base tensor under its canonical name (megatron-core names with the
global layer index; see :mod:`tiedlora.convert.layout`), full and unsharded, so one file
loads into any TP/PP layout. It is what the embedded mini base is cached as, and what
``model.checkpoint=<file>.safetensors`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from torch import nn

from tiedlora.convert.layout import CheckpointFormatError, LazyTensor, gather_full, load_source

FORMAT = "tiedlora-base/1"


def save_base(path: Path, chunks: List[nn.Module], model_info: dict) -> None:
    """Write the full base weights (collective over TP/PP; rank 0 writes, atomically)."""
    from safetensors.torch import save_file

    from tiedlora.dist import is_rank0
    from tiedlora.files import atomic_write, to_json

    state = gather_full(chunks)
    if is_rank0():
        meta = {"format": FORMAT, "model": to_json(model_info)}
        state = {k: v.contiguous() for k, v in state.items()}
        atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def load_base(chunks: List[nn.Module], path: Path, model_cfg) -> None:
    """Load a ``tiedlora-base/1`` file into this rank's chunks (one tensor at a time)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint={str(path)!r}: no such file")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors' own error types name no file
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e}); expected a "
                                    f"{FORMAT} base-weights file") from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointFormatError(
                f"{path}: format={meta.get('format')!r}, expected {FORMAT!r} (a .nemo file or a "
                "Hugging Face directory is read by its converter instead)")
        source = {k: LazyTensor(origin=f"{path}:{k}", read=lambda k=k, f=f: f.get_tensor(k))
                  for k in f.keys()}
        load_source(chunks, source, model_cfg, str(path))
