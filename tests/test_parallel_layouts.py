"""Tied-LoRA training under PP=2, PP=2xVPP=2, DP=2 and TP=2+SP equals one process.

One torchrun launch (2 processes, gloo on CPU; worker tests/dist/parallel_check.py) runs
3 optimizer steps of lora, vera and tl6 on all four targets of a 4-layer tiny GPT under
each layout; this process runs the same loop (tests/dist/parallel_train.py: megatron's
schedule, ``finalize_adapter_grads``, ``clip_adapter_grads``, AdamW, ``sync_tied_copies``)
at TP=PP=DP=1 from the same base weights (loaded by global layer number) as reference.

Checked per layout and preset: initial adapters (bit-exact), per-token losses, gradient
norms, every gathered gradient of every step, the adapter tensors and optimizer moments
after 3 steps; tied factors identical on every stage and virtual chunk at every step,
held once by the optimizer and once in checkpoints; data parallel reduces exactly the
trainable adapter tensors; checkpoints saved under one layout load bit-exactly under
another. The interleaved (VPP) rows are the ones that catch megatron's batched p2p on gloo
(``batch_p2p_comm=True`` on CPU swaps send/recv pairs: losses off by ~1e-2).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
import parallel_train as pt  # noqa: E402
from helpers import TEST_THREADS, run_torchrun  # noqa: E402
from numerics import Net, assert_close, loss_terms  # noqa: E402

from tiedlora import compat  # noqa: E402
from tiedlora.dist import init_distributed  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.models.gpt import transformer_config  # noqa: E402
from tiedlora.peft import load_adapter_state_dict  # noqa: E402

pytestmark = pytest.mark.numerics  # tests/numerics.py; run under other CPU kernels by .ci/numerics-tests

LAYOUTS = ["pp2", "pp2_vpp2", "dp2", "tp2_sp"]
VPP = {"pp2": 1, "pp2_vpp2": 2, "dp2": 1, "tp2_sp": 1}
XLOAD = ["pp2->tp2_sp", "tp2_sp->pp2", "pp2_vpp2->dp2", "dp2->pp2_vpp2"]

# Tolerances vs the single process: fp32 rounding bounds (tests/numerics.py), scaled by
# the length of the sums behind each number. Step s's numbers also carry the rounding of
# the s earlier steps (through the parameters), so their K grows by one gradient per step.
NET = Net.of(pt.model_cfg(), seq=pt.SEQ, rank=8)  # the presets' rank
TOKENS = pt.NUM_MICRO * pt.MICRO_BATCH * pt.SEQ  # tokens per optimizer step (masks drop some)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mp1):
    d = tmp_path_factory.mktemp("layouts")
    base, ref = pt.single_process(d, TEST_THREADS, {"ref": None})
    ref = ref["ref"]
    got = run_torchrun("parallel_check.py", 2, d / "out.pt", str(d / "base.safetensors"), str(d),
                       timeout=600)
    return {"ref": ref, "got": got, "base": base}


@pytest.mark.dist
@pytest.mark.parametrize("name", pt.PRESETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(runs, layout, name):
    ref, got = runs["ref"][name], runs["got"][f"run/{layout}/{name}"]
    where = f"{layout}/{name}"
    # the same adapters at step 0 (seed-derived, global layer numbers), bit for bit
    assert list(got["init"]) == list(ref["init"])
    for k, t in ref["init"].items():
        assert torch.equal(got["init"][k], t), f"{where} {k}: initial value differs"
    assert all(n > pt.OPTIM.grad_clip for n in ref["grad_norms"]), "clipping never engaged"
    trainable = list(ref["grads"][0])
    for k in trainable:  # the comparison has teeth: every factor is trained
        assert any(r[k].abs().sum() > 0 for r in ref["grads"]), f"{k}: never a gradient"
        assert not torch.equal(ref["final"][k], ref["init"][k]), f"{k}: never moved"
    pt.compare_runs(got, ref, where, NET, TOKENS)


@pytest.mark.dist
@pytest.mark.parametrize("name", pt.PRESETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tied_factors_are_one_tensor(runs, layout, name):
    """Every stage and virtual chunk holds a copy of each tied factor; the copies are equal
    at step 0 and after every step; the optimizer and the checkpoint hold each once."""
    ref, got = runs["ref"][name], runs["got"][f"run/{layout}/{name}"]
    tied = sorted(k for k in ref["init"] if k.startswith("tied."))
    assert bool(tied) == (name != "lora")
    assert got["tied_spread"] == [0.0] * (pt.STEPS + 1)
    assert got["tied_holders"] == {k: VPP[layout] for k in tied}
    assert set(got["optimizer_entries"].values()) == {1}, got["optimizer_entries"]
    tied_trainable = [k for k in tied if k in ref["grads"][0]]
    assert all(f"optim.exp_avg.{k}" in got["train_state"] for k in tied_trainable)
    assert sorted(got["final"]) == sorted(ref["final"])  # one key per tied factor
    assert got["base_grads"] == 0  # the frozen base never gets a gradient


@pytest.mark.dist
@pytest.mark.parametrize("name", pt.PRESETS)
def test_data_parallel_reduces_adapter_gradients_only(runs, name):
    """DP=2: one all-reduce per step over the data-parallel group, of exactly the trainable
    adapter tensors (tied factors once); no other layout talks over a DP group."""
    dp2 = runs["got"][f"run/dp2/{name}"]
    assert dp2["dp_reduced_numel"] == [[dp2["trainable_numel"]]] * pt.STEPS
    assert dp2["trainable_numel"] == runs["ref"][name]["trainable_numel"]
    for layout in ("pp2", "pp2_vpp2", "tp2_sp"):
        assert runs["got"][f"run/{layout}/{name}"]["dp_reduced_numel"] == [[]] * pt.STEPS


@pytest.mark.dist
@pytest.mark.parametrize("pair", XLOAD)
def test_checkpoint_loads_under_another_layout(runs, pair):
    """A tl6 checkpoint (adapter file + optimizer moments) saved under one layout and loaded
    under another gathers back bit-exactly, and evaluates like the PP=1 model."""
    src = pair.split("->")[0]
    saved, loaded = runs["got"][f"run/{src}/tl6"], runs["got"][f"xload/{pair}"]
    assert list(loaded["adapter"]) == list(saved["final"])
    for k, t in saved["final"].items():
        assert torch.equal(loaded["adapter"][k], t), f"{pair} adapter {k}"
    assert sorted(loaded["train_state"]) == sorted(saved["train_state"])
    for k, t in saved["train_state"].items():
        assert torch.equal(loaded["train_state"][k], t), f"{pair} optimizer {k}"
    # evaluation: the same adapter in this (PP=1) process gives the same loss
    init_distributed(ParallelConfig(), seed=pt.SEED)
    chunks = pt.build(ParallelConfig(), "tl6", runs["base"])
    load_adapter_state_dict(chunks, saved["final"])
    assert_close(torch.tensor(loaded["eval_loss"]), torch.tensor(pt.eval_loss(chunks)), loss_terms(NET, TOKENS),
                 f"{pair} evaluation loss")


@pytest.mark.dist
def test_cpu_pipelines_never_batch_p2p(runs):
    """gloo pairs batched send/recv wrongly when both pipeline neighbours are one peer."""
    assert not any(runs["got"][f"batch_p2p_comm/{layout}"] for layout in LAYOUTS)
    on_gpu = compat.cuda_available()  # NCCL pairs them correctly
    assert transformer_config(pt.model_cfg(), ParallelConfig(pp=2, vpp=2)).batch_p2p_comm is on_gpu
