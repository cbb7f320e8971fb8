"""Tolerances for comparing two fp32 evaluations of the same quantity, derived from rounding.

Two evaluations of one fp32 computation (TP=1 vs TP=2, one CPU kernel set vs another, our
converter vs ``transformers``) differ only in the order in which they add numbers. How
far apart they may land follows from fp32 rounding, not from a per-element constant:

* fp32 unit roundoff ``u = 2**-24`` (about 6e-8): every add or multiply is exact up to a
  relative error of at most u.
* A sum of K terms, in *any* order, is within ``K·u·Σ|x_i|`` of the exact sum (worst case;
  the classical bound is ``γ_K = K·u / (1 - K·u)``, which is K·u for K·u << 1). Rounding
  errors of independent operations mostly cancel, so the typical error is about
  ``sqrt(K)·u·‖x‖``; the worst case holds for every kernel set, vector width, blocking
  and thread count, which is what a test that must pass on every CPU needs.
* Layers compound: an error made in one reduction enters the next one as a relative
  perturbation of its input, and the layers of a transformer (normalised activations,
  residual stream) pass it on with a gain of about one. To first order the relative
  errors of the reductions on the path from input to output *add*, so K is the sum of
  the reduction lengths along that path (:func:`forward_terms`, :func:`gradient_terms`).
* Two evaluations that are each within K·u of the exact value are within 2·K·u of each
  other: the safety factor ``SAFETY = 2``.

The bound compares the error against the *reference tensor's* size (its max-abs, or its
norm for norm comparisons), never element by element: an element that comes out small
because large terms cancelled carries the absolute error of those large terms, and a
per-element relative test flags it although nothing is wrong (a layout test failed that
way on an AVX512 machine: one gradient element of 512, 1.6e-3 in size, differed by
2.7e-6). So the test is::

    max|got - ref|  <=  SAFETY · K · u · max|ref|      (scale="max")
    ‖got - ref‖     <=  SAFETY · K · u · ‖ref‖         (scale="norm")

Using the reference's max (or norm) where the worst case has Σ|x_i| leaves the bound
exposed to cancellation; the sqrt(K) between the typical and the worst-case error (about
30 to 140 for the K of 1000 to 20000 behind logits, losses and gradients here) covers it. ``docs/numerics.md`` lists the measured
error/bound ratios under every CPU kernel set and thread count, and the error of planted
mistakes (missing all-reduce, wrong slice), which is orders of magnitude above the bound.

Set ``TIEDLORA_NUMERICS_LOG=<file>`` to append one JSON line per comparison (test, what,
error, bound, ratio, CPU capability, threads); ``tests/numerics_report.py`` tabulates it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

U32 = 2.0 ** -24  # fp32 unit roundoff
SAFETY = 2  # two evaluations, each within K·u of the exact value


@dataclass(frozen=True)
class Net:
    """The sizes of a GPT that decide how many terms each fp32 sum adds up."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    seq: int
    vocab: int
    glu: bool = True  # SwiGLU: fc1 is twice as wide
    rank: int = 0  # adapter rank (0: no adapter); the adapter path adds an r-term sum
    kv_channels: int = 0  # head width when it is not hidden / heads (0: hidden / heads)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    @classmethod
    def of(cls, cfg, seq: int, rank: int = 0) -> "Net":
        """From a ``tiedlora.models.gpt.ModelConfig``; vocab padded as megatron pads it."""
        pad = cfg.make_vocab_size_divisible_by
        return cls(layers=cfg.num_layers, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
                   heads=cfg.num_attention_heads, seq=seq, vocab=-(-cfg.vocab_size // pad) * pad,
                   glu=cfg.activation == "swiglu", rank=rank, kv_channels=cfg.kv_channels or 0)


def forward_terms(net: Net) -> int:
    """Sum of the reduction lengths from the token embedding to one logit.

    Per layer: the norm's mean and variance (hidden, twice per layer: two norms), the QKV
    projection (hidden), attention scores (head_dim), softmax and probabilities x values
    (seq, twice), the output projection (hidden), fc1 (hidden) and fc2 (ffn); an adapter
    on a linear adds its r-term sum. Then the final norm (hidden) and the output layer
    (hidden).
    """
    linear = net.hidden + net.rank
    per_layer = 2 * net.hidden + 3 * linear + net.head_dim + 2 * net.seq + (net.ffn + net.rank)
    return net.layers * per_layer + 2 * net.hidden


def backward_terms(net: Net) -> int:
    """Sum of the reduction lengths from the loss back to the first layer's input.

    Backward products reduce over the *output* side of each linear: the softmax over the
    vocabulary, the output layer (vocab), QKV (3·hidden), attention (seq, head_dim), the
    output projection (hidden), fc1 (ffn, or 2·ffn with a GLU), fc2 (hidden), the norms.
    """
    fc1 = (2 if net.glu else 1) * net.ffn
    per_layer = 2 * net.hidden + 3 * net.hidden + net.head_dim + 2 * net.seq + net.hidden + fc1 + net.hidden \
        + 4 * net.rank
    return 2 * net.vocab + net.hidden + net.layers * per_layer


def loss_terms(net: Net, tokens: int) -> int:
    """A mean token loss: the forward pass, the log-softmax (vocab) and the mean (tokens)."""
    return forward_terms(net) + net.vocab + tokens


def gradient_terms(net: Net, tokens: int) -> int:
    """A weight gradient: forward, backward, and the sum over the tokens of the step."""
    return forward_terms(net) + backward_terms(net) + tokens


def _size(ref: torch.Tensor, scale: str) -> float:
    ref = torch.as_tensor(ref).detach().double()
    if scale == "max":
        return float(ref.abs().max()) if ref.numel() else 0.0
    if scale == "norm":
        return float(ref.norm())
    raise ValueError(f"scale={scale!r}: expected 'max' or 'norm'")


def bound(ref: torch.Tensor, terms: int, scale: str = "max", safety: float = SAFETY) -> float:
    """``safety · terms · u · S``, S = max|ref| (scale="max") or ‖ref‖ (scale="norm")."""
    return safety * terms * U32 * _size(ref, scale)


def error(got: torch.Tensor, ref: torch.Tensor, scale: str = "max") -> float:
    """max|got - ref| (scale="max") or ‖got - ref‖ (scale="norm"), in float64."""
    diff = torch.as_tensor(got).detach().double() - torch.as_tensor(ref).detach().double()
    if not diff.numel():
        return 0.0
    return float(diff.abs().max() if scale == "max" else diff.norm())


def assert_close(got, ref, terms: int, what: str, scale: str = "max", safety: float = SAFETY,
                 inherited: float = 0.0) -> float:
    """Assert ``error(got, ref) <= bound(ref, terms) + inherited``; return error / bound.

    ``inherited``: the bound of an earlier stage whose size differs from ``ref``'s (from
    :func:`bound`), e.g. the logits' bound under log-probabilities: errors of successive
    stages add. The message names the quantity, the measured error, the bound with its K,
    their ratio and, for scale="max", the worst element.
    """
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != reference {ref.dtype}"
    err, size = error(got, ref, scale), _size(ref, scale)
    tol = safety * terms * U32 * size + inherited
    ratio = err / tol if tol > 0 else (0.0 if err == 0 else float("inf"))
    _log(what, err, tol, ratio, terms, scale)
    if err > tol or not bool(torch.isfinite(got.double()).all()):
        where = ""
        if scale == "max" and got.numel():
            diff = (got.double() - ref.double()).abs().flatten()
            i = int(diff.nan_to_num(float("inf")).argmax())
            where = f"; worst element [{i}] (flat): {got.flatten()[i].item():.6g} vs {ref.flatten()[i].item():.6g}"
        raise AssertionError(
            f"{what}: error {err:.3g} exceeds the fp32 rounding bound {tol:.3g} "
            f"(= {safety}·K·u·{scale}|ref|{' + inherited' if inherited else ''}, K={terms}, u=2^-24, "
            f"{scale}|ref|={size:.3g}; "
            f"error/bound {ratio:.3g}){where}")
    return ratio


def _log(what: str, err: float, tol: float, ratio: float, terms: int, scale: str) -> None:
    path = os.environ.get("TIEDLORA_NUMERICS_LOG")
    if not path:
        return
    rec = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "what": what, "error": err,
           "bound": tol, "ratio": ratio, "terms": terms, "scale": scale,
           "capability": torch.backends.cpu.get_cpu_capability(),
           "threads": os.environ.get("TIEDLORA_TEST_THREADS", "unset")}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


class Comparisons:
    """Runs many :func:`assert_close` and raises once, naming every failure, so that a run
    with a planted mistake still logs every ratio."""

    def __init__(self) -> None:
        self.failures: list = []
        self.worst = 0.0

    def close(self, got, ref, terms: int, what: str, scale: str = "max") -> None:
        try:
            self.worst = max(self.worst, assert_close(got, ref, terms, what, scale))
        except AssertionError as e:
            self.failures.append(str(e))

    def check(self) -> None:
        if self.failures:
            more = f"\n... and {len(self.failures) - 8} more" if len(self.failures) > 8 else ""
            raise AssertionError(f"{len(self.failures)} comparison(s) beyond their fp32 rounding bound:\n"
                                 + "\n".join(self.failures[:8]) + more)
