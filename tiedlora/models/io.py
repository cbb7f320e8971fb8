"""Base-model weights in our own layout-independent safetensors format.

Keys are megatron-core GPTModel parameter names with *global* layer numbers and without
the ``.base`` inserted by :class:`tiedlora.peft.AdaptedLinear`; tensors are full
(unsharded). Loading slices each tensor for this rank with the parameter's own
tensor-parallel attributes (``partition_dim``, ``partition_stride``), so one file loads
into any TP/PP layout. Used for the embedded mini base model and by the converters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _layer_offsets(chunk: nn.Module) -> Dict[int, int]:
    """local layer index -> global 0-based layer index, for one model chunk."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", [])
    return {i: layer.layer_number - 1 for i, layer in enumerate(layers)}


def canonical_name(name: str, offsets: Dict[int, int]) -> str:
    name = name.replace(".base.", ".")
    m = _LAYER.match(name)
    if m:
        name = f"decoder.layers.{offsets[int(m.group(1))]}." + name[m.end():]
    return name


def base_parameters(chunk: nn.Module) -> Iterable[Tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of every base (non-adapter) parameter of a chunk."""
    offsets = _layer_offsets(chunk)
    for name, p in chunk.named_parameters():
        if ".adapter." in name or name.startswith("tied_adapters."):
            continue
        yield canonical_name(name, offsets), p


def _tp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 0, 1
    g = ps.get_tensor_model_parallel_group()
    return g, g.rank(), g.size()


def full_state_dict(chunks: List[nn.Module]) -> Dict[str, torch.Tensor]:
    """Full base weights of the whole model on the CPU (collective over TP and PP)."""
    from megatron.core import parallel_state as ps

    from tiedlora.peft.model import unshard

    group, _, tp = _tp()
    out: Dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, p in base_parameters(chunk):
            t = p.detach()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                shards = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(shards, t.contiguous(), group=group)
                t = unshard(shards, p.partition_dim, getattr(p, "partition_stride", 1))
            out[name] = t.to("cpu").clone()
    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, out, group=ps.get_pipeline_model_parallel_group())
        out = {}
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)
    return dict(sorted(out.items()))


def load_state_dict_into(chunks: List[nn.Module], state: Dict[str, torch.Tensor], source: str,
                         strict: bool = True) -> None:
    """Copy full tensors into this rank's shards; names every missing/unexpected/misfit key."""
    from tiedlora.peft.model import shard

    _, rank, tp = _tp()
    used, missing = set(), []
    for chunk in chunks:
        for name, p in base_parameters(chunk):
            if name not in state:
                missing.append(name)
                continue
            full = state[name]
            is_vocab = name.endswith(("word_embeddings.weight", "output_layer.weight"))
            if getattr(p, "tensor_model_parallel", False):
                dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
                want = p.shape[dim] * tp
                if is_vocab and full.shape[dim] != want:  # vocabulary padding differs by TP size
                    padded = torch.zeros((want,) + tuple(full.shape[1:]), dtype=full.dtype)
                    n = min(want, full.shape[0])
                    padded[:n] = full[:n]
                    full = padded
                t = shard(full, dim, rank, tp, stride)
            else:
                t = full
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(full.shape)}, which does not fit "
                    f"this model's parameter {tuple(p.shape)} at TP={tp}")
            with torch.no_grad():
                p.copy_(t.to(p.device, p.dtype))
            used.add(name)
    if strict and missing:
        raise KeyError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    from megatron.core import parallel_state as ps

    single_stage = not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1
    if strict and single_stage:
        unexpected = sorted(set(state) - used)
        if unexpected:
            raise KeyError(f"{source}: unexpected tensor(s) {unexpected[:8]}")


def save_base(path: Path, chunks: List[nn.Module], model_info: dict) -> None:
    """Write the full base weights (rank 0 writes; collective)."""
    from safetensors.torch import save_file

    from tiedlora.checkpoint import atomic_write

    state = full_state_dict(chunks)
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = {"format": "tiedlora-base/1", "model": json.dumps(model_info)}
        state = {k: v.contiguous() for k, v in state.items()}
        atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def load_base(chunks: List[nn.Module], path: Path) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint={str(path)!r}: no such file")
    load_state_dict_into(chunks, load_file(str(path)), str(path))
