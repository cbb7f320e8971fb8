"""megatron-core GPTModel from a small typed config (``conf/model/*.yaml``).

The layer spec is megatron-core's *local* spec (no transformer-engine needed) with the
norms replaced by :class:`tiedlora.models.norm.Norm` and the core attention chosen by
``attention_backend`` (:mod:`tiedlora.models.attention`: ``sdpa`` by default), so the same
model builds on a laptop CPU, in CI and in the NGC container. Weights are initialised on the CPU from the
seed as full matrices and then sliced (``use_cpu_initialization``), so a model built at
TP=2 holds exactly the shards of the TP=1 model.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from tiedlora import compat
from tiedlora.config import DTYPES, ModelConfig, ParallelConfig
from tiedlora.mcore_version import check_gated_fc1_stride

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert set(_DTYPES) == set(DTYPES)


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
        add_qkv_bias=cfg.add_qkv_bias,
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

    compat.require("build_gpt_model")
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
    apply_rope_scaling(model, cfg)
    if cfg.recompute_granularity is not None and pre:
        # megatron's recompute (torch's reentrant checkpoint) only backpropagates into a
        # recomputed segment whose input needs a gradient; with a frozen embedding it does not,
        # and the adapters of the first segment would get no gradient at all.
        model.embedding.register_forward_hook(_input_requires_grad)
    return model.to(compat.default_device())


def apply_rope_scaling(model, cfg: ModelConfig) -> None:
    """Scale the RoPE frequencies of ``model`` as ``cfg.rope_scaling`` says (before any forward).

    ``llama3`` (LLaMA-3.1/3.2) keeps wavelengths below ``original_max_positions /
    high_freq_factor``, divides those above ``original_max_positions / low_freq_factor`` by
    ``factor`` and blends linearly in between. megatron-core implements exactly this
    (``RotaryEmbedding._apply_scaling``) but its GPTModel passes only the factor, keeping
    LLaMA-3.1's other three numbers; LLaMA-3.2 and others need them from the checkpoint, so
    the frequencies are recomputed here with all four.
    """
    rope = getattr(model, "rotary_pos_emb", None)
    if cfg.rope_scaling is None or rope is None:
        return
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq, factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_scaling_low_freq_factor,
        high_freq_factor=cfg.rope_scaling_high_freq_factor,
        original_max_position_embeddings=cfg.rope_scaling_original_max_positions)


def _input_requires_grad(module, inputs, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
    return output


def build_model_chunks(cfg: ModelConfig, parallel: ParallelConfig) -> List:
    """All model chunks of this pipeline rank (one unless virtual pipeline is used)."""
    if parallel.vpp is None:
        return [build_gpt_model(cfg, parallel)]
    return [build_gpt_model(cfg, parallel, vp_stage=i) for i in range(parallel.vpp)]
