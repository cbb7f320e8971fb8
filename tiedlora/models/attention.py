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

Left padding (batched decoding of prompts of different lengths, :mod:`tiedlora.generate`).
Row i of a batch starts with ``pad[i]`` padding tokens. :func:`left_padding_mask` gives
the boolean mask of a forward pass whose sq queries are the last sq of sk positions, so
the same call serves the prefill (sq = sk) and every KV-cache decode step (sq = 1)::

    masked[i, 0, j, k] = (k < pad[i] or k > a) and k != a       a = sk - sq + j (query's position)

A real query sees exactly its own row's real keys up to itself (causal, padding keys
masked); a padding query sees only itself, so no row of the softmax is empty. The rotary
positions of row i are counted from its first real token (``generate`` hands megatron
a per-row rotary table), so a padded prompt attends and rotates as it would alone.

Packed sequences (``qkv_format='thd'``, training with ``data.packing``). megatron passes
``packed_seq_params`` (:class:`megatron.core.packed_seq_params.PackedSeqParams`, built by
:func:`packed_seq_params`) and squeezes the batch dimension: query [t, np, hn], key/value
[t, ng, hn], with several examples one after the other along t. ``cu_seqlens_q`` holds
the cumulative *real* lengths, ``cu_seqlens_q_padded`` (optional) the cumulative lengths
with the padding that follows each example in the buffer::

    buffer   | ex 0 (l0) | ex 1 (l1) | ex 2 (l2) | pad |      t = cu_seqlens_q_padded[-1]
    cu_seqlens_q          [0, l0, l0+l1, l0+l1+l2]
    cu_seqlens_q_padded   [0, l0, l0+l1, t]

This core runs one causal SDPA call per example (queries of one example see only its own
earlier tokens, never another example's) and writes zeros at padding positions, which no
loss reads. That is exact (the same arithmetic as attending each example alone) and costs
Σ l_i² instead of the t² of a dense block-diagonal mask. megatron applies the rotary
embedding per example from the same ``cu_seqlens`` (its thd rope), so positions restart at
every example. transformer-engine's core (``attention_backend=te``) takes the same
``PackedSeqParams`` natively (megatron switches it to ``padding_causal``); megatron's
``local`` core refuses packed sequences.

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
from contextlib import contextmanager
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
        from megatron.core.transformer.enums import AttnMaskType

        if attention_bias is not None:
            raise NotImplementedError("attention_backend=sdpa: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal_type = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, attention_mask, packed_seq_params, causal_type)
        sq, b = query.shape[:2]
        sk = key.size(0)
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
        elif causal_type and sq > 1:
            if sq != sk:
                raise ValueError(f"causal attention needs as many queries as keys, got sq={sq}, sk={sk}")
            causal = True
        ctx = self._attend(q, k, v, mask, causal)
        # [b, np, sq, hn] -> [sq, b, np*hn]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """SDPA on [..., heads, s, hn] tensors, attention dropout drawn from megatron's RNG."""
        from megatron.core import tensor_parallel

        gqa = self.heads_per_partition != self.groups_per_partition
        p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                  scale=self.softmax_scale, enable_gqa=gqa)

        if p > 0.0 and not self.config.sequence_parallel:
            # heads differ per TP rank: draw the dropout mask from the model-parallel RNG
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()

    def _forward_packed(self, query, key, value, attention_mask, params, causal: bool) -> torch.Tensor:
        """thd: one SDPA call per example; zeros at padding positions (module docstring)."""
        if params.qkv_format != "thd":
            raise NotImplementedError(f"attention_backend=sdpa: packed sequences in qkv_format="
                                      f"{params.qkv_format!r}; only 'thd' is supported")
        if attention_mask is not None:
            raise ValueError("attention_backend=sdpa: packed sequences (thd) take no attention_mask; "
                             "example boundaries come from cu_seqlens")
        if query.dim() != 3:
            raise ValueError(f"attention_backend=sdpa: thd query must be [t, heads, hn], got {tuple(query.shape)}")
        cu = params.cu_seqlens_q
        for name in ("cu_seqlens_kv", "cu_seqlens_kv_padded"):
            other = getattr(params, name)
            mine = cu if name == "cu_seqlens_kv" else params.cu_seqlens_q_padded
            if other is not None and (mine is None or not torch.equal(other, mine)):
                raise NotImplementedError(f"attention_backend=sdpa: self-attention on packed sequences "
                                          f"needs {name} equal to its query counterpart")
        padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else cu
        lengths = (cu[1:] - cu[:-1]).tolist()
        starts = padded[:-1].tolist()
        t = query.size(0)
        if int(padded[-1]) != t:
            raise ValueError(f"attention_backend=sdpa: packed buffer holds {t} tokens but "
                             f"cu_seqlens{'_padded' if params.cu_seqlens_q_padded is not None else ''} "
                             f"ends at {int(padded[-1])}")
        pieces, at = [], 0
        for start, n in zip(starts, lengths):
            if start > at:  # padding before this example
                pieces.append(query.new_zeros(start - at, self.hidden_size_per_partition))
            if n:
                # [n, heads, hn] -> [1, heads, n, hn]
                q, k, v = (x[start:start + n].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
                ctx = self._attend(q, k, v, None, causal and n > 1)
                pieces.append(ctx[0].transpose(0, 1).reshape(n, self.hidden_size_per_partition))
            at = start + n
        if at < t:
            pieces.append(query.new_zeros(t - at, self.hidden_size_per_partition))
        return torch.cat(pieces)  # [t, np*hn]; megatron reshapes it to [t, 1, np*hn]


def packed_seq_params(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor, max_seqlen: int,
                      device=None):
    """megatron's ``PackedSeqParams`` (thd) for one packed buffer (module docstring).

    ``cu_seqlens``: cumulative real lengths of the examples, ``cu_seqlens_padded``: the same
    with the padding that follows each example, ending at the buffer's length;
    ``max_seqlen``: the longest *padded* example (megatron's rope builds its table that long).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    cu_pad = cu_seqlens_padded.to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def left_padding_mask(pad: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    """Boolean mask [b, 1, sq, sk] (True = masked out) for rows left-padded by ``pad`` [b]
    tokens, whose sq queries are the last sq of sk positions (module docstring)."""
    a = torch.arange(sk - sq, sk, device=pad.device).view(1, sq, 1)  # each query's position
    k = torch.arange(sk, device=pad.device).view(1, 1, sk)
    masked = (k < pad.view(-1, 1, 1)) | (k > a)
    return (masked & (k != a)).unsqueeze(1)


@contextmanager
def mask_honouring_cores(model):
    """Within the block, every layer's core attention honours an explicit ``attention_mask``.

    transformer-engine's core (``attention_backend=te``) follows its mask *type* (causal)
    and would ignore the left-padding mask of batched decoding; for the duration it is
    replaced by an :class:`SDPAttention` built from the same attention module (the same
    scale, heads and process groups; a core attention holds no weights). ``sdpa`` and
    megatron's ``local`` core are kept. Yields the number of cores replaced.
    """
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    swapped = []
    for module in model.modules():
        if isinstance(module, Attention) and not isinstance(module.core_attention,
                                                            (SDPAttention, DotProductAttention)):
            swapped.append((module, module.core_attention))
    try:
        for attn, core in swapped:
            attn.core_attention = SDPAttention(
                config=getattr(core, "config", attn.config), layer_number=attn.layer_number,
                attn_mask_type=attn.attn_mask_type, attention_type=attn.attention_type,
                softmax_scale=attn.config.softmax_scale, pg_collection=attn.pg_collection)
        yield len(swapped)
    finally:
        for attn, core in swapped:
            attn.core_attention = core
