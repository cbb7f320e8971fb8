"""Gradient synchronisation of adapter tensors before the optimizer step.

Only adapter gradients are communicated (the base is frozen). Three reductions, each one
coalesced into a single flat buffer per process group:

1. sequence parallel: replicated factors marked ``sequence_parallel`` saw one sequence
   chunk per tensor-parallel rank -> SUM over the tensor-parallel group;
2. pipeline parallel: each stage (and each virtual chunk) holds a copy of the tied
   factors -> SUM the copies on this rank, then over the pipeline group, and give every
   copy the total (the factor's gradient is the sum over all L layers);
3. data parallel: every adapter gradient -> SUM over the data-parallel group, then
   divided by ``num_tokens`` (the step's supervised tokens over all micro-batches and
   data-parallel ranks: the loss is a per-token mean over the global batch); without
   ``num_tokens``, an AVERAGE over the group.
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
def finalize_adapter_grads(chunks: List[nn.Module] | nn.Module, num_tokens: int | None = None) -> None:
    from megatron.core import parallel_state as ps

    chunks = chunks if isinstance(chunks, list) else [chunks]
    params = _grads(chunks)
    if not ps.model_parallel_is_initialized():
        return

    # 1. sequence parallel (every copy: virtual chunks hold distinct copies of tied factors)
    sp = [c.grad for copies in params.values() for c in copies if getattr(c, "sequence_parallel", False)]
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

    # 3. data parallel: sum (then divide by the global token count) or average
    dp_group = ps.get_data_parallel_group()
    dp = dist.get_world_size(dp_group)
    grads = [ps_[0].grad for ps_ in params.values()]
    if dp > 1:
        _allreduce_(grads, dp_group)
    divisor = float(num_tokens) if num_tokens is not None else float(dp)
    if divisor != 1.0:
        for g in grads:
            g.div_(divisor)
    for copies in params.values():  # keep every virtual copy of a tied factor equal
        for c in copies[1:]:
            c.grad.copy_(copies[0].grad)
