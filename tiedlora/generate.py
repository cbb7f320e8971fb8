"""Greedy generation (with megatron-core's key/value cache) and log-likelihood scoring.

Both run on one pipeline stage (PP=1) at any TP size, with or without sequence parallelism
(switched off while they run: a decode step has one token): logits are gathered over the
tensor-parallel group (``runtime_gather_output``), so every TP rank computes the same
tokens.

Greedy decoding of prompts of any lengths (:func:`greedy_generate`)::

    prompts ─► sorted by length, longest first ─► batches of ``batch_size``
    batch (left-padded to its longest prompt, pad[i] = longest - len(prompt i)):
        row 0   p p p a b c d          positions   0 0 0 0 1 2 3
        row 1   e f g h i j k                      0 1 2 3 4 5 6
    prefill: the rows in passes of similar length (:func:`_passes`); a pass is padded only
             to its own longest prompt (m tokens) and writes the shared KV cache at its
             rows, positions s - m .. s - 1; mask = left_padding_mask(pad[pass], m, s)
    step t:  the new token of every row, mask = left_padding_mask(pad, 1, s + t), the KV cache

Prefill is most of the work of a short completion. Run as one pass over the batch it
computes every row's padding up to the batch's longest prompt, in activations as large as
the batch. :func:`_passes` splits the length-sorted rows where that costs least: padded
tokens plus ``PASS_COST`` tokens per pass (a pass reads every weight once, whatever its
size), at most ``pass_tokens`` padded tokens each (on a CPU its activations then stay in
cache and in the allocator's reused memory). Every decode step still runs the whole batch.
The cache starts zero-filled, so positions a pass never writes (before its own longest
prompt) are finite, and they are masked.

A row's rotary positions start at its first real token (megatron's rotary table is
replaced, for the batch, by one row per sequence: :class:`_RowRotary`) and its padding
keys are masked (:func:`tiedlora.models.attention.left_padding_mask`), so each prompt
attends and rotates as it would alone. A row that has produced EOS keeps being fed (its
tokens are dropped) until every row has, or ``max_new_tokens`` are reached.

Multiple-choice scoring (:func:`choice_logprobs`): questions sorted by prompt length,
several per batch (at most ``batch_size`` choices). The prompts of a batch run once, left
padded and in passes as above, and fill the KV cache. Then each question's choices run
one after another in one row over its own prompt's cache (no copy of the cache per
choice, no padding between choices), rows in passes split the same way::

    row q        prompt q (in the cache)   a1  a2  a3  b1  b2  c1  c2  c3
    positions    0 .. L - 1                L   L+1 L+2 L   L+1 L   L+1 L+2     (L = len(prompt q))
    mask         a query sees its prompt's real keys and the earlier tokens of its own choice

A choice of n tokens feeds its first n - 1 (the last predicts nothing; the first is
predicted at the prompt's last position). Only the positions that predict a choice token
reach the output layer, ``LOGIT_ELEMENTS`` logits at a time, and a token's
log-probability is its logit minus the log-sum-exp of its row: no [tokens, vocab] tensor
is built for a whole pass. A prompt is computed once instead of once per choice, and the
scores equal one question per forward pass (:func:`continuation_logprobs`, the reference)
within fp32 rounding.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from tiedlora import compat
from tiedlora.models.attention import left_padding_mask, mask_honouring_cores

PAD_ID = 0  # the id left padding uses: any id of the vocabulary (padding keys are masked)
PASS_TOKENS = 1024  # padded tokens per prefill or scoring pass, at most (module docstring)
PASS_COST = 64  # what one more forward pass costs, in padded tokens (it reads every weight once)
LOGIT_ELEMENTS = 1 << 24  # logits per output-layer call when scoring choices (64 MB in fp32)


def _positions(b: int, start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device).unsqueeze(0).expand(b, -1)


def _row_positions(pad: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Position ids [b, count] of tokens start..start+count-1 of left-padded rows, counted
    from each row's first real token (0 on padding)."""
    return (_positions(len(pad), start, count, pad.device) - pad.unsqueeze(1)).clamp(min=0)


def _check_arguments(batch_size: int, pass_tokens: int):
    _check_single_stage()
    for name, value in (("batch_size", batch_size), ("pass_tokens", pass_tokens)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")


def _check_single_stage():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError(
            "generation and log-likelihood scoring run with parallel.pp=1; adapter checkpoints "
            "are layout-independent, so evaluate with: python -m tiedlora.evaluate ... parallel.pp=1")


class _RowRotary(torch.nn.Module):
    """megatron's rotary table [S, 1, 1, d] (one row per position, the same for every
    sequence) as a table [S, b, 1, d] whose row t of sequence i is position slots(S)[t, i].

    The values are rows of the original table, so a padded sequence gets bit for bit the
    rotations it gets alone. megatron slices the table along its first dimension (the KV
    cache's offsets) and broadcasts it over the batch, so a per-sequence table fits.
    """

    def __init__(self, inner: torch.nn.Module, slots):
        super().__init__()
        self.inner = inner
        self.slots = slots  # S -> LongTensor [S, b]: the position of each slot of each sequence
        self._cache: dict = {}

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        key = (max_seq_len, offset)
        if key not in self._cache:
            emb = self.inner(max_seq_len, offset, packed_seq, cp_group)  # [S, 1, 1, d]
            self._cache[key] = emb[:, 0, 0][self.slots(emb.size(0)).to(emb.device)].unsqueeze(2)  # [S, b, 1, d]
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
def _keys_rotated_once(model):
    """Within the block, megatron's static KV cache holds *rotated* keys.

    megatron caches keys before the rotary embedding and rotates the whole cache again at
    every decode step ([s, b, groups, hn] of multiplies per layer and token, most of a CPU
    decode step's non-matmul time). Here each new key is rotated once, at its own positions,
    with megatron's own ``apply_rotary_pos_emb`` and table, before it is cached, and the
    key rotation megatron would apply is dropped -- as megatron's dynamic-batching engine
    does. Rotation is elementwise per position, so the attention sees the same values.
    """
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.attention import Attention

    def wrap(attn):
        adjust = attn._adjust_key_value_for_inference

        def rotated(ctx, query, key, value, rotary_pos_emb, *args, **kwargs):
            if ctx is None or rotary_pos_emb is None or not ctx.is_static_batching():
                return adjust(ctx, query, key, value, rotary_pos_emb, *args, **kwargs)
            start = ctx.sequence_len_offset
            key = apply_rotary_pos_emb(key, rotary_pos_emb[1][start:start + key.size(0)], config=attn.config,
                                       cp_group=attn.pg_collection.cp)
            query, key, value, rotary, mask_type, table = adjust(ctx, query, key, value, rotary_pos_emb,
                                                                 *args, **kwargs)
            return query, key, value, (rotary[0], None), mask_type, table

        return rotated

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    try:
        for attn in attentions:
            attn._adjust_key_value_for_inference = wrap(attn)
        yield
    finally:
        for attn in attentions:
            attn.__dict__.pop("_adjust_key_value_for_inference", None)


@contextmanager
def _without_sequence_parallel(model):
    """Within the block, ``model`` runs without sequence parallelism (the same weights and
    tensor-parallel sharding; activations whole on every TP rank). Sequence parallelism
    splits a pass's tokens over the TP ranks, which a decode step of one token cannot."""
    flags, configs = [], {}
    for m in model.modules():
        for attr in ("sequence_parallel", "reduce_scatter_embeddings"):  # set at construction
            if getattr(m, attr, None) is True:
                flags.append((m, attr))
        config = getattr(m, "config", None)
        if getattr(config, "sequence_parallel", False):
            configs[id(config)] = config  # read at run time; shared by most modules
    try:
        for m, attr in flags:
            setattr(m, attr, False)
        for config in configs.values():
            config.sequence_parallel = False
        yield
    finally:
        for m, attr in flags:
            setattr(m, attr, True)
        for config in configs.values():
            config.sequence_parallel = True


@contextmanager
def _zero_filled_cache(model):
    """Within the block, megatron's static KV cache is allocated zero-filled (it is
    ``torch.empty``): positions a prefill group never writes are masked, and a masked key
    or value must still be finite (0 x NaN is NaN in the attention's weighted sum)."""
    from megatron.core.transformer.attention import Attention

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    try:
        for attn in attentions:
            attn._allocate_memory = lambda *args, _alloc=attn._allocate_memory: _alloc(*args).zero_()
        yield
    finally:
        for attn in attentions:
            attn.__dict__.pop("_allocate_memory", None)


@contextmanager
def _inference(model):
    """Everything decoding and scoring change in the model for their duration: cores that
    honour the padding mask, no sequence parallelism, keys rotated once and a zero-filled
    KV cache."""
    with mask_honouring_cores(model), _without_sequence_parallel(model), _keys_rotated_once(model), \
            _zero_filled_cache(model):
        yield


@contextmanager
def _rotated_at(model, slots):
    """Within the block, ``model`` rotates slot t of sequence i as position slots(S)[t, i]
    (:class:`_RowRotary`)."""
    inner = getattr(model, "rotary_pos_emb", None) if model.position_embedding_type == "rope" else None
    if inner is None:  # learned absolute positions: the position ids carry it
        yield
        return
    model.rotary_pos_emb = _RowRotary(inner, slots)
    try:
        yield
    finally:
        model.rotary_pos_emb = inner


def _left_padded(model, pad: torch.Tensor):
    """Within the block, ``model`` rotates row i from its first real token (pad[i])."""
    return _rotated_at(model, lambda S: _row_positions(pad, 0, S).t())


def _passes(lengths: Sequence[int], max_tokens: int) -> List[Tuple[int, int]]:
    """Consecutive row ranges [r0, r1) to run as one pass each, padded to the range's
    longest row: the split with the least padded tokens plus PASS_COST per pass, each pass
    at most ``max_tokens`` padded tokens (a longer row alone). Exact over the rows' order
    (rows sorted by length make it the best split overall)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of rows 0..j-1
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = 0
        for i in range(j - 1, -1, -1):
            longest = max(longest, lengths[i])
            tokens = (j - i) * longest
            if tokens > max_tokens and j - i > 1:
                break
            if best[i] + tokens + PASS_COST < best[j]:
                best[j], cut[j] = best[i] + tokens + PASS_COST, i
    ranges, j = [], n
    while j > 0:
        ranges.append((cut[j], j))
        j = cut[j]
    return ranges[::-1]


def _prefill(model, ctx, seq: torch.Tensor, lengths: Sequence[int], max_tokens: int) -> torch.Tensor:
    """Run the prompts left-padded in ``seq`` [b, n] (row i's real tokens are its last
    lengths[i]) into ``ctx``'s KV cache in passes of similar length (module docstring);
    the logits [b, vocab] at each row's last position."""
    n = seq.size(1)
    pad = torch.tensor([n - k for k in lengths], device=seq.device)
    last = []
    for r0, r1 in _passes(lengths, max_tokens):
        m, gpad = max(lengths[r0:r1]), pad[r0:r1]
        ctx.batch_size_offset, ctx.sequence_len_offset = r0, n - m
        with _left_padded(model, gpad):
            last.append(model(seq[r0:r1, n - m:], _row_positions(gpad, n - m, m), left_padding_mask(gpad, m, n),
                              inference_context=ctx, runtime_gather_output=True)[:, -1])
    ctx.batch_size_offset = 0
    return torch.cat(last)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, without materialising the log-softmax of the
    whole vocabulary (a [tokens, vocab] tensor as large as the logits)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def _greedy_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                  vocab_size: int, use_cache: bool, pass_tokens: int) -> List[List[int]]:
    from megatron.core.inference.contexts import StaticInferenceContext

    dev = compat.default_device()
    lengths = [len(p) for p in prompts]
    b, n = len(prompts), max(lengths)
    pad = torch.tensor([n - k for k in lengths], device=dev)
    seq = torch.full((b, n), PAD_ID, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        seq[i, n - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=dev)

    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    steps = 0
    if use_cache:
        ctx = StaticInferenceContext(b, n + max_new_tokens)
        logits = _prefill(model, ctx, seq, lengths, pass_tokens).unsqueeze(1)
    else:
        with _left_padded(model, pad):
            logits = model(seq, _row_positions(pad, 0, n), left_padding_mask(pad, n, n), runtime_gather_output=True)
    with _left_padded(model, pad):
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
                    progress: Optional[str] = None, pass_tokens: int = PASS_TOKENS) -> List[List[int]]:
    """Greedy continuation of each prompt (EOS and anything after it removed), decoded in
    batches of ``batch_size`` prompts of similar length, their prompts run in groups of at
    most ``pass_tokens`` padded tokens (module docstring). ``progress``: a description
    for a progress bar over the batches (None: no bar)."""
    _check_arguments(batch_size, pass_tokens)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: an empty prompt (nothing to continue from)")
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: List[List[int]] = [[] for _ in prompts]
    try:
        with _inference(model):
            for k in _batches(len(order), batch_size, progress):
                chunk = order[k:k + batch_size]
                outs = _greedy_batch(model, [prompts[i] for i in chunk], max_new_tokens, eos_id, vocab_size,
                                     use_cache, pass_tokens)
                for i, toks in zip(chunk, outs):
                    results[i] = toks
    finally:
        model.train(was_training)
    return results


@contextmanager
def _target_logprobs_at(model, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor, vocab_size: int):
    """Within the block, the model returns [1, n, 1]: the log-probability of ``targets[k]``
    at (row, position) ``rows[k], cols[k]``. The output layer sees only those n hidden
    states, at most LOGIT_ELEMENTS logits at a time: scoring needs a few positions of each
    sequence, and [n, vocab] logits at once would be a large new tensor for every pass."""
    layer = model.output_layer
    forward = layer.forward
    step = max(1, LOGIT_ELEMENTS // vocab_size)

    def scored(hidden, *args, **kwargs):  # hidden [s, b, h]
        picked, out = hidden[cols, rows].unsqueeze(1), []
        for k in range(0, picked.size(0), step):
            logits, _ = forward(picked[k:k + step], *args, **kwargs)
            out.append(_token_logprobs(logits[:, 0, :vocab_size], targets[k:k + step]))
        return torch.cat(out).view(-1, 1, 1), None

    layer.forward = scored
    try:
        yield
    finally:
        del layer.forward


def _choice_mask(pad: torch.Tensor, seg: torch.Tensor, n_p: int) -> torch.Tensor:
    """Boolean mask [b, 1, m, n_p + m] (True = masked out) for choice rows over their
    prompts' cache: a query sees its prompt's real keys (not the left padding, pad[i]) and
    the earlier tokens of its own choice (seg [b, m]: the choice each position belongs to,
    -1 on the right padding), never another choice of its row."""
    b, m = seg.shape
    prompt = torch.arange(n_p, device=pad.device).view(1, 1, n_p) < pad.view(-1, 1, 1)
    causal = torch.ones(m, m, dtype=torch.bool, device=seg.device).tril_()
    own = (seg.unsqueeze(2) == seg.unsqueeze(1)) & causal  # [b, m, m]; padding sees padding (finite)
    return torch.cat([prompt.expand(b, m, n_p), ~own], dim=2).unsqueeze(1)


def _choice_rows(questions, lengths: Sequence[int], n_p: int, n_c: int, dev):
    """Row q holds the first len - 1 tokens of each of question q's choices, one after
    another (a choice's token t predicts its token t + 1). Returns the tokens [b, n_c], each
    position's choice [b, n_c] (-1: padding), each cache slot's position [b, n_p + n_c]
    (prompt slots counted from the first real token, a choice's tokens from len(prompt q)
    on, padding 0) and (row, column, target token, choice) of every token scored there."""
    b = len(questions)
    y = torch.full((b, n_c), PAD_ID, dtype=torch.long)
    seg = torch.full((b, n_c), -1, dtype=torch.long)
    slots = torch.zeros(b, n_p + n_c, dtype=torch.long)
    slots[:, :n_p] = _row_positions(torch.tensor([n_p - k for k in lengths]), 0, n_p)
    at, r = [], 0
    for q, (_, cs) in enumerate(questions):
        col = 0
        for c in cs:
            k = len(c) - 1
            y[q, col:col + k] = torch.as_tensor(c[:-1], dtype=torch.long)
            seg[q, col:col + k] = r
            slots[q, n_p + col:n_p + col + k] = torch.arange(lengths[q], lengths[q] + k)
            at.extend((q, col + t, c[t + 1], r) for t in range(k))
            col, r = col + k, r + 1
    return y.to(dev), seg.to(dev), slots.to(dev), at


def _score_questions(model, questions, vocab_size: int, max_tokens: int) -> List[List[float]]:
    """Summed log-probabilities of every choice of a few questions: their prompts run into
    the KV cache, then each question's choices, one after another in one row over its own
    prompt's cache, in passes of rows of similar length (module docstring)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    dev = compat.default_device()
    prompts = [list(p) for p, _ in questions]
    conts = [list(c) for _, cs in questions for c in cs]
    owner = torch.tensor([q for q, (_, cs) in enumerate(questions) for _ in cs], device=dev)
    lengths = [len(p) for p in prompts]
    b, n_p = len(prompts), max(lengths)
    pad = torch.tensor([n_p - k for k in lengths], device=dev)
    x = torch.full((b, n_p), PAD_ID, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        x[i, n_p - len(p):] = torch.as_tensor(p, dtype=torch.long, device=dev)
    fed = [sum(len(c) - 1 for c in cs) for _, cs in questions]
    n_c = max(fed)
    ctx = StaticInferenceContext(b, n_p + max(n_c, 1))
    first = _prefill(model, ctx, x, lengths, max_tokens)[:, :vocab_size]  # predicts each choice's first token
    scores = _token_logprobs(first[owner], torch.tensor([c[0] for c in conts], device=dev))
    if n_c == 0:
        return _per_question(scores.tolist(), questions)
    y, seg, slots, at = _choice_rows(questions, lengths, n_p, n_c, dev)
    ctx.materialize_only_last_token_logits = False
    for r0, r1 in _passes(fed, max_tokens):
        m = max(fed[r0:r1])
        if m == 0:
            continue
        rows, cols, nxt, choice = (torch.tensor(v, device=dev) for v in zip(*(a for a in at if r0 <= a[0] < r1)))
        ctx.batch_size_offset, ctx.sequence_len_offset = r0, n_p
        with _rotated_at(model, lambda S, s=slots[r0:r1]: s.t()[:S]), \
                _target_logprobs_at(model, rows - r0, cols, nxt, vocab_size):
            picked = model(y[r0:r1, :m], slots[r0:r1, n_p:n_p + m], _choice_mask(pad[r0:r1], seg[r0:r1, :m], n_p),
                           inference_context=ctx, runtime_gather_output=True)[0, :, 0]
        scores = scores.index_add(0, choice, picked)
    ctx.batch_size_offset = 0
    return _per_question(scores.tolist(), questions)


def _per_question(flat: List[float], questions) -> List[List[float]]:
    out, at = [], 0
    for _, cs in questions:
        out.append(flat[at:at + len(cs)])
        at += len(cs)
    return out


@torch.no_grad()
def choice_logprobs(model, questions: Sequence[Tuple[Sequence[int], Sequence[Sequence[int]]]],
                    vocab_size: int, batch_size: int = 16, progress: Optional[str] = None,
                    pass_tokens: int = PASS_TOKENS) -> List[List[float]]:
    """For each ``(prompt, continuations)``, the summed log-probability of every
    continuation given the prompt. Questions are sorted by prompt length and scored
    several at a time, at most ``batch_size`` continuations per batch, in forward passes
    of at most ``pass_tokens`` padded tokens (module docstring)."""
    _check_arguments(batch_size, pass_tokens)
    for qi, (prompt, conts) in enumerate(questions):
        if not prompt:
            raise ValueError(f"choice_logprobs: question {qi} has an empty prompt")
        for ci, c in enumerate(conts):
            if not c:
                raise ValueError(f"choice_logprobs: question {qi}, choice {ci} has no tokens")
    order = sorted(range(len(questions)), key=lambda q: -len(questions[q][0]))
    batches, size = [[]], 0
    for q in order:  # whole questions, at most batch_size continuations (one question may exceed it)
        k = len(questions[q][1])
        if batches[-1] and size + k > batch_size:
            batches.append([])
            size = 0
        batches[-1].append(q)
        size += k
    scores: List[List[float]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    try:
        with _inference(model):
            for k in _batches(len(batches) if order else 0, 1, progress):
                qs = batches[k]
                for q, s in zip(qs, _score_questions(model, [questions[q] for q in qs], vocab_size, pass_tokens)):
                    scores[q] = s
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
