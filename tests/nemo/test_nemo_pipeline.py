"""Pipeline parallelism with tied factors in NeMo: ``llm.finetune`` with TL6 at PP=2 vs PP=1.

Run with ``.ci/nemo-tests`` (marker ``nemo``). Two torchrun launches (gloo, CPU; worker:
pp_worker.py): PP=1 in one process, PP=2 in two, 3 optimizer steps each from the same
base (filled by global layer number) and the same seeded adapter. Each stage holds a copy
of the tied A and B; ``TiedLoRA`` sums their gradients over the stages after megatron's
``finalize_model_grads``, so PP=2 must reproduce PP=1 within fp32 rounding
(tests/numerics.py). Without that sum the tied factors' 3-step updates differ from PP=1's
by 80-95 % (in norm) and the two stages' copies drift apart; without the replica marks
on stage 1's copies megatron refuses to save NeMo's checkpoint ("Invalid access pattern").
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from numerics import Net, assert_close, gradient_terms, loss_terms

pytestmark = pytest.mark.nemo

WORKER = Path(__file__).resolve().parent / "pp_worker.py"
STEPS = 3
WORKER_TIMEOUT = 900  # s; ~1.5 min for the PP=2 launch on 2 cores, mostly NeMo's import
# flow_worker.py's model and batch: 2 layers, hidden 64, FFN 176 (SwiGLU), 4 heads, seq 32,
# vocab 256, TL6 r=4; 4 sequences of 32 tokens per optimizer step
NET = Net(layers=2, hidden=64, ffn=176, heads=4, seq=32, vocab=256, glu=True, rank=4)
TOKENS = 4 * 32
GRAD = gradient_terms(NET, TOKENS)


def _torchrun(nproc: int, out: Path, pp: int) -> list:
    from tiedlora.dist import _free_port

    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(WORKER), str(out), str(pp), str(STEPS)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT,
                         cwd=WORKER.parent)
    if res.returncode != 0:
        raise AssertionError(f"pp_worker.py (PP={pp}) failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed")
    d = tmp_path_factory.mktemp("pp")
    return {"dir": d, 1: _torchrun(1, d / "pp1", 1), 2: _torchrun(2, d / "pp2", 2)}


def test_pp2_trains_like_pp1(runs):
    ref, last, first = runs[1][0], runs[2][1], runs[2][0]
    assert sorted(ref["losses"]) == sorted(last["losses"]) == list(range(1, STEPS + 1))
    for step, loss in ref["losses"].items():  # step s carries the rounding of s - 1 updates
        assert_close(torch.tensor(last["losses"][step]), torch.tensor(loss),
                     loss_terms(NET, TOKENS) + (step - 1) * GRAD, f"PP=2 step {step} loss")
    # the norm adds the squares of every trainable element, the tied factors once (stage
    # 1's copies are ``shared``; with TL6's v-dominated gradients a double count moves the
    # norm by only ~2e-3, so the flags themselves are checked below)
    numel = sum(t.numel() for t in ref["final"].values())
    for r in runs[2]:
        for step, norm in ref["grad_norms"].items():
            assert_close(torch.tensor(r["grad_norms"][step]), torch.tensor(norm), step * GRAD + numel,
                         f"PP=2 step {step} grad norm")
    assert sorted(first["final"]) == sorted(ref["final"])
    for name, t in ref["final"].items():
        assert torch.equal(first["init"][name], ref["init"][name]), f"{name}: another start"
        update = t - ref["init"][name]
        assert update.abs().max() > 0, f"{name} did not train (test has no teeth)"
        # AdamW is elementwise: the update inherits the gradients' relative error, in norm
        assert_close(first["final"][name] - first["init"][name], update, STEPS * GRAD,
                     f"PP=2 {STEPS}-step update {name}", scale="norm")


def test_stages_hold_equal_copies_counted_once(runs):
    stage0, stage1 = (r["copies"][0] for r in runs[2])
    assert sorted(stage0) == sorted(stage1) == ["tied.linear_qkv.A", "tied.linear_qkv.B"]
    for name, t in stage0.items():
        assert torch.equal(stage1[name], t), f"{name}: the stages' copies differ"
    # stage 0's copy is the main one; megatron's grad norm skips the others (``shared``)
    assert runs[2][0]["shared"] == [{n: False for n in stage0}]
    assert runs[2][1]["shared"] == [{n: True for n in stage0}]
    assert not any(runs[1][0]["shared"][0].values())  # PP=1: nothing to skip


def test_checkpoint_holds_each_tied_factor_once(runs):
    """NeMo's final adapter checkpoint at PP=2: one entry per tied factor (main replica on
    stage 0, replicas elsewhere), the full tensor, equal to the trained one."""
    import torch.distributed.checkpoint as dcp

    (weights,) = glob.glob(str(runs["dir"] / "pp2" / "pp2" / "checkpoints" / "*-last" / "weights"))
    meta = dcp.FileSystemReader(weights).read_metadata()
    final = runs[2][0]["final"]
    for factor in "AB":
        key = f"module.tied_adapters.linear_qkv_{factor}"
        chunks = [i for i in meta.storage_data if i.fqn == key]
        assert len(chunks) == 1, f"{key}: {len(chunks)} chunks"
        want = final[f"tied.linear_qkv.{factor}"]
        assert tuple(meta.state_dict_metadata[key].size) == tuple(want.shape)
        got = {key: torch.empty_like(want)}
        dcp.load(got, storage_reader=dcp.FileSystemReader(weights), no_dist=True)
        assert torch.equal(got[key], want)


def test_copies_on_one_rank_are_summed(mp1):
    """Virtual pipeline chunks: one rank holds several copies (here two chunks at PP=1); each
    copy gets the sum of all copies' gradients, read from megatron's ``main_grad`` when DDP
    keeps one; per-layer factors are left alone."""
    from tiedlora.integrations.nemo import TiedLoRA, sum_tied_grads_over_pipeline
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft.model import iter_adapter_params

    from helpers import tiny_model_cfg

    chunks = [TiedLoRA("tl6", rank=4)(build_gpt_model(tiny_model_cfg())) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    given = {}
    for i, chunk in enumerate(chunks):
        for rec in iter_adapter_params(chunk):
            grad = torch.randn(rec.param.shape, generator=g)
            if i == 1:  # the second chunk's buffers as megatron's DDP holds them
                rec.param.main_grad = grad.clone()
            else:
                rec.param.grad = grad.clone()
            given[(i, rec.name)] = grad
    sum_tied_grads_over_pipeline(chunks)
    for i, chunk in enumerate(chunks):
        for rec in iter_adapter_params(chunk):
            got = rec.param.main_grad if i == 1 else rec.param.grad
            want = given[(0, rec.name)] + given[(1, rec.name)] if rec.tied else given[(i, rec.name)]
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"chunk {i} {rec.name}")


def test_a_chunk_without_layers_is_refused():
    from torch import nn

    from tiedlora.integrations.nemo import ShardedTiedFactors, _mark_tied_copies

    chunk = nn.Module()
    chunk.tied_adapters = ShardedTiedFactors()  # no layer: no tied factor was created
    with pytest.raises(ValueError, match="pipeline stage 1, model chunk 0 holds no transformer layer"):
        _mark_tied_copies([chunk], pp_rank=1, pp_size=2, tied=True)
    _mark_tied_copies([chunk], pp_rank=1, pp_size=2, tied=False)  # LoRA: nothing is tied
