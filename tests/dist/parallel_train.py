"""A few optimizer steps of Tied-LoRA fine-tuning under any TP/PP/VPP/DP layout.

Shared by the single-process reference (run inside pytest, tests/test_parallel_layouts.py)
and the 2-process worker (tests/dist/parallel_check.py), so both run the *same* loop, made
of the real training pieces of :mod:`tiedlora.training` — megatron-core's schedule via
``forward_backward``, ``finalize_adapter_grads``, ``clip_adapter_grads``, AdamW from
``build_optimizer``, ``sync_tied_copies`` — exactly in the order ``tiedlora.finetune`` uses.

Base weights come from one full (layout-independent) state dict loaded by global layer
number (``tiedlora.convert.layout.load_source``), because a model built at PP=2 is
initialised from other RNG positions than at PP=1. Adapters start from their own
seed-derived values, identical in every layout by construction (that is checked).

The data of one optimizer step is ``NUM_MICRO`` micro-batches of ``MICRO_BATCH`` sequences;
a data-parallel rank ``r`` of ``dp`` takes micro-batches ``r, r+dp, ...`` (so DP=2 runs
half of them per rank). Loss masks cover a different number of tokens in every sequence,
so a wrong token-count normalisation across micro-batches or DP ranks shows.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ALL_TARGETS, preset, targets_override, tiny_model_cfg  # noqa: E402
from numerics import Comparisons, gradient_terms, loss_terms  # noqa: E402

from tiedlora.dist import set_seed  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_model_chunks  # noqa: E402
from tiedlora.convert.layout import LazyTensor, load_source  # noqa: E402
from tiedlora.peft import adapter_state_dict, apply_peft, finalize_adapter_grads  # noqa: E402
from tiedlora.checkpoint import training_state_tensors  # noqa: E402
from tiedlora.config import OptimConfig  # noqa: E402
from tiedlora.peft.model import iter_adapter_params, trainable_params  # noqa: E402
from tiedlora.training import (build_optimizer, clip_adapter_grads, forward_backward,  # noqa: E402
                               global_tokens, reduce_loss, sync_tied_copies)

SEED = 5
STEPS = 3  # optimizer steps
NUM_MICRO = 4  # micro-batches per optimizer step (global, over all DP ranks)
MICRO_BATCH = 2  # sequences per micro-batch
SEQ = 16  # tokens per sequence (divisible by TP for sequence parallel)
VOCAB = 256
PRESETS = ["lora", "vera", "tl6"]
# lr large enough that 3 steps move every factor well off its initial value; clipping
# below the measured gradient norms (0.009-0.8) so the clipping coefficient matters.
OPTIM = OptimConfig(lr=2e-2, min_lr=2e-2, warmup_steps=0, grad_clip=0.005)


def model_cfg():
    """4 layers so that PP=2 x VPP=2 gives every virtual stage one layer."""
    return tiny_model_cfg(num_layers=4, vocab_size=VOCAB)


@functools.lru_cache(maxsize=None)
def peft_cfg(name: str):
    """The preset as composed from conf/peft/<name>.yaml (Hydra; composed once)."""
    return preset(name, target_modules=targets_override(ALL_TARGETS), alpha=16)


def global_micro_batches(step: int) -> List[dict]:
    """The step's NUM_MICRO micro-batches (same on every rank; a rank picks its share)."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(NUM_MICRO):
        ids = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
        mask = torch.zeros(MICRO_BATCH, SEQ)
        for row in range(MICRO_BATCH):  # a "prompt" of 2..10 tokens is not supervised
            start = int(torch.randint(2, 11, (1,), generator=g))
            mask[row, start:] = 1.0
        out.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "loss_mask": mask,
                    "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ).contiguous()})
    return out


def my_micro_batches(step: int) -> List[dict]:
    from megatron.core import parallel_state as ps

    r, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return global_micro_batches(step)[r::dp]


# Variable-length examples (tests/test_packing.py): the same examples of a step, either
# right-padded MICRO_BATCH at a time or packed whole into PACK_LENGTH-token micro-batches.
PACK_LENGTH = 32  # divisible by TP=2 (sequence parallel splits a pack)


def step_examples(step: int) -> List[dict]:
    """The step's NUM_MICRO * MICRO_BATCH examples: 3 to 17 tokens, the first 1 to 7 of
    them an unsupervised prompt."""
    g = torch.Generator().manual_seed(2000 + step)
    out = []
    for _ in range(NUM_MICRO * MICRO_BATCH):
        n = int(torch.randint(3, SEQ + 2, (1,), generator=g))
        prompt = int(torch.randint(1, min(8, n - 1), (1,), generator=g))
        out.append({"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                    "loss_mask": [0] * prompt + [1] * (n - prompt)})
    return out


def _my_example_lists(step: int) -> List[List[int]]:
    """This data-parallel rank's micro-batches of the step, as example indices (as the
    sampler deals them: micro-batch j of the global step goes to rank j % dp)."""
    from megatron.core import parallel_state as ps

    r, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    lists = [list(range(j * MICRO_BATCH, (j + 1) * MICRO_BATCH)) for j in range(NUM_MICRO)]
    return lists[r::dp]


def unpacked_batches(step: int) -> List[dict]:
    from tiedlora.data.sft import collate

    ex = step_examples(step)
    return [collate([ex[i] for i in il], pad_id=0) for il in _my_example_lists(step)]


def packed_batches(step: int) -> List[dict]:
    from megatron.core import parallel_state as ps

    from tiedlora.data.packing import pack_micro_batches

    mine = [i for il in _my_example_lists(step) for i in il]
    # as finetune packs: full-length rows under PP, else cut to a multiple of 8 (x TP, which
    # sequence parallelism needs; the layouts here do not say whether SP is on)
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return pack_micro_batches(step_examples(step), mine, 0, PACK_LENGTH, "first_fit_shuffle", SEED,
                              multiple_of=None if pp > 1 else 8 * tp)


def build(parallel: ParallelConfig, name: str, base: Dict[str, torch.Tensor]):
    set_seed(SEED)
    chunks = build_model_chunks(model_cfg(), parallel)
    source = {k: LazyTensor(origin=k, read=lambda v=v: v) for k, v in base.items()}
    load_source(chunks, source, model_cfg(), "reference base")
    cfg = peft_cfg(name)
    for c in chunks:
        apply_peft(c, cfg)
    return chunks


def tied_copy_spread(chunks) -> float:
    """Largest difference between copies of a tied factor on this rank's virtual chunks and
    on every pipeline stage (same TP rank). 0.0 when every copy is identical."""
    from megatron.core import parallel_state as ps

    copies: Dict[str, List[torch.Tensor]] = {}
    for c in chunks:
        for r in iter_adapter_params(c):
            if r.tied:
                copies.setdefault(r.name, []).append(r.param.detach().cpu().clone())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, copies, group=ps.get_pipeline_model_parallel_group())
        copies = {}
        for part in parts:
            for n, ts in part.items():
                copies.setdefault(n, []).extend(ts)
    spread = 0.0
    for ts in copies.values():
        for t in ts[1:]:
            spread = max(spread, float((t - ts[0]).abs().max()))
    return spread


def tied_holders(chunks) -> Dict[str, int]:
    """tied factor -> number of copies on this rank (one per virtual chunk)."""
    out: Dict[str, int] = {}
    for c in chunks:
        for r in iter_adapter_params(c):
            if r.tied:
                out[r.name] = out.get(r.name, 0) + 1
    return out


def optimizer_entries(chunks, optimizer) -> Dict[str, int]:
    """adapter tensor name -> how many optimizer entries hold one of its copies."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    count: Dict[str, int] = {}
    for c in chunks:
        for r in iter_adapter_params(c):
            if r.param.requires_grad:
                count[r.name] = count.get(r.name, 0) + (id(r.param) in held)
    return count


class _DPReduceSpy:
    """Records the element counts all-reduced over the data-parallel group."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.group = ps.get_data_parallel_group()
        self.numel: List[int] = []
        self._orig = dist.all_reduce

    def __enter__(self):
        def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if group is self.group and dist.get_world_size(group) > 1:
                self.numel.append(tensor.numel())
            return self._orig(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = spy
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig
        return False


def train(parallel: ParallelConfig, name: str, base: Dict[str, torch.Tensor], steps: int = STEPS,
          batches: Callable[[int], List[dict]] = None) -> dict:
    """Run ``steps`` optimizer steps; return everything the tests compare. ``batches(step)``:
    this rank's micro-batches of the step (default :func:`my_micro_batches`).

    Collective over the whole world (every rank must call it with the same arguments).
    """
    batches = batches or my_micro_batches
    chunks = build(parallel, name, base)
    result = {"init": adapter_state_dict(chunks), "tied_spread": [tied_copy_spread(chunks)],
              "tied_holders": tied_holders(chunks), "losses": [], "grad_norms": [], "grads": [],
              "dp_reduced_numel": [], "base_grads": 0}
    params = trainable_params(chunks)
    optimizer = build_optimizer(params, OPTIM)
    result["optimizer_entries"] = optimizer_entries(chunks, optimizer)
    result["trainable_numel"] = sum(r.param.numel() for r in params)
    for step in range(steps):
        micro = batches(step)
        n_tokens = global_tokens(micro)
        for c in chunks:
            c.zero_grad(set_to_none=True)
        loss_sum, toks = forward_backward(chunks, micro)
        with _DPReduceSpy() as spy:
            finalize_adapter_grads(chunks, num_tokens=n_tokens)
        result["dp_reduced_numel"].append(spy.numel)
        result["grads"].append(adapter_state_dict(chunks, grads=True))
        result["grad_norms"].append(clip_adapter_grads(chunks, OPTIM.grad_clip))
        for g in optimizer.param_groups:
            g["lr"] = OPTIM.lr
        optimizer.step()
        sync_tied_copies(chunks)
        result["losses"].append(reduce_loss(loss_sum, toks))
        result["tied_spread"].append(tied_copy_spread(chunks))
    result["base_grads"] = sum(1 for c in chunks for n, p in c.named_parameters()
                               if p.grad is not None and ".adapter." not in n
                               and not n.startswith("tied_adapters."))
    result["final"] = adapter_state_dict(chunks)
    result["train_state"] = {k: v for k, v in training_state_tensors(chunks, optimizer).items()
                             if k.startswith("optim.")}
    return result, chunks, optimizer


def compare_runs(got: dict, ref: dict, where: str, net, tokens: int) -> None:
    """Every number of a training run vs the reference, within its fp32 rounding bound
    (tests/numerics.py): ``net`` the model's sizes, ``tokens`` a step's tokens. Step s's
    numbers also carry the rounding of the s earlier steps (through the parameters), so
    their K grows by one gradient per step."""
    grad = gradient_terms(net, tokens)
    c = Comparisons()
    for step, (g, r) in enumerate(zip(got["losses"], ref["losses"])):
        c.close(torch.tensor(g), torch.tensor(r), loss_terms(net, tokens) + step * grad,
                f"{where} step {step} loss")
    for step, (g, r) in enumerate(zip(got["grad_norms"], ref["grad_norms"])):  # + the squares summed
        c.close(torch.tensor(g), torch.tensor(r), (step + 1) * grad + ref["trainable_numel"],
                f"{where} step {step} grad norm")
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        assert list(g) == list(r)
        for k, t in r.items():
            c.close(g[k], t, (step + 1) * grad, f"{where} step {step} grad {k}")
    trainable = ref["grads"][0]
    for k, t in ref["final"].items():
        if k not in trainable:  # frozen: never touched
            assert torch.equal(got["final"][k], t) and torch.equal(t, ref["init"][k]), f"{where} frozen {k}"
            continue
        # AdamW is elementwise: the update inherits the gradients' relative error, in norm
        c.close(got["final"][k] - got["init"][k], t - ref["init"][k], STEPS * grad,
                f"{where} {STEPS}-step update {k}", scale="norm")
    assert sorted(got["train_state"]) == sorted(ref["train_state"])
    for k, t in ref["train_state"].items():
        if k == "optim.step":
            assert torch.equal(got["train_state"][k], t)
            continue
        squared = 2 if k.startswith("optim.exp_avg_sq.") else 1  # a square doubles the relative error
        c.close(got["train_state"][k], t, squared * STEPS * grad, f"{where} optimizer {k}", scale="norm")
    c.check()


def single_process(d: Path, threads: int, batch_fns: Dict[str, Callable]) -> tuple:
    """The TP=PP=DP=1 side of a layout test, in the calling process: the base weights (also
    saved as ``d/base.safetensors`` for the workers) and, per entry of ``batch_fns`` (None:
    :func:`my_micro_batches`), every preset trained on those micro-batches. Runs with
    ``threads`` threads, as the workers."""
    from safetensors.torch import save_file

    from tiedlora.convert.layout import gather_full
    from tiedlora.dist import init_distributed

    init_distributed(ParallelConfig(), seed=SEED)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        set_seed(SEED)
        base = gather_full(build_model_chunks(model_cfg(), ParallelConfig()))
        save_file({k: v.contiguous() for k, v in base.items()}, str(d / "base.safetensors"))
        runs = {key: {n: train(ParallelConfig(), n, base, batches=fn)[0] for n in PRESETS}
                for key, fn in batch_fns.items()}
    finally:
        torch.set_num_threads(before)
    return base, runs


def eval_loss(chunks) -> float:
    """Per-token loss of the step-0 batch, forward only (evaluation under this layout)."""
    loss_sum, toks = forward_backward(chunks, my_micro_batches(0), forward_only=True)
    return reduce_loss(loss_sum, toks)
