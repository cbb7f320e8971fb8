"""Gradient synchronisation of adapter tensors before the optimizer step.

Only adapter gradients are communicated (the base is frozen). Three reductions, each one
coalesced into a single flat buffer per process group:

1. sequence parallel: replicated factors marked ``sequence_parallel`` saw one sequence
   chunk per tensor-parallel rank -> SUM over the tensor-parallel group;
2. pipeline parallel: each stage (and each virtual chunk) holds a copy of the tied
   factors -> SUM the copies on this rank, then over the pipeline group, and give every
   copy the total (the factor's gradient is the sum over all L layers);
3. data parallel: every adapter gradient -> AVERAGE over the data-parallel group.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from tiedlora.peft.model import iter_adapter_params


def _allreduce_(tensors: List[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=op, group=group)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


def _grads(chunks: List[nn.Module]) -> Dict[str, List[torch.Tensor]]:
    """Gradient tensors by layout-independent name (tied factors: one per chunk)."""
    out: Dict[str, List[torch.Tensor]] = {}
    for chunk in chunks:
        for name, p, _ in iter_adapter_params(chunk):
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.setdefault(name, []).append(p)
    return out


@torch.no_grad()
def finalize_adapter_grads(chunks: List[nn.Module] | nn.Module) -> None:
    from megatron.core import parallel_state as ps

    chunks = chunks if isinstance(chunks, list) else [chunks]
    params = _grads(chunks)
    if not ps.model_parallel_is_initialized():
        return

    # 1. sequence parallel (once per distinct tensor)
    sp = [ps_[0].grad for ps_ in params.values() if getattr(ps_[0], "sequence_parallel", False)]
    _allreduce_(sp, ps.get_tensor_model_parallel_group())

    # 2. tied copies across virtual chunks and pipeline stages
    tied = {n: ps_ for n, ps_ in params.items() if n.startswith("tied.")}
    if tied:
        sums = []
        for copies in tied.values():
            total = copies[0].grad
            for c in copies[1:]:
                total = total + c.grad
            sums.append(total.clone())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            _allreduce_(sums, ps.get_pipeline_model_parallel_group())
        for copies, total in zip(tied.values(), sums):
            for c in copies:
                c.grad.copy_(total)

    # 3. data parallel average
    dp_group = ps.get_data_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        grads = [ps_[0].grad for ps_ in params.values()]
        _allreduce_(grads, dp_group, op=dist.ReduceOp.AVG if _avg_ok() else dist.ReduceOp.SUM)
        if not _avg_ok():
            for g in grads:
                g.div_(dist.get_world_size(dp_group))
        for copies in params.values():  # keep every virtual copy of a tied factor equal
            for c in copies[1:]:
                c.grad.copy_(copies[0].grad)


def _avg_ok() -> bool:
    return dist.get_backend() == "nccl"
