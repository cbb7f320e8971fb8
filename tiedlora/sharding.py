"""Tensor-parallel shards and full tensors: the one place that cuts and reassembles them.

megatron-core splits a tensor-parallel weight along its ``partition_dim`` with a
``partition_stride``: with stride k the dimension is cut into tp·k blocks and rank r
holds blocks r, r+tp, r+2·tp, ... (SwiGLU's fused fc1 [gate; up] is built with stride 2,
so each rank holds [gate_r; up_r], not a contiguous slice)::

    full (stride 2, tp 2):  [g0 g1 | u0 u1]      rank 0: [g0 u0]    rank 1: [g1 u1]

:func:`shard` takes a rank's part of a full tensor (loading base weights, adapters,
optimizer moments); :func:`unshard` is its inverse; :func:`gather_full` turns the
parameters of every rank and pipeline stage into full, layout-independent tensors
(adapter state dicts, training state, merged weights). Adapters, training state and the
checkpoint converters all use these, so a checkpoint written at one TP/PP layout loads at
any other.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's slice of ``full`` along ``dim`` (megatron's strided split)."""
    if size == 1:
        return full
    n = full.shape[dim]
    if n % (size * stride):
        raise ValueError(f"dimension {n} is not divisible by tp*stride={size * stride}")
    blocks = torch.split(full, n // (size * stride), dim=dim)
    return torch.cat(blocks[rank::size], dim=dim)


def unshard(shards: List[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's shard in rank order."""
    if len(shards) == 1:
        return shards[0]
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def shard_spec(p: torch.Tensor) -> Tuple[Optional[int], int]:
    """(partition dim or None when replicated, partition stride) from megatron's attributes."""
    if getattr(p, "tensor_model_parallel", False):
        return p.partition_dim, getattr(p, "partition_stride", 1)
    return None, 1


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def gather_shards(t: torch.Tensor, dim: int, stride: int, group) -> torch.Tensor:
    """The full tensor of which every rank of ``group`` holds the shard ``t`` (collective)."""
    n = _size(group)
    if n == 1:
        return t
    shards = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(shards, t.contiguous(), group=group)
    return unshard(shards, dim, stride)


def gather_full(items: Iterable[Tuple[str, torch.Tensor, Optional[int], int]], tp_group=None,
                pp_group=None) -> Dict[str, torch.Tensor]:
    """Full CPU tensors by name from ``(name, local tensor, shard dim or None, stride)``.

    Collective over ``tp_group`` (shards are gathered) and ``pp_group`` (every stage
    contributes the names it holds; every rank gets the union). A name seen twice (a tied
    factor's copy in another virtual chunk or stage) keeps its first value.
    """
    out: Dict[str, torch.Tensor] = {}
    for name, t, dim, stride in items:
        if name in out:
            continue
        t = t.detach()
        if dim is not None:
            t = gather_shards(t, dim, stride, tp_group)
        out[name] = t.to("cpu").clone()
    if _size(pp_group) > 1:
        parts: List[Optional[dict]] = [None] * _size(pp_group)
        dist.all_gather_object(parts, out, group=pp_group)
        out = {}
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)
    return out
