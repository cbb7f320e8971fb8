"""Greedy generation (with megatron-core's key/value cache) and log-likelihood scoring.

Both run on one pipeline stage (PP=1) at any TP size: logits are gathered over the
tensor-parallel group (``runtime_gather_output``), so every TP rank computes the same
tokens.

Greedy decoding of prompts of any lengths (:func:`greedy_generate`)::

    prompts ─► sorted by length, longest first ─► batches of ``batch_size``
    batch (left-padded to its longest prompt, pad[i] = longest - len(prompt i)):
        row 0   p p p a b c d          positions   0 0 0 0 1 2 3
        row 1   e f g h i j k                      0 1 2 3 4 5 6
    prefill: one forward pass over the batch, mask = left_padding_mask(pad, s, s)
    step t:  the new token of every row, mask = left_padding_mask(pad, 1, s + t), the KV cache

A row's rotary positions start at its first real token (megatron's rotary table is
replaced, for the batch, by one row per sequence: :class:`_RowRotary`) and its padding
keys are masked (:func:`tiedlora.models.attention.left_padding_mask`), so each prompt
attends and rotates as it would alone. A row that has produced EOS keeps being fed (its
tokens are dropped) until every row has, or ``max_new_tokens`` are reached.

Multiple-choice scoring (:func:`choice_logprobs`): every (question, choice) sequence of
a list of questions, sorted by length and cut into batches of ``batch_size`` sequences,
right-padded (causal attention: a real token never sees the padding to its right), one
forward pass per batch; :func:`continuation_logprobs` scores one question per pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from tiedlora import compat
from tiedlora.models.attention import left_padding_mask, mask_honouring_cores

PAD_ID = 0  # the id left padding uses: any id of the vocabulary (padding keys are masked)


def _positions(b: int, start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device).unsqueeze(0).expand(b, -1)


def _row_positions(pad: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Position ids [b, count] of tokens start..start+count-1 of left-padded rows, counted
    from each row's first real token (0 on padding)."""
    return (_positions(len(pad), start, count, pad.device) - pad.unsqueeze(1)).clamp(min=0)


def _check_single_stage():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError(
            "generation and log-likelihood scoring run with parallel.pp=1; adapter checkpoints "
            "are layout-independent, so evaluate with: python -m tiedlora.evaluate ... parallel.pp=1")


class _RowRotary(torch.nn.Module):
    """megatron's rotary table [S, 1, 1, d] (one row per position, the same for every
    sequence) as a table [S, b, 1, d] whose row t of sequence i is position t - pad[i].

    The values are rows of the original table, so a padded sequence gets bit for bit the
    rotations it gets alone. megatron slices the table along its first dimension (the KV
    cache's offsets) and broadcasts it over the batch, so a per-sequence table fits.
    """

    def __init__(self, inner: torch.nn.Module, pad: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.pad = pad
        self._cache: dict = {}

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        key = (max_seq_len, offset)
        if key not in self._cache:
            emb = self.inner(max_seq_len, offset, packed_seq, cp_group)  # [S, 1, 1, d]
            idx = (torch.arange(emb.size(0), device=emb.device).unsqueeze(1)
                   - self.pad.to(emb.device).unsqueeze(0)).clamp_(min=0)  # [S, b]
            self._cache[key] = emb[:, 0, 0][idx].unsqueeze(2)  # [S, b, 1, d]
        return self._cache[key]

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)


def _batches(n: int, batch_size: int, progress: Optional[str]):
    """Start indices of the batches; a progress bar over them when ``progress`` names one."""
    starts = range(0, n, batch_size)
    if progress is None:
        return starts
    from tqdm import tqdm

    return tqdm(starts, desc=progress, leave=False, dynamic_ncols=True)


@contextmanager
def _left_padded(model, pad: torch.Tensor):
    """Within the block, ``model`` rotates row i from its first real token (pad[i])."""
    inner = getattr(model, "rotary_pos_emb", None) if model.position_embedding_type == "rope" else None
    if inner is None:  # learned absolute positions: the position ids carry it
        yield
        return
    model.rotary_pos_emb = _RowRotary(inner, pad)
    try:
        yield
    finally:
        model.rotary_pos_emb = inner


@torch.no_grad()
def _greedy_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                  vocab_size: int, use_cache: bool) -> List[List[int]]:
    from megatron.core.inference.contexts import StaticInferenceContext

    dev = compat.default_device()
    b, n = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([n - len(p) for p in prompts], device=dev)
    seq = torch.full((b, n), PAD_ID, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        seq[i, n - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=dev)

    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    steps = 0
    with _left_padded(model, pad):
        ctx = StaticInferenceContext(b, n + max_new_tokens) if use_cache else None
        logits = model(seq, _row_positions(pad, 0, n), left_padding_mask(pad, n, n), inference_context=ctx,
                       runtime_gather_output=True)
        for step in range(max_new_tokens):
            nxt = logits[:, -1, :vocab_size].argmax(-1)
            out[:, step] = nxt
            done |= nxt == eos_id
            steps = step + 1
            if steps == max_new_tokens or bool(done.all()):
                break
            total = n + steps  # tokens per row once nxt is appended
            if use_cache:
                ctx.sequence_len_offset = total - 1
                logits = model(nxt.unsqueeze(1), _row_positions(pad, total - 1, 1), left_padding_mask(pad, 1, total),
                               inference_context=ctx, runtime_gather_output=True)
            else:
                seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
                logits = model(seq, _row_positions(pad, 0, total), left_padding_mask(pad, total, total),
                               runtime_gather_output=True)
    results = []
    for row in out[:, :steps].tolist():
        results.append(row[:row.index(eos_id)] if eos_id in row else row)
    return results


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                    vocab_size: int, batch_size: int = 16, use_cache: bool = True,
                    progress: Optional[str] = None) -> List[List[int]]:
    """Greedy continuation of each prompt (EOS and anything after it removed), decoded in
    batches of ``batch_size`` prompts of similar length (module docstring). ``progress``:
    a description for a progress bar over the batches (None: no bar)."""
    _check_single_stage()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: an empty prompt (nothing to continue from)")
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: List[List[int]] = [[] for _ in prompts]
    try:
        with mask_honouring_cores(model):
            for k in _batches(len(order), batch_size, progress):
                chunk = order[k:k + batch_size]
                outs = _greedy_batch(model, [prompts[i] for i in chunk], max_new_tokens, eos_id, vocab_size,
                                     use_cache)
                for i, toks in zip(chunk, outs):
                    results[i] = toks
    finally:
        model.train(was_training)
    return results


def _sequence_logprobs(model, seqs: List[List[int]], starts: List[int], vocab_size: int) -> List[float]:
    """Sum of log-probabilities of ``seq[start:]`` given ``seq[:start]``, for each sequence;
    one forward pass over all of them, right-padded."""
    dev = compat.default_device()
    s = max(len(x) for x in seqs)
    tokens = torch.full((len(seqs), s), PAD_ID, dtype=torch.long, device=dev)
    for i, x in enumerate(seqs):
        tokens[i, :len(x)] = torch.as_tensor(x, dtype=torch.long, device=dev)
    logits = model(tokens, _positions(len(seqs), 0, s, dev), None, runtime_gather_output=True)
    # only the positions that predict a continuation token reach the log-softmax
    rows = torch.cat([torch.full((len(x) - st,), i, device=dev) for i, (x, st) in enumerate(zip(seqs, starts))])
    cols = torch.cat([torch.arange(st - 1, len(x) - 1, device=dev) for x, st in zip(seqs, starts)])
    targets = torch.cat([torch.as_tensor(x[st:], dtype=torch.long, device=dev) for x, st in zip(seqs, starts)])
    logp = F.log_softmax(logits[rows, cols, :vocab_size].float(), dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(len(seqs), dtype=picked.dtype, device=dev).index_add_(0, rows, picked)
    return sums.tolist()


@torch.no_grad()
def choice_logprobs(model, questions: Sequence[Tuple[Sequence[int], Sequence[Sequence[int]]]],
                    vocab_size: int, batch_size: int = 16, progress: Optional[str] = None) -> List[List[float]]:
    """For each ``(prompt, continuations)``, the summed log-probability of every
    continuation given the prompt. The (question, choice) sequences are sorted by length
    and scored ``batch_size`` at a time, several questions per forward pass."""
    _check_single_stage()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    flat = []  # (question, choice, tokens, start)
    for qi, (prompt, conts) in enumerate(questions):
        if not prompt:
            raise ValueError(f"choice_logprobs: question {qi} has an empty prompt")
        for ci, c in enumerate(conts):
            if not c:
                raise ValueError(f"choice_logprobs: question {qi}, choice {ci} has no tokens")
            flat.append((qi, ci, list(prompt) + list(c), len(prompt)))
    flat.sort(key=lambda e: -len(e[2]))
    scores: List[List[float]] = [[0.0] * len(conts) for _, conts in questions]
    was_training = model.training
    model.eval()
    try:
        for k in _batches(len(flat), batch_size, progress):
            part = flat[k:k + batch_size]
            sums = _sequence_logprobs(model, [e[2] for e in part], [e[3] for e in part], vocab_size)
            for (qi, ci, _, _), v in zip(part, sums):
                scores[qi][ci] = v
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def continuation_logprobs(model, prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                          vocab_size: int) -> List[float]:
    """Sum of log-probabilities of each continuation given the prompt: one question, one
    forward pass (the per-question reference of :func:`choice_logprobs`)."""
    _check_single_stage()
    was_training = model.training
    model.eval()
    dev = compat.default_device()
    seqs = [list(prompt) + list(c) for c in continuations]
    s = max(len(x) for x in seqs)
    tokens = torch.zeros(len(seqs), s, dtype=torch.long, device=dev)
    for i, x in enumerate(seqs):
        tokens[i, :len(x)] = torch.tensor(x, device=dev)
    logits = model(tokens, _positions(len(seqs), 0, s, dev), None, runtime_gather_output=True)
    logp = F.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    scores = []
    for i, c in enumerate(continuations):
        start = len(prompt)
        tgt = torch.tensor(list(c), device=dev)
        lp = logp[i, start - 1:start - 1 + len(c)].gather(-1, tgt.unsqueeze(-1)).sum()
        scores.append(float(lp))
    model.train(was_training)
    return scores
