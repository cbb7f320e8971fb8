"""megatron-core GPTModel from a small typed config (``conf/model/*.yaml``).

The layer spec is megatron-core's *local* spec (no transformer-engine needed) with the
norms replaced by :class:`tiedlora.models.norm.Norm` and the core attention chosen by
``attention_backend`` (:mod:`tiedlora.models.attention`: ``sdpa`` by default), so the same
model builds on a laptop CPU, in CI and in the NGC container. Weights are initialised on the CPU from the
seed as full matrices and then sliced (``use_cpu_initialization``), so a model built at
TP=2 holds exactly the shards of the TP=1 model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from tiedlora import compat
from tiedlora.mcore_version import check_gated_fc1_stride

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_BACKENDS = ("sdpa", "local", "te")  # see tiedlora.models.attention


@dataclass
class ModelConfig:
    """Architecture of a megatron-core GPT base model (defaults: the tiny CPU model)."""

    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (= heads)
    kv_channels: Optional[int] = None  # None: hidden_size / heads
    vocab_size: int = 512
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 256
    normalization: str = "RMSNorm"  # LayerNorm | RMSNorm
    layernorm_zero_centered_gamma: bool = False  # NeMo's layernorm1p
    layernorm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | gelu
    position_embedding_type: str = "rope"  # rope | learned_absolute
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    add_bias_linear: bool = False
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    params_dtype: str = "float32"  # float32 | bfloat16 (adapters always stay fp32)
    attention_backend: str = "sdpa"  # sdpa | local (megatron's unfused) | te (transformer-engine)
    # Activation recomputation (megatron-core's): null | selective (core attention) | full (layers)
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # full only: uniform | block
    recompute_num_layers: Optional[int] = None  # full only: layers per unit (uniform) / per stage (block)
    checkpoint: Optional[str] = None  # base weights (.nemo, HF dir or our .safetensors)
    tokenizer: Optional[str] = None  # tokenizer model file/dir; None: from the checkpoint

    def __post_init__(self):
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"model.{f}={v!r}: must be a positive integer")
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_query_groups={self.num_query_groups}: must divide "
                f"num_attention_heads={self.num_attention_heads}")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"model.normalization={self.normalization!r}: expected LayerNorm or RMSNorm")
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"model.activation={self.activation!r}: expected swiglu or gelu")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(
                f"model.position_embedding_type={self.position_embedding_type!r}: "
                "expected rope or learned_absolute")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"model.rotary_percent={self.rotary_percent!r}: must be in (0, 1]")
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"model.params_dtype={self.params_dtype!r}: expected one of {sorted(_DTYPES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r}: "
                             f"expected one of {list(ATTENTION_BACKENDS)}")
        self._check_recompute()

    def _check_recompute(self) -> None:
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in (None, "selective", "full"):
            raise ValueError(f"model.recompute_granularity={g!r}: expected null, selective or full")
        if m not in (None, "uniform", "block"):
            raise ValueError(f"model.recompute_method={m!r}: expected null, uniform or block")
        if g != "full":
            for field, value in (("recompute_method", m), ("recompute_num_layers", n)):
                if value is not None:
                    raise ValueError(f"model.{field}={value!r}: only used with "
                                     f"model.recompute_granularity=full (it is {g!r}); set it to null")
            return
        if m is None:
            raise ValueError("model.recompute_method=None: recompute_granularity=full needs uniform or block")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.num_layers:
            raise ValueError(f"model.recompute_num_layers={n!r}: recompute_granularity=full needs an "
                             f"integer in [1, num_layers={self.num_layers}]")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def qkv_width(self) -> int:
        """Output width of the fused QKV projection (megatron's ``linear_qkv``)."""
        groups = self.num_query_groups or self.num_attention_heads
        return self.head_dim * (self.num_attention_heads + 2 * groups)

    def target_shape(self, target: str) -> tuple[int, int]:
        """(d_in, d_out) of an adapter target, unsharded."""
        h, ffn = self.hidden_size, self.ffn_hidden_size
        fc1_out = 2 * ffn if self.activation == "swiglu" else ffn
        shapes = {
            "linear_qkv": (h, self.qkv_width),
            "linear_proj": (self.head_dim * self.num_attention_heads, h),
            "linear_fc1": (h, fc1_out),
            "linear_fc2": (ffn, h),
        }
        return shapes[target]

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel size = world size / (tp * pp)."""

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: Optional[int] = None  # virtual pipeline stages (model chunks) per pipeline rank
    sp: bool = False  # sequence parallel (needs tp > 1)

    def __post_init__(self):
        for f in ("tp", "pp"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{f}={v!r}: must be an integer >= 1")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise ValueError(f"parallel.vpp={self.vpp!r}: needs parallel.pp >= 2 and vpp >= 1")
        if self.sp and self.tp < 2:
            raise ValueError(f"parallel.sp={self.sp!r}: sequence parallel needs parallel.tp >= 2")


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, *, perform_initialization=True):
    """megatron-core TransformerConfig for ``cfg`` under ``parallel``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[cfg.params_dtype]
    on_gpu = compat.cuda_available()
    if parallel.vpp is not None and cfg.num_layers % (parallel.pp * parallel.vpp):
        raise ValueError(
            f"model.num_layers={cfg.num_layers} is not divisible by pp*vpp="
            f"{parallel.pp * parallel.vpp}")
    if cfg.num_layers % parallel.pp:
        raise ValueError(f"model.num_layers={cfg.num_layers} is not divisible by parallel.pp={parallel.pp}")
    per_stage = cfg.num_layers // (parallel.pp * (parallel.vpp or 1))
    if cfg.recompute_num_layers is not None and cfg.recompute_num_layers > per_stage:
        raise ValueError(
            f"model.recompute_num_layers={cfg.recompute_num_layers}: more than the {per_stage} layers "
            f"of one pipeline stage (num_layers={cfg.num_layers}, parallel.pp={parallel.pp}, "
            f"parallel.vpp={parallel.vpp})")
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=F.silu if cfg.activation == "swiglu" else F.gelu,
        add_bias_linear=cfg.add_bias_linear,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # gloo pairs batched send/recv wrongly when both neighbours are one peer
        # (interleaved PP=2): silently wrong results. NCCL is fine either way.
        batch_p2p_comm=on_gpu,
        deallocate_pipeline_outputs=False,
        # The loss function returns (sum of token losses, token count); gradients are
        # divided by the global token count of the step (tiedlora.peft.grads), so micro-
        # and data-parallel batching never changes the update.
        calculate_per_token_loss=True,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
    )


def layer_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
               attention_backend: str = "sdpa"):
    """megatron-core local layer spec with our norm and core attention, as block submodules."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from tiedlora.models.attention import SDPAttention, require_backend
    from tiedlora.models.norm import Norm

    require_backend(attention_backend)
    if attention_backend == "te":
        # fused layernorm into linear_qkv / linear_fc1 (their norm weights are named
        # ``layer_norm_weight`` there), TE's fused attention and linears
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=config.normalization)
        spec.submodules.input_layernorm = Norm
        spec.submodules.pre_mlp_layernorm = Norm
    if attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=Norm)


def build_gpt_model(
    cfg: ModelConfig,
    parallel: Optional[ParallelConfig] = None,
    *,
    vp_stage: Optional[int] = None,
    meta: bool = False,
):
    """Build one GPTModel chunk for this rank (megatron's parallel state must be initialised).

    ``meta=True`` allocates no weights (parameter counting for 7B models on a laptop).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    compat.install()
    parallel = parallel or ParallelConfig()
    config = transformer_config(cfg, parallel, perform_initialization=not meta)
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage=vp_stage,
                                          attention_backend=cfg.attention_backend),
        vocab_size=cfg.padded_vocab_size(parallel.tp),
        max_sequence_length=cfg.seq_length,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )
    if meta:
        with torch.device("meta"):
            model = GPTModel(**kwargs)
        check_gated_fc1_stride(model)
        return model
    model = GPTModel(**kwargs)
    check_gated_fc1_stride(model)
    if cfg.recompute_granularity is not None and pre:
        # megatron's recompute (torch's reentrant checkpoint) only backpropagates into a
        # recomputed segment whose input needs a gradient; with a frozen embedding it does not,
        # and the adapters of the first segment would get no gradient at all.
        model.embedding.register_forward_hook(_input_requires_grad)
    return model.to(compat.default_device())


def _input_requires_grad(module, inputs, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
    return output


def build_model_chunks(cfg: ModelConfig, parallel: ParallelConfig) -> List:
    """All model chunks of this pipeline rank (one unless virtual pipeline is used)."""
    if parallel.vpp is None:
        return [build_gpt_model(cfg, parallel)]
    return [build_gpt_model(cfg, parallel, vp_stage=i) for i in range(parallel.vpp)]


def config_from_dict(d: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown model config field(s): {unknown}")
    return ModelConfig(**d)
