"""Attention backends (sdpa vs megatron's local core) and activation recomputation (TP=1, CPU)."""

import pytest
import torch

import math

from helpers import ALL_TARGETS, batch, build, perturb, preset, targets_override, tiny_model_cfg
from numerics import Net, assert_close, forward_terms, gradient_terms
from tiedlora.config import ModelConfig, ParallelConfig
from tiedlora.models.gpt import build_gpt_model, transformer_config
from tiedlora.peft import adapter_parameters

GQA = dict(num_attention_heads=4, num_query_groups=2)
pytestmark = pytest.mark.numerics


def _close(got, q, k, ref, what, scale=None):
    """The fused kernel and megatron's baddbmm + softmax + bmm differ only in summation order.
    A score q·k sums head_dim products, so its rounding error is at most head_dim·u·max|s|
    (|s| the score's size, relative to which a softmax input's error counts); the softmax
    adds sk terms and the probabilities × values another sk, each relative to the output's
    size (a convex combination of the values). So K = ceil(head_dim·max|s|) + 2·sk."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    groups = q.size(2) // k.size(2)
    kk = k.repeat_interleave(groups, dim=2)
    smax = float((torch.einsum("sbhd,tbhd->bhst", q.double(), kk.double()) * scale).abs().max())
    terms = math.ceil(q.size(-1) * max(1.0, smax)) + 2 * k.size(0)
    assert_close(got, ref, terms, what)


def _core(kind: str, cfg: ModelConfig, layer_number: int = 1, dropout: float = 0.0):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from tiedlora.models.attention import SDPAttention

    config = transformer_config(cfg, ParallelConfig())
    config.attention_dropout = dropout
    cls = SDPAttention if kind == "sdpa" else DotProductAttention
    return cls(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
               attention_type="self")


def _qkv(cfg: ModelConfig, sq: int, sk: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    q = torch.randn(sq, b, heads, cfg.head_dim, generator=g)
    k = torch.randn(sk, b, groups, cfg.head_dim, generator=g)
    v = torch.randn(sk, b, groups, cfg.head_dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("heads", [{}, GQA], ids=["mha", "gqa"])
def test_core_matches_local_causal_mask_and_decode(mp1, heads):
    from megatron.core.transformer.enums import AttnMaskType

    cfg = tiny_model_cfg(**heads)
    sdpa, local = _core("sdpa", cfg).eval(), _core("local", cfg).eval()
    q, k, v = _qkv(cfg, 12, 12)
    out = sdpa(q, k, v, None)
    assert out.shape == (12, 2, cfg.num_attention_heads * cfg.head_dim)
    _close(out, q, k, local(q, k, v, None), "sdpa vs local, causal")
    # not just any attention: the causal one (the first query sees only the first key, so its
    # output is that key's value, exactly: one softmax weight of 1, no sum)
    torch.testing.assert_close(out[0].view(2, -1, cfg.head_dim),
                               v[0].repeat_interleave(q.size(2) // k.size(2), dim=1), atol=0, rtol=0)
    # an explicit boolean mask (True = masked out), e.g. left padding: used as given
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1).expand(2, 1, 12, 12).clone()
    mask[1, :, :, :3] = True  # sample 1: the first 3 keys are padding
    _close(sdpa(q, k, v, mask), q, k, local(q, k, v, mask), "sdpa vs local, padding mask")
    # a KV-cache decode step: one query against the whole cache, no mask
    q1 = q[-1:]
    for mt in (AttnMaskType.no_mask, AttnMaskType.causal):
        _close(sdpa(q1, k, v, None, attn_mask_type=mt), q1, k, local(q1, k, v, None, attn_mask_type=mt),
               f"sdpa vs local, decode step ({mt.name})")


@pytest.mark.parametrize("heads", [{}, GQA], ids=["mha", "gqa"])
def test_packed_thd_core_attends_each_example_alone(mp1, heads):
    """A thd buffer of three examples and a padding tail: each example's output is the
    causal attention of that example alone (megatron's local core on it as a batch of one),
    the padding positions are zero, and the whole thing is differentiable."""
    from tiedlora.models.attention import packed_seq_params

    cfg = tiny_model_cfg(**heads)
    sdpa, local = _core("sdpa", cfg).eval(), _core("local", cfg).eval()
    lengths, t = [5, 9, 1, 3], 24  # four examples (one of a single token), 6 tokens of padding
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    padded = torch.cat([cu[:-1], torch.tensor([t])])
    q, k, v = (x[:, 0] for x in _qkv(cfg, t, t, b=1, seed=5))  # [t, heads, hn]
    q.requires_grad_(True)
    out = sdpa(q, k, v, None, packed_seq_params=packed_seq_params(cu, padded, max_seqlen=9))
    assert out.shape == (t, cfg.num_attention_heads * cfg.head_dim)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sl = slice(a, b)
        ref = local(q[sl].unsqueeze(1), k[sl].unsqueeze(1), v[sl].unsqueeze(1), None)[:, 0]
        _close(out[sl], q[sl].unsqueeze(1), k[sl].unsqueeze(1), ref, f"example [{a}, {b}) of the pack")
    assert torch.equal(out[int(cu[-1]):], torch.zeros(t - int(cu[-1]), out.shape[1]))
    out.sum().backward()
    assert q.grad[:int(cu[-1])].abs().sum() > 0 and q.grad[int(cu[-1]):].abs().sum() == 0
    # without cu_seqlens_padded the buffer must end where the examples end
    with pytest.raises(ValueError, match="packed buffer holds 24 tokens but cu_seqlens ends at 18"):
        sdpa(q, k, v, None, packed_seq_params=_without_padded(packed_seq_params(cu, padded, max_seqlen=9)))
    with pytest.raises(ValueError, match="take no attention_mask"):
        sdpa(q, k, v, torch.zeros(1, 1, t, t, dtype=torch.bool),
             packed_seq_params=packed_seq_params(cu, padded, max_seqlen=9))


def _without_padded(params):
    params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = None
    return params


def test_core_softmax_scale_and_layer_scaling(mp1):
    cfg = tiny_model_cfg()
    q, k, v = _qkv(cfg, 8, 8, seed=1)
    for scale in (None, 0.37):
        config = transformer_config(cfg, ParallelConfig())
        config.apply_query_key_layer_scaling = True
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.enums import AttnMaskType

        from tiedlora.models.attention import SDPAttention

        kw = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal,
                  attention_type="self", softmax_scale=scale)
        _close(SDPAttention(**kw)(q, k, v, None), q, k, DotProductAttention(**kw)(q, k, v, None),
               f"softmax_scale={scale}", scale=scale or 1.0 / math.sqrt(cfg.head_dim))


def test_core_attention_dropout(mp1):
    from tiedlora.dist import set_seed

    cfg = tiny_model_cfg()
    q, k, v = _qkv(cfg, 16, 16, seed=2)
    core = _core("sdpa", cfg, dropout=0.5)
    ref = _core("local", cfg).eval()(q, k, v, None)
    _close(core.eval()(q, k, v, None), q, k, ref, "eval: dropout off")
    core.train()
    set_seed(7)
    a = core(q, k, v, None)
    set_seed(7)
    b = core(q, k, v, None)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # drawn from the seeded model-parallel RNG
    assert (a - ref).abs().max() > 0.1
    # inverted dropout keeps the expectation: the average over many draws approaches eval
    mean = torch.stack([core(q, k, v, None) for _ in range(300)]).mean(0)
    assert (mean - ref).abs().mean() < 0.1 * ref.abs().mean()


@pytest.mark.parametrize("heads", [{}, GQA], ids=["mha", "gqa"])
def test_model_logits_and_adapter_grads_match_local(mp1, heads):
    from tiedlora.dist import set_seed

    ids, pos, labels = batch(s=24)
    net = Net.of(tiny_model_cfg(**heads), seq=ids.shape[1], rank=8)
    results = {}
    for backend in ("local", "sdpa"):
        set_seed(11)
        model = build(preset("tl6", target_modules=targets_override(ALL_TARGETS)),
                      tiny_model_cfg(attention_backend=backend, **heads))
        perturb(model, seed=4)
        logits = model(ids, pos, None)
        model(ids, pos, None, labels=labels).mean().backward()
        results[backend] = (logits.detach(), {n: p.grad for n, p in adapter_parameters(model).items()})
    assert_close(results["sdpa"][0], results["local"][0], forward_terms(net), "logits sdpa vs local")
    assert results["sdpa"][1].keys() == results["local"][1].keys()
    for n, g in results["local"][1].items():
        assert_close(results["sdpa"][1][n], g, gradient_terms(net, ids.numel()), f"{n}.grad sdpa vs local")


def test_sdpa_is_the_default_and_in_the_layer(mp1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tiedlora.models.attention import SDPAttention

    assert ModelConfig().attention_backend == "sdpa"
    cores = [type(m) for m in build_gpt_model(tiny_model_cfg()).modules()
             if isinstance(m, (SDPAttention, DotProductAttention))]
    assert cores == [SDPAttention, SDPAttention]
    cores = [type(m) for m in build_gpt_model(tiny_model_cfg(attention_backend="local")).modules()
             if isinstance(m, (SDPAttention, DotProductAttention))]
    assert cores == [DotProductAttention, DotProductAttention]


def test_kv_cache_generation_with_sdpa_gqa(mp1):
    from tiedlora.generate import greedy_generate

    model = build_gpt_model(tiny_model_cfg(**GQA))
    prompts = [[5, 9, 17, 3], [8, 1, 2, 40, 41, 7], [100]]
    a = greedy_generate(model, prompts, 10, eos_id=-1, vocab_size=256, use_cache=True)
    b = greedy_generate(model, prompts, 10, eos_id=-1, vocab_size=256, use_cache=False)
    assert a == b and all(len(x) == 10 for x in a)


def test_bad_backend_and_te_without_transformer_engine(mp1):
    from tiedlora.models.attention import te_available

    with pytest.raises(ValueError, match=r"model.attention_backend='flash'"):
        tiny_model_cfg(attention_backend="flash")
    if te_available():
        pytest.skip("transformer-engine imports here")
    with pytest.raises(RuntimeError, match=r"model.attention_backend='te' needs transformer-engine"):
        build_gpt_model(tiny_model_cfg(attention_backend="te"))


# ------------------------------------------------------------ activation recomputation

@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="selective"),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
], ids=["selective", "full-uniform-1", "full-uniform-2", "full-block-1"])
@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_recompute_same_loss_and_adapter_grads(mp1, recompute, backend):
    from tiedlora.dist import set_seed

    ids, pos, labels = batch(s=16)
    net = Net.of(tiny_model_cfg(), seq=ids.shape[1], rank=8)
    results = []
    for rc in ({}, recompute):
        set_seed(3)
        model = build(preset("tl6", target_modules=targets_override(ALL_TARGETS)),
                      tiny_model_cfg(attention_backend=backend, **rc))
        perturb(model, seed=6)
        model.train()
        loss = model(ids, pos, None, labels=labels).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in adapter_parameters(model).items()}))
    (loss0, g0), (loss1, g1) = results
    # recomputation reruns the same kernels on the same inputs: bit-identical in practice, but
    # only the rounding bound is promised (a recomputed block may pick another kernel path)
    assert_close(loss1, loss0, forward_terms(net) + net.vocab + ids.numel(), "loss under recompute")
    assert g1.keys() == g0.keys()
    for n, g in g0.items():
        assert g1[n] is not None, f"{n}: no gradient under recompute"
        assert_close(g1[n], g, gradient_terms(net, ids.numel()), f"{n}.grad under recompute")


@pytest.mark.parametrize("fields, match", [
    (dict(recompute_granularity="partial"), r"model.recompute_granularity='partial'"),
    (dict(recompute_granularity="full", recompute_num_layers=1), r"model.recompute_method=None"),
    (dict(recompute_granularity="full", recompute_method="uniform"), r"model.recompute_num_layers=None"),
    (dict(recompute_granularity="full", recompute_method="blocks", recompute_num_layers=1),
     r"model.recompute_method='blocks'"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
     r"model.recompute_num_layers=3"),
    (dict(recompute_granularity="selective", recompute_method="uniform"), r"model.recompute_method='uniform'"),
    (dict(recompute_granularity="selective", recompute_num_layers=1), r"model.recompute_num_layers=1"),
    (dict(recompute_method="block"), r"model.recompute_method='block'"),
])
def test_recompute_bad_combinations_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny_model_cfg(**fields)


def test_recompute_layers_per_pipeline_stage_checked():
    cfg = tiny_model_cfg(num_layers=4, recompute_granularity="full", recompute_method="block",
                         recompute_num_layers=3)
    with pytest.raises(ValueError, match=r"model.recompute_num_layers=3: more than the 2 layers"):
        transformer_config(cfg, ParallelConfig(pp=2))


def test_gpu_check_compare_attention_on_cpu(mp1, monkeypatch):
    """bench/gpu_check.py --compare-attention (the check that verifies `te` on a GPU) runs here
    for local vs sdpa, and fails when the backends disagree beyond its tolerance."""
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    args = gpu_check.parse_args(["--tiny", "--compare-attention", "--micro-batch-size", "1",
                                 "--seq-length", "32", "model.num_attention_heads=4"])
    result = gpu_check.compare_attention(args)
    assert result["ok"] and result["backends"][:2] == ["local", "sdpa"]
    assert result["sdpa"]["max_abs_diff_logits"] < 1e-4
    monkeypatch.setattr(gpu_check, "COMPARE_TOL", {"atol": 0.0, "rtol": 0.0})
    assert not gpu_check.compare_attention(args)["ok"]  # bit-exact agreement is not expected
