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
The scalings are folded into the small factors at each call instead of scaling
activations (work of size r·d, not tokens·d), and the add into the base output is fused
into the second matmul (``addmm``)::

    column:  A' = (s·u) ⊙_rows A      B' = v ⊙_rows B              out = base + B' (A' x)
    row:     A' = A                   B' = v ⊙_rows B ⊙_cols (s·u) out = base + B' (Σ_tp A' x)

On row targets ``u`` goes into B, not A: A is sharded on d_in there, and ``u`` folded
into A would only receive this rank's partial gradient. On column targets ``u`` in A is
still applied before the copy/gather below, as required. Gradients equal those of the
activation-side formula (tests/test_adapter_fused.py compares the two).

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

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with s, u and v folded in (see the module docstring); shapes as A and B."""
        A, B = self.factor("A"), self.factor("B")
        su = self.u * self.scale if self.u is not None else None
        if self.mode == "column":
            A = A * su.unsqueeze(1) if su is not None else A * self.scale  # (r, d_in)
            if self.v is not None:
                B = B * self.v.unsqueeze(1)  # (d_out/tp, r)
        else:
            B = B * self.v.unsqueeze(1) if self.v is not None else B  # (d_out, r)
            B = B * su if su is not None else B * self.scale
        return A, B

    def forward(self, x: torch.Tensor, base_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ΔW·x, or ``base_out + ΔW·x`` with the add fused into the last matmul."""
        from megatron.core.tensor_parallel import mappings

        A, B = self.folded()
        post = self.dropout_position == "post" and isinstance(self.dropout, nn.Dropout)
        if not post:
            x = self.dropout(x)
        x = x.to(A.dtype)
        h = F.linear(x, A)  # [s, b, r] (column) or partial [s, b, r] (row)
        if self.mode == "column":
            if self.sequence_parallel:
                h = mappings.gather_from_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        elif self.sequence_parallel:
            h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = mappings.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        # h: [s, b, r]; the output: [s, b, d_out/tp] (column) or [s(/tp), b, d_out] (row)
        if post:
            delta = self._post_dropout(F.linear(h, B))
            return delta if base_out is None else base_out + delta.to(base_out.dtype)
        if base_out is None:
            return F.linear(h, B)
        if base_out.dtype != h.dtype:  # bf16 base, fp32 adapter (no autocast): add in the base's dtype
            return base_out + F.linear(h, B).to(base_out.dtype)
        flat = torch.addmm(base_out.reshape(-1, base_out.size(-1)), h.reshape(-1, h.size(-1)), B.t())
        return flat.view(base_out.shape)

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
