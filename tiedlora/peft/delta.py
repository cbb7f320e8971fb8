"""An adapter's update as a weight: the one formula that merging and export share.

For one adapted layer (shapes of one rank's shard, or full at TP=1)::

    ΔW = s · diag(v) · B · diag(u) · A  =  B_l · A_l        s = alpha / r

    A_l = diag(u) · A        (r, d_in)       missing u: ones
    B_l = s · diag(v) · B    (d_out, r)      missing v: ones

so a Tied-LoRA layer *is* a per-layer LoRA with factors (A_l, B_l) and scaling 1.
:func:`lora_factors` gives the pair (``tiedlora.export`` writes it for PEFT);
:func:`delta_weight` their product (``tiedlora.merge`` adds it to the base weight).
Training never forms ΔW (see :mod:`tiedlora.peft.layer`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def lora_factors(A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A_l, B_l) in fp32 with ``B_l @ A_l`` = ΔW."""
    A, B = A.detach().float(), scale * B.detach().float()
    if u is not None:
        A = u.detach().float()[:, None] * A
    if v is not None:
        B = v.detach().float()[:, None] * B
    return A, B


def delta_weight(A: torch.Tensor, B: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                 scale: float) -> torch.Tensor:
    """ΔW = s · diag(v) · B · diag(u) · A in fp32, shape (rows of B, columns of A)."""
    A_l, B_l = lora_factors(A, B, u, v, scale)
    return B_l @ A_l
