"""The Tied-LoRA adapter on megatron-core's tensor-parallel linear layers.

    x ──► base (frozen W) ───────────────────────────────► (+) ──► out, bias
    │                                                      ▲
    └─► dropout ─► A ─► ⊙ s·u ─► [TP comm] ─► B ─► ⊙ v ────┘
        (pre)                                    (post: dropout here instead)

    ΔW x = s · v ⊙ B( u ⊙ A x ),   s = alpha / r

``dropout_position`` (as NeMo's LoRA): ``pre`` applies dropout to the adapter input x
(the default), ``post`` to the adapter output ΔW x; with ``post`` the add into the base
output is not fused.

A·x is computed first (r wide), so no d_out×d_in matrix is ever formed during training.
The scalings never touch a [tokens, d_out] activation: ``v`` is folded into B at each call
(work of size r·d), ``s·u`` scales the r-wide ``A x`` (work of size tokens·r), and the add
into the base output is fused into the second matmul::

    column:  h = (s·u) ⊙ (A x)         [then the TP copy/gather]       out = base + (v ⊙_rows B) h
    row:     h = (s·u) ⊙ Σ_tp (A x)    [after the TP reduce]           out = base + (v ⊙_rows B) h

(with u frozen, s is folded into A on column targets and into B on row targets). ``u`` on the
r-wide activation rather than folded into A: where A is frozen and u is trained (VeRA, TL1,
TL4) autograd then never forms dL/dA (an r × tokens × d_in product) only to reduce it to u's
r numbers. The second product, its add and its backward live in :class:`_AddLowRank`: the
add writes into the base output's storage when that is safe (no [tokens, d_out] copy), and
the backward uses the operand layouts that are fastest for a skinny r. Gradients equal those
of the plain formula (tests/test_adapter_fused.py compares the two).

Tensor parallelism (docs/design.md, 'Tensor parallelism'). Shapes per rank, tp = TP size:

Column-parallel base (``linear_qkv``, ``linear_fc1``; output sharded on d_out):
    A (r, d_in) replicated · u (r,) replicated · B (d_out/tp, r) · v (d_out/tp,)
    h = s·u ⊙ A x (full r on every rank) -> copy_to_tensor_model_parallel_region (all-reduce
    of dL/dh in backward) -> B. Under sequence parallel, A and u see the local sequence
    chunk and h is all-gathered along the sequence instead (reduce-scatter in backward).
    u is applied *before* the copy/gather so its gradient already includes every rank's B.

Row-parallel base (``linear_proj``, ``linear_fc2``; input sharded on d_in):
    A (r, d_in/tp) · u (r,) · B (d_out, r) · v (d_out,) replicated
    h = all-reduce(A_shard x_shard); under sequence parallel a reduce-scatter along the
    sequence instead, matching the base's sequence-sharded output.

Replicated tensors that see only a sequence chunk under sequence parallel carry
``param.sequence_parallel = True``: their gradients are summed over the tensor-parallel
group before the optimizer step (:func:`tiedlora.peft.grads.finalize_adapter_grads`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tiedlora.config import DROPOUT_POSITIONS


class TiedLoRAAdapter(nn.Module):
    """Computes ΔW·x for one adapted linear layer.

    Per-layer factors are registered here; tied factors are owned by
    :class:`TiedFactors` and only referenced (``self._owner``), so each has one
    state-dict key and one optimizer entry.
    """

    def __init__(self, mode: str, target: str, layer_number: int, scale: float, dropout: float,
                 tp_group, sequence_parallel: bool, owner: Optional["TiedFactors"] = None,
                 dropout_position: str = "pre"):
        super().__init__()
        if mode not in ("column", "row"):
            raise ValueError(f"mode={mode!r}: expected column or row")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position={dropout_position!r}: expected one of {list(DROPOUT_POSITIONS)}")
        self.mode = mode
        self.target = target
        self.layer_number = layer_number  # global, 1-based (megatron's TransformerLayer numbering)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_position = dropout_position  # pre: dropout(x); post: dropout(ΔW x)
        self.tp_group = tp_group
        self.tp_size = tp_group.size() if tp_group is not None else 1
        self.sequence_parallel = bool(sequence_parallel) and self.tp_size > 1
        # Plain tuple: a reference that nn.Module does not register (one owner only).
        self._owner = (owner,)
        self.A: Optional[nn.Parameter] = None  # per-layer A (untied only)
        self.B: Optional[nn.Parameter] = None  # per-layer B (untied only)
        self.u: Optional[nn.Parameter] = None  # (r,) replicated; None = identity
        self.v: Optional[nn.Parameter] = None  # column: (d_out/tp,), row: (d_out,); None = identity

    def factor(self, name: str) -> Optional[torch.Tensor]:
        """A, B, u or v as used by this layer (tied ones come from the owner)."""
        own = getattr(self, name)
        if own is not None or name in ("u", "v"):
            return own
        owner = self._owner[0]
        return None if owner is None else owner.get(self.target, name)

    def scaled(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(A', B', s·u or None): v folded into B, and s into A (column) or B (row) when u is
        frozen; otherwise s·u is returned to scale ``A x`` (see the module docstring)."""
        A, B = self.factor("A"), self.factor("B")
        if self.v is not None:
            B = B * self.v.unsqueeze(1)  # column: (d_out/tp, r); row: (d_out, r)
        if self.u is not None:
            return A, B, self.u * self.scale
        if self.scale != 1.0:
            if self.mode == "column":
                A = A * self.scale
            else:
                B = B * self.scale
        return A, B, None

    def forward(self, x: torch.Tensor, base_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ΔW·x, or ``base_out + ΔW·x`` with the add fused into the last matmul.

        ``base_out`` is consumed: the sum may be written into its storage (it is the base
        linear's fresh output, which nothing else reads)."""
        from megatron.core.tensor_parallel import mappings

        A, B, su = self.scaled()
        post = self.dropout_position == "post" and isinstance(self.dropout, nn.Dropout)
        if not post:
            x = self.dropout(x)
        x = x.to(A.dtype)
        h = F.linear(x, A)  # [s, b, r] (column) or partial [s, b, r] (row)
        if self.mode == "column":
            if su is not None:
                h = h * su.to(h.dtype)  # before the copy, so u's gradient sums every rank's B shard
            if self.sequence_parallel:
                h = mappings.gather_from_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        else:
            if self.sequence_parallel:
                h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = mappings.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            if su is not None:
                h = h * su.to(h.dtype)  # after the reduce: A is sharded on d_in, h is the full sum
        # h: [s, b, r]; the output: [s, b, d_out/tp] (column) or [s(/tp), b, d_out] (row)
        if post:
            delta = self._post_dropout(F.linear(h, B))
            return delta if base_out is None else base_out + delta.to(base_out.dtype)
        if base_out is None:
            return F.linear(h, B)
        if base_out.dtype != h.dtype:  # bf16 base, fp32 adapter (no autocast): add in the base's dtype
            return base_out + F.linear(h, B).to(base_out.dtype)
        return _AddLowRank.apply(base_out, h, B.to(h.dtype))  # B in h's dtype, as addmm under autocast

    def _post_dropout(self, delta: torch.Tensor) -> torch.Tensor:
        """Dropout on ΔW x. Where this rank holds a shard of the output (column targets under
        TP, row targets under sequence parallel), the mask comes from megatron's
        model-parallel RNG, as for attention dropout, so the ranks' shards get independent
        masks; a replicated output uses the default RNG, identical on every TP rank."""
        if self.tp_size > 1 and (self.mode == "column" or self.sequence_parallel):
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                return self.dropout(delta)
        return self.dropout(delta)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, target={self.target}, layer={self.layer_number}, scale={self.scale}, "
                f"dropout_position={self.dropout_position}")


SKINNY_RANK = 8  # up to this r, _AddLowRank's backward uses the layouts for a skinny B


class _AddLowRank(torch.autograd.Function):
    """``base + h Bᵀ`` for h [..., r] and B [d_out, r], with a backward written for small r.

    Forward: one ``addmm``; into ``base``'s own storage when that is safe (a contiguous
    tensor that is not a view and not a leaf that requires grad; megatron's linear output
    nobody saves), which saves a [tokens, d_out] copy. If anything had saved ``base``, its
    version counter would make autograd fail loudly, never silently.
    Backward: for r ≤ ``SKINNY_RANK``, dL/dh = g B with B read column-major and
    dL/dB = (hᵀ g)ᵀ instead of gᵀ h. With 2, 4 or 8 columns the CPU BLAS takes a slow path
    in the layouts autograd uses for ``addmm`` (dL/dB 2–5× slower at 1024–8192 tokens); from
    12 columns up those layouts are as fast or faster, so they are kept there (numbers in
    docs/design.md, 'Performance targets'; ``bench/adapter_ops.py`` measures both).
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, B)
        h2 = h.reshape(-1, h.size(-1))
        inplace = (base.is_contiguous() and not base._is_view()
                   and not (base.requires_grad and base.grad_fn is None))
        if inplace:
            ctx.mark_dirty(base)
            base.view(-1, base.size(-1)).addmm_(h2, B.t())
            return base
        return torch.addmm(base.reshape(-1, base.size(-1)), h2, B.t()).view(base.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, B = ctx.saved_tensors
        g2, h2 = g.reshape(-1, g.size(-1)), h.reshape(-1, h.size(-1))
        skinny = h.size(-1) <= SKINNY_RANK
        grad_h = grad_B = None
        if ctx.needs_input_grad[1]:
            grad_h = g2.mm(B.t().contiguous().t() if skinny else B).view(h.shape)
        if ctx.needs_input_grad[2]:
            grad_B = h2.t().mm(g2).t() if skinny else g2.t().mm(h2)
        return (g if ctx.needs_input_grad[0] else None), grad_h, grad_B


class TiedFactors(nn.Module):
    """Owner of the tied A/B factors: one (A, B) pair per target kind.

    Registered once on the model (``model.tied_adapters``); its parameter names are
    ``{target}_A`` / ``{target}_B``.
    """

    def get(self, target: str, name: str) -> Optional[nn.Parameter]:
        return getattr(self, f"{target}_{name}", None)

    def put(self, target: str, name: str, param: nn.Parameter) -> None:
        self.register_parameter(f"{target}_{name}", param)


class AdaptedLinear(nn.Module):
    """Wraps a megatron-core parallel linear; keeps its ``(output, bias)`` contract.

    A transformer-engine ``TELayerNormColumnParallelLinear`` (``model.attention_backend=te``)
    normalises its input inside; the adapter must see the *normalised* input, as it does
    with the local spec's separate norm. The wrapper switches on TE's
    ``return_layernorm_output`` and feeds that output to the adapter.
    """

    def __init__(self, base: nn.Module, adapter: TiedLoRAAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.uses_layernorm_output = hasattr(base, "return_layernorm_output")
        if self.uses_layernorm_output:
            base.return_layernorm_output = True

    def forward(self, x: torch.Tensor, *args, **kwargs):
        res = self.base(x, *args, **kwargs)
        if not self.uses_layernorm_output:
            out, bias = res
            return self.adapter(x, base_out=out), bias
        # megatron returns TE's own tuple when TE returns the bias, else (TE's tuple, None)
        if len(res) == 3:
            out, bias, ln_out = res
        else:
            (out, ln_out), bias = res
        return self.adapter(ln_out, base_out=out), bias

    def __getattr__(self, name: str):
        # Megatron code reads attributes of the linear it built (weight, config, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)
