"""The adapter on a tiny megatron-core GPTModel (TP=1): numerics, ΔW = 0, tying, trainable set."""

import pytest
import torch

from helpers import ALL_TARGETS, PRESETS, batch, build, perturb, preset, targets_override, tiny_model_cfg
from numerics import Net, assert_close, gradient_terms
from tiedlora.models.gpt import build_gpt_model
from tiedlora.peft import AdaptedLinear, TiedLoRAAdapter, adapter_parameters, iter_adapter_params

TARGETS = targets_override(ALL_TARGETS)


def _targets(model):
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


@pytest.mark.parametrize("name", PRESETS)
def test_delta_w_is_zero_at_step_zero(mp1, name):
    from tiedlora.dist import set_seed

    ids, pos, labels = batch()
    set_seed(1)
    base = build_gpt_model(tiny_model_cfg())
    with torch.no_grad():
        ref = base(ids, pos, None)
    set_seed(1)
    model = build(preset(name, target_modules=TARGETS))
    with torch.no_grad():
        out = model(ids, pos, None)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def _dense_reference(layer: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
    ad = layer.adapter
    A, B = ad.factor("A"), ad.factor("B")
    u = ad.u if ad.u is not None else torch.ones(A.shape[0])
    v = ad.v if ad.v is not None else torch.ones(B.shape[0])
    delta_w = ad.scale * torch.diag(v) @ B @ torch.diag(u) @ A  # (d_out, d_in)
    return x @ layer.base.weight.t() + x @ delta_w.t()


@pytest.mark.numerics
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("target", ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
def test_layer_equals_dense_reference(mp1, name, target):
    model = build(preset(name, target_modules=f"[{target}]", alpha=16))
    perturb(model, seed=3)
    layer = _targets(model)[0]
    assert layer.adapter.mode == ("column" if target in ("linear_qkv", "linear_fc1") else "row")
    x = torch.randn(5, 2, layer.base.input_size)
    out, bias = layer(x)
    assert bias is None
    # a d_in-term sum, then the adapter's r-term sum of 4-factor products (s, v, B, u·A x)
    terms = layer.base.input_size + layer.adapter.factor("A").shape[0] + 4
    assert_close(out, _dense_reference(layer, x), terms, f"{name} {target} output")


def test_scale_is_alpha_over_rank(mp1):
    model = build(preset("tl6", alpha=32, rank=4))
    assert all(m.adapter.scale == 8.0 for m in _targets(model))


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "lora"])
def test_tied_factors_one_storage_one_key(mp1, name):
    model = build(preset(name, target_modules=TARGETS))
    state_keys = list(model.state_dict().keys())
    for target in ALL_TARGETS:
        layers = [m for m in _targets(model) if m.adapter.target == target]
        assert len(layers) == 2
        for f in ("A", "B"):
            ptrs = {m.adapter.factor(f).data_ptr() for m in layers}
            assert len(ptrs) == 1, f"{target}.{f} has {len(ptrs)} storages"
            keys = [k for k in state_keys if k.endswith(f"{target}_{f}")]
            assert keys == [f"tied_adapters.{target}_{f}"]
        for f in ("u", "v"):
            vecs = [getattr(m.adapter, f) for m in layers]
            if vecs[0] is not None:
                assert vecs[0].data_ptr() != vecs[1].data_ptr()
    names = [r.name for r in iter_adapter_params(model)]
    assert len(names) == len(set(names))


def test_records_describe_every_adapter_tensor(mp1):
    """What the optimizer, gradient sync and clipping read: factor, tied, shard dim, and the
    tensor-parallel group, which is the run's (dist.process_groups) on every adapter."""
    from tiedlora.dist import process_groups

    model = build(preset("tl6", target_modules=TARGETS))
    recs = list(iter_adapter_params(model))
    assert {(r.factor, r.tied) for r in recs} == {("A", True), ("B", True), ("u", False), ("v", False)}
    assert {r.shard_dim for r in recs if r.factor == "B"} == {None, 0}  # row (replicated), column (rows)
    for r in recs:
        assert r.name.endswith("." + r.factor) and r.name.startswith("tied." if r.tied else "layers.")
        assert (r.shard_dim, r.stride) == ((r.param.partition_dim, r.param.partition_stride)
                                           if getattr(r.param, "tensor_model_parallel", False) else (None, 1))
    assert all(m.adapter.tp_group is process_groups().tp for m in _targets(model))


def test_lora_factors_are_per_layer(mp1):
    model = build(preset("lora", target_modules=TARGETS))
    assert not list(model.tied_adapters.parameters())
    qkv = [m.adapter for m in _targets(model) if m.adapter.target == "linear_qkv"]
    assert qkv[0].A.data_ptr() != qkv[1].A.data_ptr()


@pytest.mark.numerics
def test_tied_gradient_is_sum_of_per_layer_contributions(mp1):
    ids, pos, labels = batch()
    model = build(preset("tl6", target_modules=TARGETS))
    perturb(model, seed=5)
    model(ids, pos, None, labels=labels).mean().backward()
    tied = {r.name: r.param.grad.clone() for r in iter_adapter_params(model) if r.tied}

    # Untie: give every layer its own copy of A and B, rerun, and sum the copies' grads.
    model.zero_grad(set_to_none=True)
    copies = {}
    for m in _targets(model):
        for f in ("A", "B"):
            own = torch.nn.Parameter(m.adapter.factor(f).detach().clone())
            setattr(m.adapter, f, own)
            copies.setdefault(f"tied.{m.adapter.target}.{f}", []).append(own)
    model(ids, pos, None, labels=labels).mean().backward()
    for name, grad in tied.items():
        summed = sum(c.grad for c in copies[name])
        assert len(copies[name]) == 2
        assert_close(grad, summed, gradient_terms(Net.of(tiny_model_cfg(), seq=ids.shape[1], rank=8), ids.numel()),
                     f"{name} gradient")
        assert grad.abs().sum() > 0


def _expected_trainable(cfg, layers=2):
    out = set()
    for t in cfg.target_modules:
        for f in "AB":
            if getattr(cfg, f).trainable:
                out |= {f"tied.{t}.{f}"} if getattr(cfg, f).tied else {f"layers.{i}.{t}.{f}" for i in range(layers)}
        for f in "uv":
            if getattr(cfg, f).trainable:
                out |= {f"layers.{i}.{t}.{f}" for i in range(layers)}
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_trainable_set_and_counts(mp1, name):
    cfg = preset(name, target_modules=TARGETS, rank=4)
    model_cfg = tiny_model_cfg()
    model = build(cfg, model_cfg)
    trainable = adapter_parameters(model)
    assert set(trainable) == _expected_trainable(cfg)
    every = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(every) == len(trainable)  # nothing outside the adapters trains
    shapes = {t: model_cfg.target_shape(t) for t in cfg.target_modules}
    assert sum(p.numel() for p in trainable.values()) == cfg.trainable_count(shapes, model_cfg.num_layers)

    # One optimizer step moves the zero factor off zero; then every trainable tensor gets a
    # non-zero gradient (no saddle) and the base none.
    ids, pos, labels = batch()
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        model(ids, pos, None, labels=labels).mean().backward()
        if step == 0:
            opt.step()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
