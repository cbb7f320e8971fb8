"""Pieces of the fine-tuning loop (the loop itself is in :mod:`tiedlora.finetune`).

* configs: :class:`TrainerConfig`, :class:`OptimConfig`, :class:`CheckpointConfig`
* :func:`lr_at` — linear warm-up, cosine decay to ``min_lr``
* :func:`build_optimizer` — AdamW over adapter tensors only (tied factors once)
* :func:`forward_backward` — megatron-core's schedule for the layout (no pipelining,
  1F1B, interleaved) with a per-token loss
* :func:`clip_adapter_grads` — global gradient norm counting every tensor once
* :func:`save_training_state` / :func:`load_training_state` — layout-independent
  optimizer moments, step, data position and RNG states
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from tiedlora import compat
from tiedlora.peft.model import iter_adapter_params, shard, unshard


# ---------------------------------------------------------------------------- configs
@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-6  # cosine floor
    warmup_steps: int = 50  # linear warm-up from 0
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr!r}: must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr!r}: must be in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps!r}: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)!r}: two numbers in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip!r}: must be >= 0")


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimizer steps
    global_batch_size: int = 16
    micro_batch_size: int = 4
    val_check_interval: int = 50  # steps between validation-loss checks; 0 disables
    limit_val_batches: int = 8  # micro-batches of validation per check; 0 = all
    early_stopping_patience: int = 10  # validation checks without improvement; 0 disables
    early_stopping_min_delta: float = 0.0
    log_every: int = 10  # plain log line every N steps (the progress bar updates every step)
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    preempt_exit_code: int = 3  # exit status after a signal-triggered checkpoint (requeue me)

    def __post_init__(self):
        for f in ("max_steps", "global_batch_size", "micro_batch_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"trainer.{f}={v!r}: must be a positive integer")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"trainer.precision={self.precision!r}: expected auto, bf16 or fp32")
        for s in self.preempt_signals:
            if not hasattr(signal, s):
                raise ValueError(f"trainer.preempt_signals: unknown signal {s!r}")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100  # 0: only at the end (and on a preemption signal)
    keep_last: int = 2  # checkpoints kept (older ones deleted after a new one is complete)
    resume: bool = True  # continue from <output_dir>/checkpoints/latest when present


# ------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warm-up, then cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------ optimizer
def optimizer_params(chunks: List[nn.Module]) -> Dict[str, nn.Parameter]:
    """Trainable adapter tensors by name; a tied factor appears once (first chunk's copy)."""
    out: Dict[str, nn.Parameter] = {}
    for chunk in chunks:
        for name, p, _ in iter_adapter_params(chunk):
            if p.requires_grad and name not in out:
                out[name] = p
    return out


def build_optimizer(params: Dict[str, nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over adapter tensors only (fused kernel on CUDA). No decay on u and v."""
    decay = [p for n, p in params.items() if n.endswith((".A", ".B"))]
    no_decay = [p for n, p in params.items() if not n.endswith((".A", ".B"))]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=compat.cuda_available())


def sync_tied_copies(chunks: List[nn.Module]) -> None:
    """After the optimizer step, give every virtual-chunk copy of a tied factor its new value."""
    if len(chunks) < 2:
        return
    first = optimizer_params(chunks[:1])
    with torch.no_grad():
        for chunk in chunks[1:]:
            for name, p, _ in iter_adapter_params(chunk):
                if name.startswith("tied.") and name in first and p is not first[name]:
                    p.copy_(first[name])


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
    out = model(tokens, batch["position_ids"].to(dev), None, labels=labels)
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


def reduce_loss(loss_sum: float, tokens: int) -> float:
    """Per-token loss over all data-parallel replicas (broadcast from the last stage)."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
    if dist.is_initialized():
        if ps.get_pipeline_model_parallel_world_size() > 1:  # only the last stage has it
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return float(t[0] / t[1].clamp(min=1))


def global_tokens(micro_batches: List[dict]) -> int:
    """Supervised tokens of this step over all micro-batches and data-parallel ranks."""
    from megatron.core import parallel_state as ps

    n = torch.tensor(float(sum(b["loss_mask"].sum() for b in micro_batches)), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(n, group=ps.get_data_parallel_group())
    return int(n)


# -------------------------------------------------------------------------- clipping
@torch.no_grad()
def clip_adapter_grads(chunks: List[nn.Module], max_norm: float) -> float:
    """Clip by the global L2 norm of all adapter gradients; returns the norm before clipping.

    Each tensor counts once: TP-sharded tensors sum over the TP group, replicated ones
    count on TP rank 0 only; per-layer tensors sum over pipeline stages, tied factors
    (held by every stage) count on the first stage only.
    """
    from megatron.core import parallel_state as ps

    params = optimizer_params(chunks)
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64)
    for name, p in params.items():
        if p.grad is None:
            continue
        sharded = getattr(p, "tensor_model_parallel", False)
        if (not sharded and tp_rank != 0) or (name.startswith("tied.") and pp_rank != 0):
            continue
        sq += p.grad.double().pow(2).sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for chunk in chunks:
            for _, p, _ in iter_adapter_params(chunk):
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


# ------------------------------------------------------------------ training state
def _named_full(chunks: List[nn.Module], fn: Callable[[nn.Parameter], Optional[torch.Tensor]]
                ) -> Dict[str, torch.Tensor]:
    """fn(param) for every trainable adapter tensor, gathered to full size (collective)."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp = tp_group.size()
    out: Dict[str, torch.Tensor] = {}
    for name, p in optimizer_params(chunks).items():
        t = fn(p)
        if t is None:
            continue
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t.contiguous(), group=tp_group)
            t = unshard(shards, p.partition_dim, getattr(p, "partition_stride", 1))
        out[name] = t.detach().to("cpu").clone()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, out, group=ps.get_pipeline_model_parallel_group())
        out = {}
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)
    return out


def rng_state() -> Dict[str, torch.Tensor]:
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


def training_state_tensors(chunks: List[nn.Module], optimizer: torch.optim.Optimizer
                           ) -> Dict[str, torch.Tensor]:
    """Optimizer moments (full, by adapter name) and every rank's RNG states. Collective."""
    out: Dict[str, torch.Tensor] = {}
    for key in ("exp_avg", "exp_avg_sq"):
        for name, t in _named_full(chunks, lambda p: optimizer.state.get(p, {}).get(key)).items():
            out[f"optim.{key}.{name}"] = t
    steps = {n: optimizer.state[p]["step"] for n, p in optimizer_params(chunks).items()
             if p in optimizer.state}
    if steps:
        out["optim.step"] = torch.tensor(float(next(iter(steps.values()))), dtype=torch.float64)
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
                                state: Dict[str, torch.Tensor]) -> bool:
    """Restore optimizer moments (sliced for this layout) and, when the world size is the
    same as when saved, every rank's RNG states. Returns whether RNG states were restored."""
    from megatron.core import parallel_state as ps

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if "optim.step" in state:
        step_val = state["optim.step"].to(torch.float32)
        for name, p in optimizer_params(chunks).items():
            st = {"step": step_val.clone().to(p.device) if compat.cuda_available() else step_val.clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                full = state.get(f"optim.{key}.{name}")
                if full is None:
                    raise KeyError(f"training state lacks optim.{key}.{name}")
                t = full
                if getattr(p, "tensor_model_parallel", False):
                    t = shard(full, p.partition_dim, tp_rank, tp, getattr(p, "partition_stride", 1))
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

    def agreed(self) -> bool:
        t = torch.tensor([1.0 if self.hit else 0.0])
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def write_jsonl_line(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    from tiedlora.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(k + "\n" for k in keep))
