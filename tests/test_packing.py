"""Sequence packing (``data.packing``): first fit, the packs, and packed training.

The reference is always *unpacked* training on the same examples: 3 optimizer steps of
lora, vera and tl6 (all four targets) on right-padded micro-batches in one process
(tests/dist/parallel_train.py). Packed training of the same examples -- each data-parallel
rank packing its share of every step into 32-token micro-batches -- must give the same
per-step losses, gradient norms, every adapter gradient, the updates and the optimizer
moments within their fp32 rounding bounds, at TP=1 (this process) and at TP=2+SP, PP=2 and
DP=2 (one torchrun launch, tests/dist/packing_check.py). The comparison fails when packed
examples attend to each other or (absolute positions) when positions do not restart.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
import parallel_train as pt  # noqa: E402
from helpers import TEST_THREADS, build, perturb, preset, run_torchrun, tiny_model_cfg  # noqa: E402
from numerics import Net, assert_close, gradient_terms, loss_terms  # noqa: E402

from tiedlora.config import ParallelConfig, compose, to_object  # noqa: E402
from tiedlora.data.packing import check_fits, collate_packed, first_fit, plan_packs  # noqa: E402
from tiedlora.data.sft import collate  # noqa: E402
from tiedlora.dist import init_distributed  # noqa: E402
from tiedlora.training import forward_backward  # noqa: E402

NET = Net.of(pt.model_cfg(), seq=pt.SEQ, rank=8)  # examples of at most SEQ tokens; the presets' rank
TOKENS = pt.NUM_MICRO * pt.MICRO_BATCH * pt.SEQ  # at least the tokens of a step, padded or packed
LAYOUTS = ["tp1", "tp2_sp", "pp2", "dp2"]


# ------------------------------------------------------------------------- placement
def test_first_fit_keeps_examples_whole_and_fills_the_first_pack_with_room():
    lengths = [3, 2, 5, 1, 3]
    assert first_fit(lengths, 8, range(5)) == [[0, 1, 3], [2, 4]]
    assert plan_packs(lengths, 8, "first_fit_decreasing", seed=0) == [[2, 0], [4, 1, 3]]
    assert first_fit(lengths, 5, range(5)) == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="an example of 5 tokens does not fit in a pack of 4"):
        first_fit(lengths, 4, range(5))
    with pytest.raises(ValueError, match="data.pack_algorithm='best_fit'"):
        plan_packs(lengths, 8, "best_fit", seed=0)


def test_shuffle_is_drawn_from_the_seed_and_the_examples():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (60,), generator=g).tolist()
    key = list(range(100, 160))
    packs = plan_packs(lengths, 64, "first_fit_shuffle", seed=3, key=key)
    assert sorted(i for p in packs for i in p) == list(range(60))  # every example once
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
    assert plan_packs(lengths, 64, "first_fit_shuffle", seed=3, key=key) == packs  # deterministic
    assert plan_packs(lengths, 64, "first_fit_shuffle", seed=4, key=key) != packs
    assert plan_packs(lengths, 64, "first_fit_shuffle", seed=3, key=key[::-1]) != packs
    dec = plan_packs(lengths, 64, "first_fit_decreasing", seed=3, key=key)
    assert len(dec) <= len(packs) and len(dec) == -(-sum(lengths) // 64)  # decreasing packs tightly here


def test_a_pack_holds_each_example_as_unpacked_collation_does():
    examples = pt.step_examples(0)[:4]
    pack = collate_packed(examples, pad_id=0, pack_length=64)
    rows = collate(examples, pad_id=0)
    cu = pack["cu_seqlens"].tolist()
    assert cu == [0] + torch.tensor([len(e["input_ids"]) - 1 for e in examples]).cumsum(0).tolist()
    assert pack["cu_seqlens_padded"].tolist() == cu[:-1] + [64] and pack["cu_seqlens"].dtype == torch.int32
    assert pack["max_seqlen"] == max(64 - cu[-2], *(b - a for a, b in zip(cu[:-2], cu[1:-1])))
    assert pack["real_tokens"] == rows["real_tokens"] == cu[-1]
    for j, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(pack[key][0, a:b], rows[key][j, :b - a]), (j, key)
        assert pack["position_ids"][0, a:b].tolist() == list(range(b - a))  # positions restart
    assert pack["loss_mask"][0, cu[-1]:].abs().sum() == 0 and pack["position_ids"][0, cu[-1]:].abs().sum() == 0
    assert pack["tokens"].shape == (1, 64)
    with pytest.raises(ValueError, match="do not fit in a pack of 16"):
        collate_packed(examples, pad_id=0, pack_length=16)


def test_a_pack_is_cut_after_its_examples_unless_one_shape_is_needed():
    """multiple_of (no pipeline parallelism): the row ends at the examples' tokens rounded
    up to it, never past pack_length; the cut pack is the full one's first columns."""
    examples = pt.step_examples(0)[:4]
    real = sum(len(e["input_ids"]) - 1 for e in examples)
    full = collate_packed(examples, pad_id=0, pack_length=64)
    for m, length in ((8, -(-real // 8) * 8), (16, -(-real // 16) * 16), (33, 64), (1, real)):
        cut = collate_packed(examples, pad_id=0, pack_length=64, multiple_of=m)
        assert cut["tokens"].shape == (1, length), m
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(cut[key], full[key][:, :length]), (m, key)
        assert cut["cu_seqlens"].tolist() == full["cu_seqlens"].tolist()
        assert cut["cu_seqlens_padded"].tolist() == full["cu_seqlens"].tolist()[:-1] + [length]
        assert cut["real_tokens"] == real


class _Dataset(list):
    path = "data/train.jsonl"


def test_pack_length_must_hold_every_example():
    ds = _Dataset([{"input_ids": [1] * 5}, {"input_ids": [1] * 40}, {"input_ids": [1] * 9}])
    check_fits(ds, 39)
    with pytest.raises(ValueError, match=r"data.pack_length=38: record 1 \(0-based\) of data/train.jsonl has 39"):
        check_fits(ds, 38)


@pytest.mark.parametrize("overrides, match", [
    (["data.packing=true", "model.attention_backend=local"], "data.packing=true with model.attention_backend='local'"),
    (["data.packing=true", "data.pack_length=33", "parallel.tp=2", "parallel.sp=true"],
     r"data.pack_length=33: sequence parallelism splits each pack over parallel.tp=2"),
    (["data.pack_algorithm=best_fit"], r"data.pack_algorithm='best_fit'"),
    (["data.pack_length=1"], r"data.pack_length=1: must be an integer >= 2"),
])
def test_bad_packing_settings_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        to_object(compose("finetune", overrides))


def test_packing_is_off_by_default_and_fills_the_task_length():
    cfg = to_object(compose("finetune", ["data.packing=true"]))
    assert not to_object(compose("finetune", [])).data.packing
    assert cfg.data.resolved_pack_length(cfg.task, cfg.model) == min(cfg.task.max_length, cfg.model.seq_length)


# ------------------------------------------------------------ packed vs unpacked training
@pytest.fixture(scope="module")
def runs(tmp_path_factory, mp1):
    d = tmp_path_factory.mktemp("packing")
    base, runs = pt.single_process(d, TEST_THREADS, {"ref": pt.unpacked_batches, "tp1": pt.packed_batches})
    ref, tp1 = runs["ref"], runs["tp1"]
    got = run_torchrun("packing_check.py", 2, d / "out.pt", str(d / "base.safetensors"), timeout=600)
    got.update({f"run/tp1/{n}": r for n, r in tp1.items()})
    return {"ref": ref, "got": got, "base": base}


@pytest.mark.numerics
@pytest.mark.dist
@pytest.mark.parametrize("name", pt.PRESETS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_training_equals_unpacked(runs, layout, name):
    ref, got = runs["ref"][name], runs["got"][f"run/{layout}/{name}"]
    for k, t in ref["init"].items():
        assert torch.equal(got["init"][k], t), f"{layout}/{name} {k}: initial value differs"
    pt.compare_runs(got, ref, f"packed {layout}/{name} vs unpacked", NET, TOKENS)


@pytest.mark.dist
def test_the_steps_are_really_packed(runs, mp1):
    """Packing changes the micro-batches (fewer, fuller rows, other shapes), not the
    examples. Without pipeline parallelism a pack's row ends at its examples' tokens
    rounded up to a multiple of 8."""
    init_distributed(ParallelConfig(), seed=pt.SEED)
    for step in range(pt.STEPS):
        packed, unpacked = pt.packed_batches(step), pt.unpacked_batches(step)
        assert 1 < len(packed) < len(unpacked)
        assert [b["tokens"].shape for b in packed] == [(1, -(-b["real_tokens"] // 8) * 8) for b in packed]
        assert sum(b["real_tokens"] for b in packed) == sum(b["real_tokens"] for b in unpacked)
        assert sum(b["loss_mask"].sum() for b in packed) == sum(b["loss_mask"].sum() for b in unpacked)
        assert any(len(b["cu_seqlens"]) > 3 for b in packed)  # several examples share a pack
        assert sum(b["tokens"].numel() for b in packed) < sum(b["tokens"].numel() for b in unpacked)
    half, whole = runs["got"]["micro_batches/dp2"], runs["got"]["micro_batches/pp2"]  # rank 0's packs per step
    assert all(a <= b for a, b in zip(half, whole)) and sum(half) < sum(whole)  # DP=2: half the examples


def _one_step(model, batches):
    model.zero_grad(set_to_none=True)
    loss, tokens = forward_backward([model], batches)
    return torch.tensor(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.numerics
@pytest.mark.parametrize("plant", ["examples see each other", "positions do not restart"])
def test_the_comparison_fails_when_packing_is_wrong(mp1, plant, monkeypatch):
    """One step on a model with absolute positions: the packed loss and gradients equal the
    unpacked ones within the bound, and leave it when a pack attends across examples or
    counts positions through the whole pack."""
    from tiedlora.models.attention import SDPAttention

    cfg = tiny_model_cfg(position_embedding_type="learned_absolute")
    model = build(preset("tl6"), cfg)
    perturb(model, seed=3)
    examples = pt.step_examples(1)
    unpacked = [collate(examples[i:i + 2], pad_id=0) for i in range(0, len(examples), 2)]
    packed = [collate_packed(examples[i:i + 4], pad_id=0, pack_length=64) for i in range(0, len(examples), 4)]
    ref_loss, ref_grads = _one_step(model, unpacked)
    net = Net.of(cfg, seq=pt.SEQ, rank=8)

    def check(batches):
        loss, grads = _one_step(model, batches)
        assert_close(loss, ref_loss, loss_terms(net, 64 * len(batches)), "packed loss (sum)")
        for n, g in ref_grads.items():
            assert_close(grads[n], g, gradient_terms(net, 64 * len(batches)), f"packed {n}.grad")

    check(packed)
    with monkeypatch.context() as m:
        if plant == "examples see each other":  # one causal attention over the whole buffer
            m.setattr(SDPAttention, "_forward_packed",
                      lambda self, q, k, v, mask, params, causal: self._attend(
                          q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), None, True)
                      .transpose(0, 1).reshape(q.size(0), -1))
        else:
            for b in packed:
                b["position_ids"] = torch.arange(b["tokens"].shape[1]).unsqueeze(0)
        with pytest.raises(AssertionError, match="exceeds the fp32 rounding bound"):
            check(packed)


def test_step_token_counts_are_real_and_computed_tokens(mp1):
    """What the logs report: real tokens (prompt + answer, padding excluded) and computed
    positions, for right-padded and for packed micro-batches of the same examples."""
    from tiedlora.training import step_token_counts

    init_distributed(ParallelConfig(), seed=pt.SEED)
    examples = pt.step_examples(0)
    real = sum(len(e["input_ids"]) - 1 for e in examples)
    unpacked, packed = pt.unpacked_batches(0), pt.packed_batches(0)
    assert step_token_counts(unpacked) == (real, sum(b["tokens"].numel() for b in unpacked))
    assert step_token_counts(packed) == (real, sum(b["tokens"].numel() for b in packed))
    assert sum(b["tokens"].numel() for b in packed) < pt.PACK_LENGTH * len(packed)  # a pack cut short
