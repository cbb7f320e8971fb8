"""Attention cores for megatron-core's ``SelfAttention`` (``model.attention_backend``).

megatron-core computes the QKV projection, rotary embeddings and the KV cache itself and
hands the *core attention* submodule one tensor per role::

    query [sq, b, np, hn]   key/value [sk, b, ng, hn]   (np heads, ng query groups per TP rank)
        └──► softmax(scale · Q Kᵀ + mask) ─► dropout ─► · V ──► context [sq, b, np·hn]

Backends (``conf/model/*.yaml``: ``attention_backend``):

``sdpa`` (default)
    :class:`SDPAttention` below: one call of ``torch.nn.functional.scaled_dot_product_attention``
    (FlashAttention / memory-efficient kernels on GPU, the fused flash kernel on CPU). The
    [b, np, sq, sk] score matrix is never materialised, so memory grows with s, not s².
``local``
    megatron-core's ``DotProductAttention``: baddbmm → masked softmax → bmm, with the full
    score matrix. Kept as the reference the ``sdpa`` core is tested against.
``te``
    transformer-engine's layer spec (fused attention, layernorm fused into ``linear_qkv``
    and ``linear_fc1``); only where ``transformer_engine`` imports (NVIDIA's containers).

Mask conventions (the same as ``DotProductAttention``):

- ``attention_mask`` given: a boolean tensor broadcastable to [b, np, sq, sk], ``True`` =
  *masked out*. It is used as is, whatever ``attn_mask_type`` says. megatron sets masked
  scores to -10000 (not -inf), so a query whose keys are all masked (padding) averages
  every value uniformly instead of giving NaN; this core does the same.
- no mask and ``attn_mask_type == causal`` with sq > 1: causal (then sq must equal sk).
- otherwise no mask: ``no_mask``, and the decode steps of KV-cache inference, where
  megatron switches the type to ``no_mask`` and the single new query sees the whole cache.

Tensor parallelism needs nothing here: megatron shards heads (np = heads / tp, ng =
query groups / tp) before this module is called, and the output stays sharded. Sequence
parallel gathers the sequence before the QKV projection, so the core sees full sequences.
Grouped-query attention (ng < np): query head i reads key/value group i // (np / ng),
exactly as ``DotProductAttention``'s ``repeat_interleave``.

Selective activation recomputation (``recompute_granularity: selective``) wraps this
module in megatron's ``tensor_parallel.checkpoint`` like any core attention: its forward
is rerun in backward. With SDPA that saves little memory (the kernel keeps only the
output and the row-wise log-sum-exp, not the s² probabilities), so ``full`` is the
setting that matters for long sequences; see docs/models.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def te_available() -> bool:
    """Whether transformer-engine's PyTorch extension imports here."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising at import time
        return False
    return True


def require_backend(backend: str) -> None:
    """Refuse a backend this machine cannot run, naming the setting."""
    from tiedlora.config import ATTENTION_BACKENDS

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r}: expected one of {list(ATTENTION_BACKENDS)}")
    if backend == "te" and not te_available():
        raise RuntimeError(
            "model.attention_backend='te' needs transformer-engine, which does not import "
            "here (it ships in NVIDIA's NGC containers and needs a CUDA GPU); use "
            "model.attention_backend=sdpa (the default) or local")


class SDPAttention(MegatronModule):
    """Core attention on ``F.scaled_dot_product_attention``; drop-in for ``DotProductAttention``.

    Constructor and forward follow megatron-core's core-attention protocol (the builder is
    called with ``config, layer_number, attn_mask_type, attention_type, cp_comm_type,
    softmax_scale, pg_collection``).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.utils import is_layer_window_attention
        from megatron.core.utils import divide

        unsupported = {
            "context_parallel_size": (config.context_parallel_size, 1),
            "softmax_type": (config.softmax_type, "vanilla"),
        }
        for field, (value, want) in unsupported.items():
            if value != want:
                raise ValueError(f"attention_backend=sdpa: TransformerConfig.{field}={value!r} is not "
                                 f"supported (needs {want!r}); use attention_backend=te")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"attention_backend=sdpa: sliding-window attention "
                             f"(window_size={config.window_size!r}) is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp)
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        # Query-key layer scaling divides the scores by layer_number and the softmax multiplies
        # them back (an fp16 overflow guard): the product is the plain scale.
        self.softmax_scale = (1.0 / math.sqrt(divide(projection, config.num_attention_heads))
                              if softmax_scale is None else softmax_scale)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        from megatron.core import tensor_parallel
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None:
            raise NotImplementedError("attention_backend=sdpa: packed sequences need attention_backend=te")
        if attention_bias is not None:
            raise NotImplementedError("attention_backend=sdpa: attention_bias is not supported")
        sq, b = query.shape[:2]
        sk = key.size(0)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if attention_mask is not None:
            masked = attention_mask.to(torch.bool)  # True = masked out (megatron)
            # megatron fills masked scores with -10000, so a row with every key masked (a
            # padding query) averages all values uniformly; zero scores do the same here
            dead = masked.all(dim=-1, keepdim=True)
            q = q.masked_fill(dead, 0.0)
            mask = ~masked | dead  # SDPA's boolean convention: True = attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal attention needs as many queries as keys, got sq={sq}, sk={sk}")
            causal = True

        gqa = self.heads_per_partition != self.groups_per_partition
        p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                  scale=self.softmax_scale, enable_gqa=gqa)

        if p > 0.0 and not self.config.sequence_parallel:
            # heads differ per TP rank: draw the dropout mask from the model-parallel RNG
            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = attend()
        else:
            ctx = attend()
        # [b, np, sq, hn] -> [sq, b, np*hn]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
