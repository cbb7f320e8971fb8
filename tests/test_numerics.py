"""The fp32 rounding bounds of tests/numerics.py: they hold for sums in any order, and fail
loudly (naming error, bound and ratio) when a result is off."""

import pytest
import torch

from helpers import tiny_model_cfg
from numerics import U32, Comparisons, Net, assert_close, bound, forward_terms, gradient_terms

pytestmark = pytest.mark.numerics  # torch.sum's order depends on the CPU kernels too

K = 4096


@pytest.fixture(autouse=True)
def _no_log(monkeypatch):
    """These tests fail comparisons on purpose: keep them out of TIEDLORA_NUMERICS_LOG."""
    monkeypatch.delenv("TIEDLORA_NUMERICS_LOG", raising=False)


def test_any_summation_order_is_within_the_bound():
    """Sequential, reversed, pairwise (torch.sum) and blocked fp32 sums of K terms agree
    within 2·K·u·Σ|x| (here with cancelling signs, where max|ref| understates Σ|x|)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K, generator=g)
    exact = x.double().sum()
    seq = torch.zeros((), dtype=torch.float32)
    for v in x:
        seq = seq + v
    rev = torch.zeros((), dtype=torch.float32)
    for v in x.flip(0):
        rev = rev + v
    blocked = x.view(64, -1).sum(1).sum()
    for got in (seq, rev, x.sum(), blocked):
        assert abs(float(got) - float(exact)) <= K * U32 * float(x.abs().sum())
    assert_close(seq, x.sum(), K, "sequential vs torch.sum", scale="max")


def test_off_result_fails_with_the_numbers():
    ref = torch.linspace(-1, 1, 100)
    got = ref.clone()
    got[7] += 1e-3  # far above 2·100·u ≈ 1.2e-5
    with pytest.raises(AssertionError, match=r"grad x: error 0\.001 exceeds .*K=100.*error/bound .*worst element \[7\]"):
        assert_close(got, ref, 100, "grad x")
    assert_close(ref + 5e-6, ref, 100, "within")  # below the bound
    with pytest.raises(AssertionError, match="shape"):
        assert_close(ref[:3], ref, 100, "shape")
    with pytest.raises(AssertionError, match="nan: error nan exceeds"):
        assert_close(torch.tensor(float("nan")), torch.tensor(1.0), 10, "nan")
    c = Comparisons()
    c.close(got, ref, 100, "a")
    c.close(ref, ref, 100, "b")
    with pytest.raises(AssertionError, match=r"1 comparison\(s\) beyond .*\na: error"):
        c.check()


def test_bound_scales_with_the_tensor_not_the_element():
    ref = torch.tensor([1e-6, 2.0])
    assert bound(ref, 10) == pytest.approx(2 * 10 * U32 * 2.0)
    assert bound(ref, 10, scale="norm") == pytest.approx(2 * 10 * U32 * float(ref.norm()))
    with pytest.raises(ValueError, match="scale='sum'"):
        bound(ref, 10, scale="sum")


def test_terms_follow_the_model_sizes():
    net = Net.of(tiny_model_cfg(vocab_size=200), seq=16, rank=8)
    assert net.vocab == 256 and net.head_dim == 16 and net.glu
    deeper = Net.of(tiny_model_cfg(num_layers=4, vocab_size=200), seq=16, rank=8)
    assert forward_terms(deeper) > forward_terms(net)
    assert gradient_terms(net, 32) > forward_terms(net) + 32
