"""The adapter's arithmetic (v folded into B, s·u on the r-wide activation, the add fused
into the second matmul with its own backward, in the base output's storage where safe)
against the plain activation-side formula: same outputs and gradients (TP=1).

The tensor-parallel placement of u (before the copy on column targets, after the reduce on
row targets) is checked by tests/test_tensor_parallel.py (TP=2 vs TP=1 gradients of every
factor)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import PRESETS, build, perturb, preset, tiny_model_cfg
from numerics import assert_close
from tiedlora.peft import AdaptedLinear
from tiedlora.peft.layer import SKINNY_RANK

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


@pytest.mark.parametrize("rank", [4, 16])  # both backward layouts (r ≤ SKINNY_RANK and above)
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("target", TARGETS)
def test_fused_equals_activation_side_formula(mp1, name, target, rank):
    assert (4 <= SKINNY_RANK) and (16 > SKINNY_RANK)
    model = build(preset(name, target_modules=f"[{target}]", alpha=16, rank=rank))
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
    # Folding v into B and scaling A x by s·u only reorder products, and the fused add puts the
    # base output inside the second product instead of after it. Output: the base's d_in-term sum,
    # A's d_in and B's r (plus the add and the scalings: a few more) -> K = 2·d_in + r + 4.
    d_in, r = layer.base.input_size, rank
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


@pytest.mark.parametrize("target,in_place", [("linear_qkv", True), ("linear_fc1", True),
                                             ("linear_proj", False), ("linear_fc2", False)])
def test_add_writes_into_base_output_only_where_safe(mp1, target, in_place):
    """Column targets: the sum lands in the base output's own storage (no [tokens, d_out] copy).
    Row targets at TP=1: megatron's reduce returns its input as-is (autograd makes that a view),
    which must not be written in place, so a new tensor comes back; both train (backward runs)."""
    model = build(preset("tl6", target_modules=f"[{target}]"))
    perturb(model, seed=4)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLinear))
    seen = {}
    hook = layer.base.register_forward_hook(lambda m, i, o: seen.update(ptr=o[0].data_ptr()))
    x = torch.randn(6, 2, layer.base.input_size, requires_grad=True)
    out, _ = layer(x)
    hook.remove()
    assert (out.data_ptr() == seen["ptr"]) is in_place
    out.square().sum().backward()
    assert x.grad is not None and layer.adapter.factor("A").grad is not None


U_BF16 = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)


@pytest.mark.parametrize("name", ["lora", "vera", "tl6"])
@pytest.mark.parametrize("target", ["linear_qkv", "linear_proj"])
def test_autocast_bf16_follows_fp32(mp1, name, target):
    """Training under bf16 autocast (as finetune does on a GPU; CPU autocast here): the fused
    add gets B in the activations' dtype and u's scaling keeps h in it, so the step runs, and
    output and every factor's gradient stay within bf16 rounding of the fp32 evaluation.
    Each value on the path (x, W, A, h, s·u ⊙ h, B, the output; in backward dL/dh and the
    factor gradients) is rounded to bf16 once, a relative error of at most U_BF16 each, and
    to first order these add: about 8 roundings, times SAFETY 2 for the two evaluations."""
    model = build(preset(name, target_modules=f"[{target}]"))
    perturb(model, seed=3)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLinear))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(6, 2, layer.base.input_size)
    results = []
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out, _ = layer(x)
        assert out.dtype == (dtype or torch.float32)
        out.float().square().sum().backward()
        results.append((out.detach().float(),
                        {n: p.grad.clone() for n, p in params.items() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (ref, g_ref), (got, g_got) = results
    bound = 2 * 8 * U_BF16
    assert (got - ref).abs().max() <= bound * ref.abs().max(), f"{name} {target} output"
    assert g_ref, "no trainable factor"
    for n in g_ref:
        err = (g_got[n] - g_ref[n]).abs().max()
        assert err <= bound * g_ref[n].abs().max(), f"{name} {target} grad of {n}: {err}"
