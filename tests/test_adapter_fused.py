"""The adapter's weight-side arithmetic (s·u and v folded into A/B, add fused into addmm)
against the activation-side formula it replaced: same outputs and gradients (TP=1).

The tensor-parallel placement of the folded factors (u before the copy on column targets,
u in B on row targets) is checked by tests/test_tensor_parallel.py (TP=2 vs TP=1 gradients
of every factor)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import PRESETS, build, perturb, preset, tiny_model_cfg
from numerics import assert_close
from tiedlora.peft import AdaptedLinear

pytestmark = pytest.mark.numerics
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _activation_side(layer: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
    """The previous formula at TP=1: base + v ⊙ B((s·u) ⊙ A x), scaling activations."""
    ad = layer.adapter
    A, B = ad.factor("A"), ad.factor("B")
    h = F.linear(x, A)
    h = h * (ad.u * ad.scale) if ad.u is not None else h * ad.scale
    out = F.linear(h, B)
    if ad.v is not None:
        out = out * ad.v
    base, _ = layer.base(x)
    return base + out


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("target", TARGETS)
def test_fused_equals_activation_side_formula(mp1, name, target):
    model = build(preset(name, target_modules=f"[{target}]", alpha=16, rank=4))
    perturb(model, seed=9)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLinear))
    # every factor this layer uses (tied ones live on the owner), frozen ones too: the
    # folding must not change what flows through them
    params = [layer.adapter.factor(f) for f in ("A", "B", "u", "v")]
    params = [p for p in params if p is not None]
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    x = torch.randn(7, 3, layer.base.input_size, requires_grad=True)
    g_out = torch.randn(7, 3, layer.base.weight.shape[0])

    grads = []
    for fn in (lambda: layer(x)[0], lambda: _activation_side(layer, x)):
        out = fn()
        got = torch.autograd.grad(out, [x] + params, g_out)
        grads.append((out.detach(), got))
    (out_new, g_new), (out_old, g_old) = grads
    # Folding s·u and v into the factors only reorders products, and the addmm adds the base
    # output inside the second product instead of after it. Output: the base's d_in-term sum,
    # A's d_in and B's r (plus the add and the scalings: a few more) -> K = 2·d_in + r + 4.
    d_in, r = layer.base.input_size, 4
    tokens = x.shape[0] * x.shape[1]
    assert_close(out_new, out_old, 2 * d_in + r + 4, f"{name} {target} output")
    # gradients: the backward sums over d_out (into x, into u) and r, then over the tokens
    d_out = g_out.shape[-1]
    grad_terms = 2 * d_in + r + 4 + d_out + r + tokens
    for i, (a, b) in enumerate(zip(g_new, g_old)):
        assert_close(a, b, grad_terms, f"{name} {target} grad {'of x' if i == 0 else f'of factor {i}'}")
    for p in frozen:
        p.requires_grad_(False)


def test_bf16_base_adds_in_base_dtype(mp1):
    model = build(preset("tl6", target_modules="[linear_qkv]"), tiny_model_cfg(params_dtype="bfloat16"))
    perturb(model, seed=2)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLinear))
    x = torch.randn(5, 2, layer.base.input_size, dtype=torch.bfloat16)
    out, _ = layer(x)
    assert out.dtype == torch.bfloat16
    base, _ = layer.base(x)
    torch.testing.assert_close(out, base + layer.adapter(x).to(torch.bfloat16), atol=0, rtol=0)
    assert (out.float() - base.float()).abs().max() > 0  # the adapter contributes
