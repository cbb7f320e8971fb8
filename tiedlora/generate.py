"""Greedy generation (with megatron-core's key/value cache) and log-likelihood scoring.

Both run on one pipeline stage (PP=1) at any TP size: logits are gathered over the
tensor-parallel group (``runtime_gather_output``), so every TP rank computes the same
tokens. Prompts of equal length are batched together (megatron's static KV cache keeps
one sequence offset per batch, and equal lengths need no padding mask).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from tiedlora import compat


def _positions(b: int, start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device).unsqueeze(0).expand(b, -1)


def _check_single_stage():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError(
            "generation and log-likelihood scoring run with parallel.pp=1; adapter checkpoints "
            "are layout-independent, so evaluate with: python -m tiedlora.evaluate ... parallel.pp=1")


@torch.no_grad()
def _greedy_batch(model, prompts: torch.Tensor, max_new_tokens: int, eos_id: int,
                  vocab_size: int, use_cache: bool) -> List[List[int]]:
    from megatron.core.inference.contexts import StaticInferenceContext

    b, n = prompts.shape
    dev = prompts.device
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    out = [[] for _ in range(b)]
    ctx = StaticInferenceContext(b, n + max_new_tokens) if use_cache else None
    seq = prompts
    logits = model(prompts, _positions(b, 0, n, dev), None, inference_context=ctx,
                   runtime_gather_output=True)
    for step in range(max_new_tokens):
        nxt = logits[:, -1, :vocab_size].argmax(-1)
        for i in range(b):
            if not done[i]:
                if nxt[i].item() == eos_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        if use_cache:
            ctx.sequence_len_offset = seq.shape[1] - 1
            logits = model(nxt.unsqueeze(1), _positions(b, seq.shape[1] - 1, 1, dev), None,
                           inference_context=ctx, runtime_gather_output=True)
        else:
            logits = model(seq, _positions(b, 0, seq.shape[1], dev), None,
                           runtime_gather_output=True)
    return out


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                    vocab_size: int, batch_size: int = 16, use_cache: bool = True) -> List[List[int]]:
    """Greedy continuation of each prompt (EOS and anything after it removed)."""
    _check_single_stage()
    was_training = model.training
    model.eval()
    dev = compat.default_device()
    by_len: Dict[int, List[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    results: List[List[int]] = [[] for _ in prompts]
    for length in sorted(by_len):
        idx = by_len[length]
        for k in range(0, len(idx), batch_size):
            chunk = idx[k:k + batch_size]
            x = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=dev)
            for i, toks in zip(chunk, _greedy_batch(model, x, max_new_tokens, eos_id, vocab_size, use_cache)):
                results[i] = toks
    model.train(was_training)
    return results


@torch.no_grad()
def continuation_logprobs(model, prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                          vocab_size: int) -> List[float]:
    """Sum of log-probabilities of each continuation given the prompt (one batch)."""
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
