"""The pieces of one optimizer step; the loop that uses them is :func:`tiedlora.finetune.train`.

* :func:`lr_at` — linear warm-up, cosine decay to ``min_lr``
* :func:`build_optimizer` — AdamW over the trainable adapter tensors only (tied factors
  once), weight decay on the A and B factors (not on the u and v scalings)
* :func:`forward_backward` — megatron-core's schedule for the layout (no pipelining,
  1F1B, interleaved) with a per-token loss
* :func:`clip_adapter_grads` — global gradient norm counting every tensor once
* :func:`sync_tied_copies` — the optimizer's new value of a tied factor to its copies
* :func:`reduce_loss`, :func:`global_tokens` — the step's loss and token count over replicas
* :func:`nonfinite_cause` — whether the step's (already global) loss or gradient norm is
  NaN or infinite, i.e. whether its optimizer step must be skipped
* :func:`step_token_counts` — the step's real and computed (padded) tokens over replicas
* :class:`PreemptionFlag` — a signal asks for a checkpoint; all ranks agree at step end
  (in the same all-reduce: whether rank 0 failed to write this step's outputs)

Saving and resuming the training state is :mod:`tiedlora.checkpoint`'s.
"""

from __future__ import annotations

import json
import math
import signal
from functools import partial
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from tiedlora import compat
from tiedlora.config import OptimConfig
from tiedlora.dist import ProcessGroups, process_groups
from tiedlora.files import append_line, atomic_write_text, to_json
from tiedlora.models.attention import packed_seq_params
from tiedlora.peft.model import AdapterParam, iter_adapter_params, trainable_params


# ------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warm-up, then cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------ optimizer
DECAYED_FACTORS = ("A", "B")  # the low-rank matrices; u and v are scalings (no decay)


def build_optimizer(params: List[AdapterParam], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` (:func:`tiedlora.peft.model.trainable_params`), fused on CUDA."""
    decay = [r.param for r in params if r.factor in DECAYED_FACTORS]
    no_decay = [r.param for r in params if r.factor not in DECAYED_FACTORS]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=compat.cuda_available())


def sync_tied_copies(chunks: List[nn.Module]) -> None:
    """After the optimizer step, give every virtual-chunk copy of a tied factor its new value."""
    if len(chunks) < 2:
        return
    first = {r.name: r.param for r in trainable_params(chunks[:1]) if r.tied}
    with torch.no_grad():
        for chunk in chunks[1:]:
            for r in iter_adapter_params(chunk):
                if r.name in first and r.param is not first[r.name]:
                    r.param.copy_(first[r.name])


# ------------------------------------------------------------------- forward/backward
def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    loss_sum = (losses * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    return loss_sum, tokens, {"loss_sum": loss_sum.detach().clone(), "tokens": tokens.clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    dev = compat.default_device()
    tokens = batch["tokens"].to(dev)
    labels = batch["labels"].to(dev)
    mask = batch["loss_mask"].to(dev)
    packed = None
    if "cu_seqlens" in batch:  # a pack of whole examples (tiedlora.data.packing): thd attention
        packed = packed_seq_params(batch["cu_seqlens"], batch["cu_seqlens_padded"], batch["max_seqlen"], dev)
    out = model(tokens, batch["position_ids"].to(dev), None, labels=labels, packed_seq_params=packed)
    return out, partial(_loss_func, mask)


def forward_backward(chunks: List[nn.Module], micro_batches: List[dict], forward_only: bool = False,
                     autocast_dtype: Optional[torch.dtype] = None) -> tuple[float, int]:
    """Run one step's micro-batches through megatron's schedule.

    Returns (sum of token losses, supervised tokens) on this pipeline replica's last stage
    (zeros elsewhere). Gradients are of the *sum*; divide by the global token count.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq = micro_batches[0]["tokens"].shape[1]
    mbs = micro_batches[0]["tokens"].shape[0]
    iters = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    fwd_bwd = get_forward_backward_func()
    ctx = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else _null()
    with ctx:
        out = fwd_bwd(forward_step_func=_forward_step, data_iterator=iters,
                      model=chunks if len(chunks) > 1 else chunks[0],
                      num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=mbs,
                      forward_only=forward_only)
    loss = sum(float(d["loss_sum"]) for d in out)
    tokens = sum(int(d["tokens"]) for d in out)
    return loss, tokens


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def reduce_loss(loss_sum: float, tokens: int, groups: Optional[ProcessGroups] = None) -> float:
    """Per-token loss over all data-parallel replicas (broadcast from the last stage)."""
    groups = groups or process_groups()
    t = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
    if groups.size(groups.pp) > 1:  # only the last stage has it
        dist.all_reduce(t, group=groups.pp)
    if groups.size(groups.dp) > 1:
        dist.all_reduce(t, group=groups.dp)
    return float(t[0] / t[1].clamp(min=1))


def step_token_counts(micro_batches: List[dict], groups: Optional[ProcessGroups] = None) -> tuple[int, int]:
    """(real, computed) tokens of this step over all micro-batches and data-parallel ranks:
    real = prompt + answer tokens (``real_tokens`` of each batch), computed = every position
    of every row, padding included."""
    groups = groups or process_groups()
    t = torch.tensor([float(sum(b["real_tokens"] for b in micro_batches)),
                      float(sum(b["tokens"].numel() for b in micro_batches))], dtype=torch.float64)
    if groups.size(groups.dp) > 1:
        dist.all_reduce(t, group=groups.dp)
    return int(t[0]), int(t[1])


def global_tokens(micro_batches: List[dict], groups: Optional[ProcessGroups] = None) -> int:
    """Supervised tokens of this step over all micro-batches and data-parallel ranks."""
    groups = groups or process_groups()
    n = torch.tensor(float(sum(b["loss_mask"].sum() for b in micro_batches)), dtype=torch.float64)
    if groups.size(groups.dp) > 1:
        dist.all_reduce(n, group=groups.dp)
    return int(n)


# -------------------------------------------------------------------------- clipping
@torch.no_grad()
def clip_adapter_grads(chunks: List[nn.Module], max_norm: float, groups: Optional[ProcessGroups] = None) -> float:
    """Clip by the global L2 norm of all adapter gradients; returns the norm before clipping.

    Each tensor counts once: TP-sharded tensors sum over the TP group, replicated ones
    count on TP rank 0 only; per-layer tensors sum over pipeline stages, tied factors
    (held by every stage) count on the first stage only.
    """
    groups = groups or process_groups()
    tp_rank, pp_rank = groups.rank(groups.tp), groups.rank(groups.pp)
    sq = torch.zeros((), dtype=torch.float64)
    for r in trainable_params(chunks):
        if r.param.grad is None:
            continue
        if (r.shard_dim is None and tp_rank != 0) or (r.tied and pp_rank != 0):
            continue
        sq += r.param.grad.double().pow(2).sum().cpu()
    if groups.size(groups.mp) > 1:
        dist.all_reduce(sq, group=groups.mp)
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for chunk in chunks:
            for r in iter_adapter_params(chunk):
                if r.param.grad is not None:
                    r.param.grad.mul_(coef)
    return norm


# ---------------------------------------------------------------- non-finite values
def nonfinite_cause(loss: float, grad_norm: float) -> Optional[str]:
    """``"loss"``, ``"gradients"``, ``"loss and gradients"`` or None (both finite).

    Both numbers are already the same on every rank (:func:`reduce_loss` sums over the
    pipeline and data-parallel groups, :func:`clip_adapter_grads` over the model-parallel
    group after the data-parallel gradient sum; a NaN anywhere survives every sum), so all
    ranks take the same decision without another collective and without a check per tensor.
    """
    bad = [name for name, v in (("loss", loss), ("gradients", grad_norm)) if not math.isfinite(v)]
    return " and ".join(bad) or None


def finite_or_none(x: float) -> Optional[float]:
    """A number for strict JSON: None (``null``) where it is NaN or infinite."""
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------- preemption
class PreemptionFlag:
    """Set by a signal; checked (and agreed on by all ranks) at the end of each step."""

    def __init__(self, signals: List[str]):
        self.hit: Optional[str] = None
        self.signals = list(signals)
        for name in signals:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        self.hit = signal.Signals(signum).name

    def disarm(self) -> None:
        """After the final checkpoint: a late warning signal (e.g. Slurm's time-limit notice
        arriving during evaluation) must not kill a finished run."""
        for name in self.signals:
            if name != "SIGTERM":
                signal.signal(getattr(signal, name), signal.SIG_IGN)

    def agreed(self, write_failed: bool = False) -> tuple[bool, bool]:
        """(a signal arrived on some rank, some rank failed to write): one all-reduce."""
        t = torch.tensor([1.0 if self.hit else 0.0, 1.0 if write_failed else 0.0])
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item()), bool(t[1].item())


def write_jsonl_line(path: Path, obj: dict) -> None:
    """One strict-JSON line appended (a failed write leaves whole lines: files.append_line)."""
    append_line(path, to_json(obj), f"append this step's line to {path.name}")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(k + "\n" for k in keep), f"rewrite {path.name} up to the checkpoint")
