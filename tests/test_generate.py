"""Greedy generation and log-likelihood scoring.

The references are per prompt and per question: a prompt decoded in a batch of prompts of
other lengths (left-padded, masked, rotated from its first real token) must produce the
tokens it produces when decoded alone, for every preset, on the shipped mini base and on a
converted Hugging Face LLaMA (whose own ``generate`` is the oracle there); multiple-choice
scores of several questions per forward pass must equal one question per pass within the
fp32 rounding bound. Both checks are shown to fail with the padding mask removed and with
positions counted physically (as megatron's rotary table does).
"""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from convert_fixtures import LLAMA, make_llama  # noqa: E402
from helpers import PRESETS, build, perturb, preset, tiny_model_cfg  # noqa: E402
from numerics import Net, assert_close, bound, forward_terms  # noqa: E402

from tiedlora import generate  # noqa: E402
from tiedlora.config import ParallelConfig, compose, to_object  # noqa: E402
from tiedlora.generate import choice_logprobs, continuation_logprobs, greedy_generate  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402

VOCAB = 256
LENGTHS = (3, 40, 11, 26, 7, 19, 33, 15, 1, 22)  # mixed lengths, batches of 4 (the last holds 2)
NEW_TOKENS = 10
BATCH = 4
ABSOLUTE = tiny_model_cfg(position_embedding_type="learned_absolute")


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, mp1):
    """name -> (build(preset) -> adapted model with perturbed adapters, vocabulary size):
    the shipped mini base and a converted LLaMA (both rotary), and a tiny random GPT with
    learned absolute positions."""
    from tiedlora.build import build_model, resolve_base
    from tiedlora.convert import load_base_checkpoint, model_config_from_checkpoint
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import apply_peft

    mini = _mini_cfg()
    weights, _ = resolve_base(mini)
    path = tmp_path_factory.mktemp("llama") / "gqa"
    make_llama(2, seed=3).save_pretrained(path)
    llama = model_config_from_checkpoint(path)

    def adapted(model, name):  # a base model (no adapters yet)
        apply_peft(model, preset(name))
        perturb(model, seed=5, scale=0.3)
        return model

    def perturb_(model):
        perturb(model, seed=5, scale=0.3)
        return model

    def llama_model(name):
        model = build_gpt_model(llama)
        load_base_checkpoint([model], llama, ParallelConfig())
        return adapted(model, name)

    return {
        "mini": (lambda name: perturb_(build_model(mini, preset(name), ParallelConfig(), weights)[0]),
                 mini.vocab_size),
        "llama": (llama_model, LLAMA["vocab_size"]),
        "absolute": (lambda name: adapted(build_gpt_model(ABSOLUTE), name), VOCAB),
        "llama_path": path,
    }


def _mini_cfg():
    return to_object(compose("finetune", ["model=mini"])).model


def _alone(model, prompts, vocab, **kw):
    return [greedy_generate(model, [p], NEW_TOKENS, vocab_size=vocab, **kw)[0] for p in prompts]


def _padded_rows(prompts):
    """Prompts that get left padding in greedy_generate's batches (shorter than the longest
    of their batch), and those that get none."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    padded, whole = [], []
    for k in range(0, len(order), BATCH):
        chunk = order[k:k + BATCH]
        for i in chunk:
            (padded if len(prompts[i]) < len(prompts[chunk[0]]) else whole).append(i)
    return padded, whole


@pytest.mark.parametrize("base, name", [(b, n) for b in ("mini", "llama") for n in PRESETS]
                         + [("absolute", n) for n in ("lora", "vera", "tl6")])
def test_mixed_length_batches_decode_like_each_prompt_alone(bases, base, name):
    make, vocab = bases[base]
    model = make(name)
    prompts = _prompts(vocab)
    batched = greedy_generate(model, prompts, NEW_TOKENS, eos_id=-1, vocab_size=vocab, batch_size=BATCH)
    alone = _alone(model, prompts, vocab, eos_id=-1)
    assert all(len(t) == NEW_TOKENS for t in batched)
    assert batched == alone
    assert len({tuple(t) for t in alone}) > len(prompts) // 2, "outputs barely depend on the prompt"


@pytest.mark.parametrize("base, name", [(b, n) for b in ("mini", "llama", "absolute") for n in ("lora", "vera", "tl6")])
def test_prompts_prefilled_in_several_passes_decode_like_each_prompt_alone(bases, base, name, monkeypatch):
    """With ``pass_tokens`` small, each batch's prompts run into the KV cache in several
    passes (single rows and padded groups, each written at its own offset): every prompt
    still decodes what it decodes alone, and without the padding mask (the cache positions
    a pass never writes become visible) the padded prompts do not. The cache is allocated
    NaN-filled here, as uninitialised memory may be: the positions never written must not
    reach the output."""
    from megatron.core.transformer.attention import Attention

    make, vocab = bases[base]
    model = make(name)
    allocate = Attention._allocate_memory
    monkeypatch.setattr(Attention, "_allocate_memory", lambda self, *a: allocate(self, *a).fill_(float("nan")))
    prompts = _prompts(vocab)
    split = []
    real_passes = generate._passes
    monkeypatch.setattr(generate, "_passes", lambda lengths, cap: split.append(real_passes(lengths, cap)) or split[-1])
    batched = greedy_generate(model, prompts, NEW_TOKENS, eos_id=-1, vocab_size=vocab, batch_size=BATCH,
                              pass_tokens=50)
    assert any(len(p) > 1 for p in split) and any(r1 - r0 > 1 for p in split for r0, r1 in p), split
    assert batched == _alone(model, prompts, vocab, eos_id=-1)
    padded, _ = _padded_rows(prompts)
    monkeypatch.setattr(generate, "left_padding_mask", _causal_only)
    broken = greedy_generate(model, prompts, NEW_TOKENS, eos_id=-1, vocab_size=vocab, batch_size=BATCH,
                             pass_tokens=50)
    assert sum(broken[i] != batched[i] for i in padded) >= len(padded) // 2


def test_passes_are_the_cheapest_split_within_the_cap():
    """The split equals the best of every contiguous split by brute force (padded tokens
    plus PASS_COST per pass, no pass over the cap unless it holds one row)."""
    import itertools

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 9, (1,), generator=g))
        lengths = sorted(torch.randint(1, 300, (n,), generator=g).tolist(), reverse=trial % 3 != 0)
        cap = int(torch.randint(1, 1200, (1,), generator=g))

        def cost(ranges):
            sizes = [(r1 - r0) * max(lengths[r0:r1]) for r0, r1 in ranges]
            if any(t > cap and r1 - r0 > 1 for t, (r0, r1) in zip(sizes, ranges)):
                return float("inf")
            return sum(sizes) + generate.PASS_COST * len(ranges)

        best = min(cost(list(zip((0,) + cuts, cuts + (n,))))
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        got = generate._passes(lengths, cap)
        assert [r for p in got for r in range(*p)] == list(range(n))
        assert cost(got) == best, (lengths, cap, got)
    assert generate._passes([5000, 10, 9], 1024) == [(0, 1), (1, 3)]  # a row over the cap runs alone


def _causal_only(pad, sq, sk):
    """The padding mask with the padding left visible: causal only."""
    a = torch.arange(sk - sq, sk).view(1, sq, 1)
    return (torch.arange(sk).view(1, 1, sk) > a).unsqueeze(1).expand(len(pad), 1, sq, sk)


def _physical(pad, start, count):
    """Positions by padded index, as megatron counts them (the first real token of a
    padded row is not at 0)."""
    return torch.arange(start, start + count).unsqueeze(0).expand(len(pad), -1)


@pytest.mark.parametrize("base", ["mini", "llama", "absolute"])
def test_the_comparison_fails_without_the_mask_or_with_physical_positions(bases, base, monkeypatch):
    """The equality above has teeth: a batch that sees its padding decodes other tokens for
    the padded prompts than they get alone, and so does a model with absolute positions that
    counts them from the start of the padding. (Rotary attention depends only on differences
    of positions, so there a constant shift per row changes rounding, not the mathematics;
    the per-row rotary table makes a padded row's rotations bit-identical to its own.)"""
    make, vocab = bases[base]
    model = make("tl6")
    prompts = _prompts(vocab)
    alone = _alone(model, prompts, vocab, eos_id=-1)
    padded, whole = _padded_rows(prompts)
    assert len(padded) >= 6

    def decode():
        return greedy_generate(model, prompts, NEW_TOKENS, eos_id=-1, vocab_size=vocab, batch_size=BATCH)

    broken = {}
    with monkeypatch.context() as m:
        m.setattr(generate, "left_padding_mask", _causal_only)
        broken["mask removed"] = decode()
    if base == "absolute":
        with monkeypatch.context() as m:
            m.setattr(generate, "_row_positions", _physical)
            broken["physical positions"] = decode()
    for what, got in broken.items():
        assert sum(got[i] != alone[i] for i in padded) >= len(padded) // 2, what
        assert all(got[i] == alone[i] for i in whole), what  # rows without padding are unaffected


def test_row_rotary_table_is_the_table_shifted_per_row(mp1):
    """Row t of sequence i of the per-row rotary table is row t - pad[i] of megatron's own
    (bit for bit; the padding rows repeat position 0)."""
    model = build_gpt_model(tiny_model_cfg())
    inner = model.rotary_pos_emb
    pad = torch.tensor([0, 3, 7])
    with generate._left_padded(model, pad):
        table = model.rotary_pos_emb(20)
        assert model.rotary_pos_emb.get_rotary_seq_len(None, None, torch.zeros(20, 1, 1), model.config) == 20
    assert model.rotary_pos_emb is inner  # restored
    ref = inner(20)  # [20, 1, 1, d]
    assert table.shape == (20, 3, 1, ref.shape[-1])
    for i, p in enumerate(pad.tolist()):
        assert torch.equal(table[p:, i, 0], ref[:20 - p, 0, 0])
        assert torch.equal(table[:p, i, 0], ref[:1, 0, 0].expand(p, -1))


class _MaskBlind(torch.nn.Module):
    """A core attention that follows its mask type and ignores the mask it is given (as
    transformer-engine's fused attention does under a causal type)."""

    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, query, key, value, attention_mask, **kw):
        return self.core(query, key, value, None, **kw)


def test_cores_that_ignore_the_mask_are_replaced_while_decoding(mp1, monkeypatch):
    model = build(preset("tl6"))
    perturb(model, seed=2, scale=0.5)
    prompts = _prompts(VOCAB)
    alone = _alone(model, prompts, VOCAB, eos_id=-1)
    attentions = [m for m in model.modules() if hasattr(m, "core_attention")]
    blind = [_MaskBlind(a.core_attention) for a in attentions]
    for a, c in zip(attentions, blind):
        a.core_attention = c

    def decode():
        return greedy_generate(model, prompts, NEW_TOKENS, eos_id=-1, vocab_size=VOCAB, batch_size=BATCH)

    assert decode() == alone  # the blind cores are swapped out for the duration ...
    assert [a.core_attention for a in attentions] == blind  # ... and put back
    with monkeypatch.context() as m:  # left in place, they decode the padded prompts wrongly
        m.setattr(generate, "mask_honouring_cores", lambda model: contextlib.nullcontext())
        wrong = decode()
    padded, _ = _padded_rows(prompts)
    assert sum(wrong[i] != alone[i] for i in padded) >= len(padded) // 2


def test_llama_batches_match_transformers_generate(bases, mp1):
    """The converted LLaMA (no adapter) decodes what transformers' own greedy generate gives
    each prompt alone."""
    from tiedlora.convert import load_base_checkpoint, model_config_from_checkpoint
    from tiedlora.models.gpt import build_gpt_model
    from transformers import LlamaForCausalLM

    path = bases["llama_path"]
    cfg = model_config_from_checkpoint(path)
    model = build_gpt_model(cfg)
    load_base_checkpoint([model], cfg, ParallelConfig())
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    prompts = _prompts(LLAMA["vocab_size"])
    ours = greedy_generate(model, prompts, NEW_TOKENS, eos_id=-1, vocab_size=LLAMA["vocab_size"], batch_size=BATCH)
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert ours == ref


def test_cache_equals_no_cache(mp1):
    model = build(preset("tl6"))
    perturb(model, seed=2, scale=0.5)
    prompts = _prompts(VOCAB, (5, 7, 5, 9, 3))
    a = greedy_generate(model, prompts, 12, eos_id=-1, vocab_size=VOCAB, batch_size=3, use_cache=True)
    b = greedy_generate(model, prompts, 12, eos_id=-1, vocab_size=VOCAB, batch_size=3, use_cache=False)
    assert a == b and all(len(x) == 12 for x in a)


def test_eos_per_row_neither_stops_the_batch_early_nor_runs_it_long(mp1):
    """Rows stop at their own EOS; the batch runs until its last row has stopped, no longer."""
    model = build(preset("tl6"))
    perturb(model, seed=2, scale=0.5)
    for seed in range(100):  # prompts whose free outputs share a token, first met at different steps
        prompts = _prompts(VOCAB, (6, 14, 9), seed=seed)
        free = greedy_generate(model, prompts, 12, eos_id=-1, vocab_size=VOCAB, batch_size=4)
        common = set(free[0][:10]).intersection(*(r[:10] for r in free[1:]))
        spread = {t: [r.index(t) for r in free] for t in common}
        spread = {t: st for t, st in spread.items() if len(set(st)) == len(st)}
        if spread:
            break
    eos, stops = min(spread.items())
    assert max(stops) < 11 and min(stops) < max(stops)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = greedy_generate(model, prompts, 12, eos_id=eos, vocab_size=VOCAB, batch_size=4)
    finally:
        handle.remove()
    assert got == [row[:s] for row, s in zip(free, stops)]
    # prefill + one pass per further token, up to the step where the last row emits EOS
    assert len(calls) == max(stops) + 1


def test_bad_arguments(mp1):
    model = build(preset("tl6"))
    with pytest.raises(ValueError, match="batch_size=0"):
        greedy_generate(model, [[1]], 2, eos_id=-1, vocab_size=VOCAB, batch_size=0)
    with pytest.raises(ValueError, match="pass_tokens=0"):
        choice_logprobs(model, [([1], [[2]])], VOCAB, pass_tokens=0)
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_generate(model, [[1], []], 2, eos_id=-1, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="question 1, choice 0 has no tokens"):
        choice_logprobs(model, [([1], [[2]]), ([1], [[]])], VOCAB)


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


@pytest.mark.numerics
@pytest.mark.parametrize("base, batch_size, pass_tokens", [("mini", 5, 1024), ("mini", 16, 1024), ("mini", 16, 12),
                                                        ("llama", 16, 12), ("absolute", 16, 12)])
def test_choices_batched_equal_one_question_per_pass(bases, base, batch_size, pass_tokens, monkeypatch):
    """Several questions per forward pass (sorted by prompt length; each question's choices
    side by side in one row over its cached prompt) score every choice as one question per
    pass does, within the fp32 bound: both sides run the same
    model on other batch shapes, so each logit differs by at most the forward pass's bound
    (relative to the largest logit); a log-probability z_t - logsumexp(z) moves by at most
    twice that, and a choice's score sums len(c) of them (plus the log-softmax's and the
    sum's own rounding, relative to the score)."""
    make, vocab = bases[base]
    model = make("tl6")
    g = torch.Generator().manual_seed(9)
    questions = []
    for n, k in zip((12, 3, 30, 7, 21, 16), (4, 4, 2, 4, 5, 4)):
        prompt = torch.randint(0, vocab, (n,), generator=g).tolist()
        conts = [torch.randint(0, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(k)]
        questions.append((prompt, conts))
    questions.append(([5, 9, 2], [[7], [8], [11]]))  # single-token choices only: no pass over the choices
    assert sum(len(cs) for _, cs in questions) > batch_size  # several batches, several questions each
    split = []
    real_passes = generate._passes
    monkeypatch.setattr(generate, "_passes", lambda lengths, cap: split.append(real_passes(lengths, cap)) or split[-1])
    if pass_tokens < 20:  # prompts and choices each in several passes, logits a few positions at a time
        monkeypatch.setattr(generate, "LOGIT_ELEMENTS", 3 * vocab)
    got = choice_logprobs(model, questions, vocab, batch_size=batch_size, pass_tokens=pass_tokens)
    if pass_tokens < 20:
        assert sum(len(p) > 1 for p in split) >= 4, split
    longest = max(len(p) + len(c) for p, cs in questions for c in cs)
    from tiedlora.convert import model_config_from_checkpoint

    cfg = {"mini": _mini_cfg, "absolute": lambda: ABSOLUTE,
           "llama": lambda: model_config_from_checkpoint(bases["llama_path"])}[base]()
    net = Net.of(cfg, seq=longest, rank=8)
    for (prompt, conts), scores in zip(questions, got):
        ref = continuation_logprobs(model, prompt, conts, vocab)
        logits = _logits(model, [prompt + c for c in conts])
        for c, s, r in zip(conts, scores, ref):
            assert_close(torch.tensor(s), torch.tensor(r), net.vocab + len(c),
                         f"question of {len(prompt)} tokens, choice of {len(c)} (batch {batch_size})",
                         inherited=2 * len(c) * bound(logits, forward_terms(net)))


@pytest.mark.numerics
@pytest.mark.parametrize("plant", ["choices see each other", "positions run on"])
def test_the_choice_comparison_fails_when_a_row_of_choices_is_wrong(bases, plant, monkeypatch):
    """The equality above has teeth where the choices of a question share a row: a choice
    that attends to the choices before it in its row, or whose positions run on from them
    instead of starting at its prompt's end, scores otherwise than alone. A row's first
    choice is unaffected by either."""
    make, vocab = bases["mini"]
    model = make("tl6")
    g = torch.Generator().manual_seed(4)
    questions = [(torch.randint(0, vocab, (n,), generator=g).tolist(),
                  [torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(4)]) for n in (9, 17, 5, 12)]
    with monkeypatch.context() as m:
        if plant == "choices see each other":
            real_mask = generate._choice_mask
            m.setattr(generate, "_choice_mask", lambda pad, seg, n_p: real_mask(pad, seg.clamp(max=0), n_p))
        else:
            real_rows = generate._choice_rows

            def run_on(questions, lengths, n_p, n_c, dev):
                y, seg, slots, at = real_rows(questions, lengths, n_p, n_c, dev)
                for q, (_, cs) in enumerate(questions):
                    k = sum(len(c) - 1 for c in cs)
                    slots[q, n_p:n_p + k] = torch.arange(lengths[q], lengths[q] + k)
                return y, seg, slots, at

            m.setattr(generate, "_choice_rows", run_on)
        got = choice_logprobs(model, questions, vocab, batch_size=16)
    net = Net.of(_mini_cfg(), seq=40, rank=8)
    moved = []
    for (prompt, conts), scores in zip(questions, got):
        ref = continuation_logprobs(model, prompt, conts, vocab)
        logits = _logits(model, [prompt + c for c in conts])
        for j, (c, s, r) in enumerate(zip(conts, scores, ref)):
            try:
                assert_close(torch.tensor(s), torch.tensor(r), net.vocab + len(c), "score",
                             inherited=2 * len(c) * bound(logits, forward_terms(net)))
            except AssertionError:
                moved.append(j)
    assert 0 not in moved, moved
    assert len(moved) == 12, moved  # every later choice of every row (each has 2 or more tokens)


def _logits(model, seqs):
    s = max(len(x) for x in seqs)
    tokens = torch.tensor([x + [0] * (s - len(x)) for x in seqs])
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand(len(seqs), s), None)
