"""Greedy generation with megatron's KV cache equals generation without it; scoring sanity."""

import pytest
import torch

from helpers import build, perturb, preset, tiny_model_cfg
from numerics import Net, assert_close, bound, forward_terms
from tiedlora.generate import continuation_logprobs, greedy_generate

VOCAB = 256


def test_cache_equals_no_cache(mp1):
    model = build(preset("tl6"))
    perturb(model, seed=2, scale=0.5)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 7, 5, 9, 3)]
    a = greedy_generate(model, prompts, 12, eos_id=-1, vocab_size=VOCAB, use_cache=True)
    b = greedy_generate(model, prompts, 12, eos_id=-1, vocab_size=VOCAB, use_cache=False)
    assert a == b and all(len(x) == 12 for x in a)
    # batching by length does not change a prompt's output
    single = greedy_generate(model, prompts[3:4], 12, eos_id=-1, vocab_size=VOCAB)
    assert single[0] == a[3]


def test_eos_stops_and_is_removed(mp1):
    model = build(preset("tl6"))
    prompts = [[1, 2, 3]]
    free = greedy_generate(model, prompts, 6, eos_id=-1, vocab_size=VOCAB)[0]
    stopped = greedy_generate(model, prompts, 6, eos_id=free[2], vocab_size=VOCAB)[0]
    assert stopped == free[:free.index(free[2])]


@pytest.mark.numerics
def test_continuation_logprobs_match_manual(mp1):
    model = build(preset("tl6"))
    perturb(model, seed=2, scale=0.5)  # logits that differ by position: an off-by-one shows
    model.eval()
    prompt, conts = [5, 6, 7], [[8], [9, 10]]
    scores = continuation_logprobs(model, prompt, conts, VOCAB)
    with torch.no_grad():
        x = torch.tensor([prompt + [9, 10]])
        logits = model(x, torch.arange(5).unsqueeze(0), None)[0, :, :VOCAB]
        logp = torch.log_softmax(logits, -1)
    # the forward pass (relative to the logits' size, two positions), then the log-softmax
    # over the vocabulary and the sum of two log-probabilities (relative to their size)
    net = Net.of(tiny_model_cfg(), seq=x.shape[1], rank=8)
    assert_close(torch.tensor(scores[1]), logp[2, 9] + logp[3, 10], net.vocab + 2, "continuation log-probability",
                 inherited=2 * bound(logits, forward_terms(net)))
