"""``peft.dropout_position``: dropout on the adapter input ("pre", the default) or on the
adapter output ("post", as NeMo's LoRA), against a hand computation on one layer (TP=1)::

    pre:   out = W x + s · v ⊙ B( u ⊙ A( dropout(x) ) )
    post:  out = W x + dropout( s · v ⊙ B( u ⊙ A x ) )

Both draw one mask from the default RNG, so re-seeding it reproduces the mask by hand.
The position changes no tensor: state dicts and adapter files have the same keys and shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import build, perturb, preset
from tiedlora.peft import AdaptedLinear
from tiedlora.peft.model import adapter_state_dict

P = 0.5  # large, so that a mask on the wrong tensor cannot go unnoticed
ATOL, RTOL = 1e-5, 1e-5  # fp32; the layer folds v into B and fuses the add (reordered products)
SEED = 7
TARGETS = ["linear_qkv", "linear_proj"]  # a column- and a row-parallel base


def _hand(layer: AdaptedLinear, x: torch.Tensor, position: str) -> torch.Tensor:
    """The formula of the module docstring, with the dropout mask drawn after seeding SEED."""
    ad = layer.adapter
    torch.manual_seed(SEED)
    xin = F.dropout(x, P, training=True) if position == "pre" else x
    h = F.linear(xin, ad.factor("A"))
    h = h * ad.u if ad.u is not None else h
    d = F.linear(h, ad.factor("B")) * ad.scale
    d = d * ad.v if ad.v is not None else d
    if position == "post":
        d = F.dropout(d, P, training=True)
    return layer.base(x)[0] + d


def _layer(name: str, target: str, position: str) -> tuple:
    model = build(preset(name, target_modules=f"[{target}]", alpha=16, rank=4, dropout=P,
                         dropout_position=position))
    perturb(model, seed=9)  # non-zero factors: ΔW x != 0
    model.train()
    return model, next(m for m in model.modules() if isinstance(m, AdaptedLinear))


@pytest.mark.parametrize("name", ["tl6", "lora"])
@pytest.mark.parametrize("target", TARGETS)
def test_pre_and_post_compute_their_formulas(mp1, name, target):
    outs = {}
    for position in ("pre", "post"):
        _, layer = _layer(name, target, position)
        x = torch.randn(5, 2, layer.base.input_size)
        torch.manual_seed(SEED)
        got = layer(x)[0]
        for expected_pos in ("pre", "post"):
            want = _hand(layer, x, expected_pos)
            if expected_pos == position:
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
            else:  # the other position's formula is far off: the test tells them apart
                assert (got - want).abs().max() > 1e-2
        outs[position] = got
        # evaluation: no dropout anywhere, both positions give W x + ΔW x
        layer.eval()
        torch.testing.assert_close(layer(x)[0], _hand_eval(layer, x), atol=ATOL, rtol=RTOL)


def _hand_eval(layer: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
    ad = layer.adapter
    h = F.linear(x, ad.factor("A"))
    h = h * ad.u if ad.u is not None else h
    d = F.linear(h, ad.factor("B")) * ad.scale
    d = d * ad.v if ad.v is not None else d
    return layer.base(x)[0] + d


def test_default_is_pre_and_formats_are_unchanged(mp1, tmp_path):
    from tiedlora.checkpoint import load_adapter, save_adapter

    assert preset("tl6").dropout_position == "pre"
    pre, _ = _layer("tl6", "linear_qkv", "pre")
    post, _ = _layer("tl6", "linear_qkv", "post")
    sd_pre, sd_post = pre.state_dict(), post.state_dict()
    assert list(sd_pre) == list(sd_post)
    assert all(getattr(sd_pre[k], "shape", None) == getattr(sd_post[k], "shape", None) for k in sd_pre)
    a_pre, a_post = adapter_state_dict(pre), adapter_state_dict(post)
    assert {k: v.shape for k, v in a_pre.items()} == {k: v.shape for k, v in a_post.items()}
    cfg = preset("tl6", dropout=P, dropout_position="post")
    save_adapter(tmp_path / "a.safetensors", a_post, cfg)
    tensors, saved, _ = load_adapter(tmp_path / "a.safetensors")
    assert saved.dropout_position == "post" and list(tensors) == list(a_post)


def test_bad_position_is_named():
    with pytest.raises(ValueError, match=r"peft.dropout_position='mid'.*\['pre', 'post'\]"):
        preset("tl6", dropout_position="mid")
