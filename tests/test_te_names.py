"""Base checkpoints load into transformer-engine's layer spec (model.attention_backend=te): TE
fuses each pre-norm into the linear after it (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``), and the loaders map those to the canonical names. TE itself
does not import on CPU, so the model here is the local spec with its norms moved where TE keeps
them (the parameter names are all the loaders see)."""

import torch

from helpers import tiny_model_cfg
from tiedlora.convert.base_file import load_base, save_base
from tiedlora.convert.layout import base_parameters, canonical_name
from tiedlora.models.gpt import build_gpt_model


def test_te_norm_names_are_canonical():
    off = {0: 4}
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", off) == \
        "decoder.layers.4.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.base.layer_norm_bias", off) == \
        "decoder.layers.4.input_layernorm.bias"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.base.layer_norm_weight", off) == \
        "decoder.layers.4.pre_mlp_layernorm.weight"
    # everything else unchanged
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.weight", off) == \
        "decoder.layers.4.self_attention.linear_qkv.weight"
    assert canonical_name("decoder.final_layernorm.weight", off) == "decoder.final_layernorm.weight"


def _as_te(model):
    """Move each layer's pre-norm weight onto the linear after it, under TE's name."""
    for layer in model.decoder.layers:
        for norm, linear in (("input_layernorm", layer.self_attention.linear_qkv),
                             ("pre_mlp_layernorm", layer.mlp.linear_fc1)):
            w = getattr(layer, norm)._parameters.pop("weight")
            linear.register_parameter("layer_norm_weight", w)
    return model


def test_base_file_loads_into_te_named_model(mp1, tmp_path):
    cfg = tiny_model_cfg()
    src = build_gpt_model(cfg)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(base_parameters(src))):
            p.copy_(torch.randn_like(p) + i)
    path = tmp_path / "base.safetensors"
    save_base(path, [src], {"name": "tiny"})
    te = _as_te(build_gpt_model(cfg))
    names = dict(base_parameters(te))
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in names
    load_base([te], path, cfg)
    want = dict(base_parameters(src))
    assert names.keys() == want.keys()
    for n, p in names.items():
        assert torch.equal(p, want[n]), n
    moved = te.decoder.layers[1].mlp.linear_fc1.layer_norm_weight
    assert torch.equal(moved, src.decoder.layers[1].pre_mlp_layernorm.weight)
