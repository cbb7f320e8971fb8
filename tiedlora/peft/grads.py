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

from tiedlora.peft.model import AdapterParam, iter_adapter_params


def _allreduce_(tensors: List[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=op, group=group)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


def _grads(chunks: List[nn.Module]) -> Dict[str, List[AdapterParam]]:
    """Trainable adapter tensors by layout-independent name (a tied factor: one per chunk)."""
    out: Dict[str, List[AdapterParam]] = {}
    for chunk in chunks:
        for rec in iter_adapter_params(chunk):
            if not rec.param.requires_grad:
                continue
            if rec.param.grad is None:
                rec.param.grad = torch.zeros_like(rec.param)
            out.setdefault(rec.name, []).append(rec)
    return out


@torch.no_grad()
def finalize_adapter_grads(chunks: List[nn.Module] | nn.Module, num_tokens: int | None = None,
                           groups=None) -> None:
    """The three reductions above; ``groups``: :class:`tiedlora.dist.ProcessGroups`
    (default: read from megatron's parallel state)."""
    from tiedlora.dist import process_groups

    chunks = chunks if isinstance(chunks, list) else [chunks]
    params = _grads(chunks)
    groups = groups or process_groups()
    if groups.mp is None:  # no parallel state: a single process, nothing to reduce
        return

    # 1. sequence parallel (every copy: virtual chunks hold distinct copies of tied factors)
    sp = [r.param.grad for copies in params.values() for r in copies
          if getattr(r.param, "sequence_parallel", False)]
    _allreduce_(sp, groups.tp)

    # 2. tied copies across virtual chunks and pipeline stages
    tied = [copies for copies in params.values() if copies[0].tied]
    if tied:
        sums = []
        for copies in tied:
            total = copies[0].param.grad
            for c in copies[1:]:
                total = total + c.param.grad
            sums.append(total.clone())
        _allreduce_(sums, groups.pp)
        for copies, total in zip(tied, sums):
            for c in copies:
                c.param.grad.copy_(total)

    # 3. data parallel: sum (then divide by the global token count) or average
    dp = groups.size(groups.dp)
    grads = [copies[0].param.grad for copies in params.values()]
    if dp > 1:
        _allreduce_(grads, groups.dp)
    divisor = float(num_tokens) if num_tokens is not None else float(dp)
    if divisor != 1.0:
        for g in grads:
            g.div_(divisor)
    for copies in params.values():  # keep every virtual copy of a tied factor equal
        for c in copies[1:]:
            c.param.grad.copy_(copies[0].param.grad)
