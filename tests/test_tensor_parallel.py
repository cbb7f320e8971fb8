"""TP=2 (with and without sequence parallel) equals TP=1: loss and every adapter gradient.

Two torchrun launches (1 and 2 processes, gloo on CPU); the worker is tests/dist/tp_check.py.
"""

import pytest
import torch

from helpers import run_torchrun

LOSS_ATOL = 1e-5
GRAD_ATOL = 2e-6
GRAD_RTOL = 1e-4
PRESETS = ["lora", "vera", "tl6", "tl3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    return run_torchrun("tp_check.py", 1, d / "tp1.pt"), run_torchrun("tp_check.py", 2, d / "tp2.pt")


@pytest.mark.dist
@pytest.mark.parametrize("sp", [0, 1])
@pytest.mark.parametrize("name", PRESETS)
def test_tp2_matches_tp1(runs, name, sp):
    ref, got = runs[0][f"{name}/sp0"], runs[1][f"{name}/sp{sp}"]
    torch.testing.assert_close(got["loss"], ref["loss"], atol=LOSS_ATOL, rtol=0)
    assert set(got["grads"]) == set(ref["grads"]) and ref["grads"]
    for key, g in ref["grads"].items():
        assert g.abs().sum() > 0, f"{key}: zero reference gradient (test has no teeth)"
        torch.testing.assert_close(got["grads"][key], g, atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                   msg=lambda m: f"{name} sp={sp} {key}: {m}")
