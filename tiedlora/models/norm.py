"""LayerNorm / RMSNorm for megatron-core layer specs, without apex.

megatron-core's torch fallback (``WrappedTorchNorm``, used whenever apex is absent, i.e.
on every CPU machine) refuses sequence parallelism and zero-centred gamma. Both are
per-token operations, so they are valid here:

* sequence parallel: the norm sees a chunk of the sequence; its weight (and bias) is
  marked ``sequence_parallel = True`` so megatron-core's ``finalize_model_grads`` sums its
  gradient over the tensor-parallel group, exactly as apex's FusedLayerNorm does.
* zero-centred gamma (NeMo's ``layernorm1p``): ``y = norm(x) * (1 + gamma)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Norm(torch.nn.Module):
    """Signature matches megatron-core's norm builders: ``Norm(config, hidden_size, eps)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.kind = config.normalization
        if self.kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={self.kind!r}: expected 'LayerNorm' or 'RMSNorm'")
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        self.hidden_size = hidden_size
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        if self.kind == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        else:
            self.register_parameter("bias", None)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.kind == "LayerNorm":
            return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)
        return F.rms_norm(x, (self.hidden_size,), weight, self.eps)
