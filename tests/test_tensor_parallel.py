"""TP=2 (with and without sequence parallel) equals TP=1: loss and every adapter gradient.

Two torchrun launches (1 and 2 processes, gloo on CPU); the worker is tests/dist/tp_check.py.
"""

import pytest

from helpers import run_torchrun, tiny_model_cfg
from numerics import Comparisons, Net, gradient_terms, loss_terms

pytestmark = pytest.mark.numerics  # tests/numerics.py; run under other CPU kernels by .ci/numerics-tests

PRESETS = ["lora", "vera", "tl6", "tl3"]
# tolerances: fp32 rounding bounds (tests/numerics.py) of the worker's tiny GPT, one batch
# of 2 x 16 tokens (tests/dist/tp_check.py)
NET = Net.of(tiny_model_cfg(), seq=16, rank=8)
TOKENS = 2 * 16


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    return run_torchrun("tp_check.py", 1, d / "tp1.pt"), run_torchrun("tp_check.py", 2, d / "tp2.pt")


@pytest.mark.dist
@pytest.mark.parametrize("sp", [0, 1])
@pytest.mark.parametrize("name", PRESETS)
def test_tp2_matches_tp1(runs, name, sp):
    ref, got = runs[0][f"{name}/sp0"], runs[1][f"{name}/sp{sp}"]
    c = Comparisons()
    c.close(got["loss"], ref["loss"], loss_terms(NET, TOKENS), f"{name} sp={sp} loss")
    assert set(got["grads"]) == set(ref["grads"]) and ref["grads"]
    for key, g in ref["grads"].items():
        assert g.abs().sum() > 0, f"{key}: zero reference gradient (test has no teeth)"
        c.close(got["grads"][key], g, gradient_terms(NET, TOKENS), f"{name} sp={sp} grad {key}")
    c.check()
