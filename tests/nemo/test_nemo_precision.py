"""NeMo's bf16 mixed precision keeps tiedlora's adapters in fp32; ``dropout_position``.

``MegatronMixedPrecision("bf16-mixed")`` wraps each model chunk in megatron-core's
``Float16Module`` after the PEFT transform, which casts every parameter to bf16.
``TiedLoRA`` gives the adapter tensors their fp32 values back before megatron's DDP and
optimizer are built. On CPU (bf16 matmuls run there), in one process: NeMo's own
``MegatronParallel.init_model_parallel`` (conversion + DDP), megatron's bf16 optimizer and
two training steps.

Run with ``.ci/nemo-tests`` (or ``.venv-nemo/bin/python -m pytest -q -m nemo tests/nemo``).
"""

from __future__ import annotations

import pytest
import torch

U_BF16 = 2.0 ** -8  # bf16 unit roundoff (8 significand bits)
LR = 1e-2
STEPS = 2
SEQ, BATCH, VOCAB = 16, 2, 256

pytestmark = pytest.mark.nemo


def _need_nemo():
    pytest.importorskip("nemo.lightning.pytorch.callbacks.peft", reason="NeMo 2 is not installed")


def _parallel_bf16(peft, distributed: bool):
    """A tiny llm.GPTModel in NeMo's MegatronParallel with the bf16 plugin, transformed by
    ``peft`` and then converted and DDP-wrapped by NeMo itself (fitting)."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from lightning.pytorch.trainer.states import TrainerFn
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.base import local_layer_spec
    from nemo.lightning.megatron_parallel import MegatronParallel

    config = llm.GPTConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, seq_length=SEQ,
        vocab_size=VOCAB, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, share_embeddings_and_output_weights=False,
        use_cpu_initialization=True, transformer_layer_spec=local_layer_spec,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0)
    model = llm.GPTModel(config)
    model.configure_model()
    plugin = nl.MegatronMixedPrecision(precision="bf16-mixed")
    parallel = MegatronParallel(model, cpu=True, convert_module_fn=plugin.convert_module,
                                ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distributed))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.state.fn = TrainerFn.FITTING
    model.trainer = trainer
    peft(parallel)
    before = {id(p): p.detach().clone() for p in parallel.parameters() if p.requires_grad}
    parallel.init_model_parallel()  # NeMo: convert_module_fn (Float16Module), then DDP
    return parallel, before


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_adapters_stay_fp32_and_train_under_bf16_mixed(mp1, distributed):
    _need_nemo()
    import megatron.core.optimizer as mopt
    from megatron.core.transformer.module import Float16Module
    from nemo.core.optim.mcore_optim import McoreDistributedOptimizer

    from tiedlora.integrations.nemo import TiedLoRA, TiedLoRALinear, mcore_chunks
    from tiedlora.peft.model import iter_adapter_params

    parallel, init = _parallel_bf16(TiedLoRA("tl6", rank=4, alpha=8), distributed)
    chunk = parallel[0].module  # megatron DDP
    assert any(isinstance(m, Float16Module) for m in parallel.modules())
    gpt = mcore_chunks(parallel)[0]
    recs = list(iter_adapter_params(gpt))
    assert len(recs) == 2 + 2 * 2  # tied A, B; u, v per layer
    assert {r.param.dtype for r in recs} == {torch.float32}
    assert gpt.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    # the exact fp32 values from before the cast (no bf16 round trip), the same tensors
    assert {id(p) for p in parallel.parameters() if p.requires_grad} == set(init)
    for name, p in parallel.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), init[id(p)], atol=0, rtol=0, msg=name)

    # the adapter branch: fp32 factors on the bf16 input cast up; against an fp32 reference on
    # the unrounded input, the only difference is the input's bf16 rounding:
    # |ΔW (x - bf16(x))| <= u_bf16 · (|ΔW| |x|), plus fp32 rounding (negligible, covered by 2x)
    layer = gpt.decoder.layers[0].self_attention.linear_qkv
    assert isinstance(layer, TiedLoRALinear)
    with torch.no_grad():
        for p in (layer.adapter.factor(f) for f in "AB"):
            p.add_(torch.randn_like(p) * 0.1)  # B starts at kaiming, A too: ΔW != 0 either way
        x = torch.randn(SEQ, BATCH, 64)
        got = layer.adapter(x.to(torch.bfloat16))
        assert got.dtype == torch.float32
        ad = layer.adapter
        dW = ad.scale * ad.v[:, None] * ad.factor("B") @ (ad.u[:, None] * ad.factor("A"))
        ref = x @ dW.t()
        bound = 2 * U_BF16 * (x.abs() @ dW.abs().t())
        assert ((got - ref).abs() <= bound).all(), float(((got - ref).abs() / bound).max())
        # the base path stays bf16: the layer's output has the base's dtype
        out, _ = layer(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        for p in (layer.adapter.factor(f) for f in "AB"):
            p.copy_(init[id(p)])

    # megatron's bf16 optimizer (as NeMo wraps it) over fp32 adapter parameters: they are
    # stepped directly (no bf16 copy), and two steps update every tensor
    optim = McoreDistributedOptimizer(mopt.get_megatron_optimizer(
        mopt.OptimizerConfig(optimizer="adam", lr=LR, bf16=True, use_distributed_optimizer=distributed,
                             clip_grad=1.0), [chunk]))
    inner = getattr(optim.mcore_optimizer, "chained_optimizers", [optim.mcore_optimizer])
    f16, f32 = ("model_float16_groups", "model_fp32_groups") if distributed else \
        ("float16_groups", "fp32_from_fp32_groups")
    assert sum(len(g) for o in inner for g in getattr(o, f16)) == 0
    assert {id(p) for o in inner for g in getattr(o, f32) for p in g} == set(init)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None].expand(BATCH, 1, SEQ, SEQ)
    losses = []
    for _ in range(STEPS):
        chunk.zero_grad_buffer()
        optim.zero_grad()
        loss = chunk(tokens, pos, mask, labels=labels).float().mean()
        loss.backward()
        chunk.finish_grad_sync()
        _, grad_norm, _ = optim.step()
        assert grad_norm is not None and grad_norm > 0
        losses.append(float(loss))
    assert losses[1] < losses[0]
    for name, p in parallel.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
            assert not torch.equal(p.detach(), init[id(p)]), f"{name} did not change"
    assert {r.param.dtype for r in iter_adapter_params(gpt)} == {torch.float32}


def test_dropout_position_reaches_the_config():
    _need_nemo()
    from tiedlora.integrations.nemo import TiedLoRA

    assert TiedLoRA("tl6").peft_config.dropout_position == "pre"
    assert TiedLoRA("lora", dropout=0.1, dropout_position="post").peft_config.dropout_position == "post"
    with pytest.raises(ValueError, match=r"peft.dropout_position='mid'"):
        TiedLoRA("tl6", dropout_position="mid")
