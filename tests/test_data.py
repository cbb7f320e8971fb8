"""Tokenizers, SFT JSONL reading, prompt templates, tokenisation/truncation, collation
and the global/micro/data-parallel batch sampler."""
import hashlib
import json
import logging
import sys

import pytest
import sentencepiece as spm
import torch

from tiedlora.data.mini_tasks import TASKS, pretraining_corpus, write_task
from tiedlora.data.sft import (
    DataError,
    MicroBatchSampler,
    PromptTemplate,
    SFTDataset,
    collate,
    num_micro_batches,
    read_jsonl,
)
from tiedlora.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    train_sentencepiece,
)

SEED = 1234
CORPUS_LINES = 3000
SPM_VOCAB = 600
EOS = 1  # of the character tokenizer below


# ----------------------------------------------------------------------------- helpers


class CharTokenizer(Tokenizer):
    """One token per character (id = ord + 3); 0 pad, 1 eos, 2 bos. Exact to reason about."""

    def encode(self, text):
        return [ord(ch) + 3 for ch in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)

    vocab_size = property(lambda self: 259)
    eos_id = property(lambda self: EOS)
    bos_id = property(lambda self: 2)
    pad_id = property(lambda self: 0)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(pretraining_corpus(CORPUS_LINES, SEED), d / "tok", SPM_VOCAB)


# ----------------------------------------------------------------------------- tokenizers


def test_train_sentencepiece_is_byte_identical(tmp_path):
    texts = pretraining_corpus(CORPUS_LINES, SEED)
    digests = []
    for name in ("a", "b"):
        train_sentencepiece(texts, tmp_path / name / "tok", SPM_VOCAB)
        digests.append(hashlib.sha256((tmp_path / name / "tok.model").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / "tok.vocab").is_file()
    assert not list(tmp_path.glob("**/*.tmp")), "atomic write left a temp file behind"


def test_sentencepiece_special_ids_and_byte_fallback(spm_tok):
    assert (spm_tok.pad_id, spm_tok.bos_id, spm_tok.eos_id) == (0, 2, 3)
    assert spm_tok.vocab_size == SPM_VOCAB
    text = "Zoë sees 12 ☃ in Tovin."  # characters never seen in training -> bytes, not <unk>
    ids = spm_tok.encode(text)
    assert 1 not in ids  # unk
    assert spm_tok.decode(ids) == text
    # digits are split one per piece
    assert [spm_tok.id_to_piece(i) for i in spm_tok.encode("123")][-3:] == ["1", "2", "3"]
    # ids beyond the tokenizer (Megatron's padded vocabulary) are dropped
    assert spm_tok.decode(ids + [SPM_VOCAB, SPM_VOCAB + 77]) == text


def test_train_sentencepiece_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=200"):
        train_sentencepiece(["a b c"], tmp_path / "t", 200)
    with pytest.raises(ValueError, match="model_type='word'"):
        train_sentencepiece(["a b c"], tmp_path / "t", 300, model_type="word")
    with pytest.raises(ValueError, match="no non-empty text"):
        train_sentencepiece(["", "  "], tmp_path / "t", 300)


def test_sentencepiece_pad_falls_back_to_eos_and_bos_may_be_absent(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(pretraining_corpus(500, SEED)), model_prefix=str(tmp_path / "raw"),
        vocab_size=400, byte_fallback=True, pad_id=-1, bos_id=-1, unk_id=0, eos_id=1, num_threads=1,
        minloglevel=2,
    )
    tok = SentencePieceTokenizer(tmp_path / "raw.model")
    assert tok.bos_id is None
    assert tok.pad_id == tok.eos_id == 1


def test_build_tokenizer(spm_tok, tmp_path):
    tok = build_tokenizer("sentencepiece", spm_tok.model_file)
    assert isinstance(tok, SentencePieceTokenizer) and tok.encode("Mara") == spm_tok.encode("Mara")
    with pytest.raises(ValueError, match="'tiktoken'"):
        build_tokenizer("tiktoken", spm_tok.model_file)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("sentencepiece", tmp_path / "nope.model")


def test_hf_tokenizer_without_transformers_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="transformers"):
        HFTokenizer("some/tokenizer")


def test_hf_tokenizer_local(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "mara", "lives", "in", "tovin"]
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.decoder = tokenizers.decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = build_tokenizer("huggingface", tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("mara lives in tovin") == [3, 4, 5, 6]
    assert tok.decode([3, 4, 1, 99]) == "mara lives"  # EOS skipped, out-of-range id dropped
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (1, None, 1, len(words))


# ----------------------------------------------------------------------------- read_jsonl

GOOD = {"input": "q", "output": "a"}


def test_read_jsonl_reads_and_skips_blank_lines(tmp_path):
    mc = {"input": "q", "output": "b", "choices": ["a", "b"], "label": 1}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(mc)])
    assert read_jsonl(path) == [GOOD, mc]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"input": "q", "output": ', "bad JSON"),
        ('["q", "a"]', "expected a JSON object, got list"),
        ('{"input": "q"}', "missing key 'output'"),
        ('{"input": "q", "output": 3}', "key 'output' must be a string, got int"),
        ('{"input": "q", "output": "a", "choices": ["a", "b"], "label": 2}', "'label'=2 out of range"),
        ('{"input": "q", "output": "a", "choices": ["a", "b"], "label": true}', "'label' must be an integer"),
        ('{"input": "q", "output": "a", "choices": ["a", "b"], "label": 1}', "!= choices[1]"),
        ('{"input": "q", "output": "a", "choices": ["a"]}', "must appear together"),
        ('{"input": "q", "output": "a", "choices": [], "label": 0}', "non-empty list of strings"),
    ],
)
def test_read_jsonl_names_file_line_and_reason(tmp_path, line, reason):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert f"bad.jsonl:3: " in str(info.value)
    assert reason in str(info.value)
    assert info.value.errors[0][0] == 3 and isinstance(info.value, ValueError)


def test_read_jsonl_reports_every_bad_line_and_bad_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"input": "q"}\n\xff\xfe\n' + json.dumps(GOOD).encode() + b"\n[1]\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert [n for n, _ in info.value.errors] == [1, 2, 4]
    assert "not valid UTF-8" in info.value.errors[1][1]


def test_read_jsonl_custom_required_keys(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [{"input": "q", "output": "a"}])
    with pytest.raises(DataError, match="missing key 'context'"):
        read_jsonl(path, required=("context",))


def test_read_jsonl_empty_and_missing_files(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}.*no records"):
            read_jsonl(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- templates


def test_prompt_template_split_moves_trailing_space_to_answer():
    t = PromptTemplate("{input} Answer: {output}")
    assert t.split("Where?", "Tovin") == ("Where? Answer:", " Tovin")
    assert t.prompt("Where?") == "Where? Answer:"
    assert PromptTemplate().split("q", "a") == ("q", " a")
    assert PromptTemplate("{{{input}}}: {output}").split("q", "a") == ("{q}:", " a")
    assert PromptTemplate("{input}{output}").split("q {x}", "a") == ("q {x}", "a")


@pytest.mark.parametrize(
    "template",
    ["{input}", "{output}", "{output} {input}", "{input} {output} end", "{input} {input} {output}",
     "{input} {context} {output}", "{input!r} {output}", "{input:>5} {output}", "{input} {output",
     "{input} {{output}}", "Q: {} {output}"],
)
def test_prompt_template_rejects_bad_templates(template):
    with pytest.raises(ValueError, match="prompt template"):
        PromptTemplate(template)


# ----------------------------------------------------------------------------- SFTDataset


def test_sft_dataset_tokens_and_answer_only_mask(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [{"input": "ab", "output": "xyz"}])
    tok = CharTokenizer()
    ex = SFTDataset(path, tok, "{input}={output}", max_length=32)[0]
    ids = tok.encode("ab=") + tok.encode("xyz") + [EOS]
    assert ex["input_ids"] == ids
    assert ex["loss_mask"] == [0, 0, 0, 1, 1, 1, 1]
    assert ex["prompt_len"] == 3
    full = SFTDataset(path, tok, "{input}={output}", max_length=32, add_bos=True, answer_only_loss=False)[0]
    assert full["input_ids"] == [2] + ids
    assert full["loss_mask"] == [0] + [1] * len(ids)
    no_eos = SFTDataset(path, tok, "{input}={output}", max_length=32, add_eos=False)[0]
    assert no_eos["input_ids"] == ids[:-1]


def test_sft_dataset_split_tokenisation_matches_joint_sentencepiece(tmp_path, spm_tok):
    paths = write_task("mini_qa", tmp_path, n_train=20, n_val=1, n_test=1, seed=SEED)
    ds = SFTDataset(paths["train"], spm_tok, TASKS["mini_qa"].template, max_length=128)
    for rec, ex in zip(ds.records, ds):
        joint = spm_tok.encode(ds.prompts[ex["index"]] + " " + rec["output"])
        assert ex["input_ids"] == joint + [spm_tok.eos_id]


def test_sft_dataset_truncates_prompt_from_the_left_and_warns_once(tmp_path, caplog):
    records = [
        {"input": "0123456789", "output": "ab"},   # bos + 11 + 2 + eos = 15 > 8: prompt cut
        {"input": "p", "output": "abcdefghij"},    # answer + eos = 11 > 8: answer cut, no eos
        {"input": "p", "output": "a"},             # fits
    ]
    path = write_records(tmp_path / "long.jsonl", records)
    tok = CharTokenizer()
    with caplog.at_level(logging.WARNING, logger="tiedlora.data.sft"):
        ds = SFTDataset(path, tok, "{input}={output}", max_length=8, add_bos=True)
    assert ds.num_truncated == 2
    assert ds[0]["input_ids"] == [2] + tok.encode("789=ab") + [EOS]
    assert ds[0]["loss_mask"] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert ds[0]["prompt_len"] == 5
    assert ds[1]["input_ids"] == [2] + tok.encode("abcdefg")
    assert ds[1]["loss_mask"] == [0] + [1] * 7 and ds[1]["prompt_len"] == 1
    assert all(len(ex["input_ids"]) <= 8 for ex in ds)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "long.jsonl" in warnings[0].getMessage() and "2 of 3" in warnings[0].getMessage()


def test_sft_dataset_right_truncation_and_argument_checks(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [{"input": "0123456789", "output": "ab"}])
    tok = CharTokenizer()
    ds = SFTDataset(path, tok, "{input}={output}", max_length=6, truncation="right")
    assert ds[0]["input_ids"] == tok.encode("012345") and ds[0]["loss_mask"] == [0] * 6
    with pytest.raises(ValueError, match="truncation='middle'"):
        SFTDataset(path, tok, max_length=6, truncation="middle")
    with pytest.raises(ValueError, match="max_length=1"):
        SFTDataset(path, tok, max_length=1)
    with pytest.raises(ValueError, match="prompt template"):
        SFTDataset(path, tok, template="{input}", max_length=6)


# ----------------------------------------------------------------------------- collate


def test_collate_shifts_pads_and_masks():
    examples = [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10], "loss_mask": [0, 1]},
    ]
    b = collate(examples, pad_id=0, pad_to_multiple_of=4)
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids", "real_tokens"}
    assert b["tokens"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 8, 0], [10, 0, 0, 0]]
    torch.testing.assert_close(b["loss_mask"], torch.tensor([[0.0, 1, 1, 0], [1, 0, 0, 0]]), rtol=0, atol=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert b["real_tokens"] == 3 + 1
    assert b["tokens"].dtype == b["labels"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    assert collate(examples, pad_id=0)["tokens"].shape == (2, 8)
    assert collate(examples, pad_id=0, pad_to_multiple_of=None)["tokens"].shape == (2, 3)
    assert collate(examples, pad_id=0, pad_to_length=16)["tokens"].shape == (2, 16)
    with pytest.raises(ValueError, match="pad_to_length=2"):
        collate(examples, pad_id=0, pad_to_length=2)


def test_collate_supervises_exactly_the_answer_and_eos(tmp_path, spm_tok):
    spec = TASKS["mini_math"]
    paths = write_task("mini_math", tmp_path, n_train=8, n_val=1, n_test=1, seed=SEED)
    ds = SFTDataset(paths["train"], spm_tok, spec.template, max_length=128)
    b = collate([ds[i] for i in range(len(ds))], pad_id=spm_tok.pad_id)
    assert b["tokens"].shape[1] % 8 == 0
    for row, rec in enumerate(ds.records):
        target = b["labels"][row][b["loss_mask"][row] == 1].tolist()
        assert target[-1] == spm_tok.eos_id
        assert spm_tok.decode(target[:-1]) == rec["output"]


# ----------------------------------------------------------------------------- batching


def test_num_micro_batches():
    assert num_micro_batches(128, 4, 1) == 32
    assert num_micro_batches(128, 4, 2) == 16
    with pytest.raises(ValueError, match=r"global_batch_size=100 .* 8 \* 3 = 24"):
        num_micro_batches(100, 8, 3)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        num_micro_batches(8, 0, 1)


def take(sampler, k):
    return [next(sampler) for _ in range(k)]


def test_sampler_shapes_epochs_and_reshuffle():
    n, gbs, mbs = 50, 8, 2
    s = MicroBatchSampler(n, gbs, mbs, dp_rank=0, dp_size=1, seed=SEED)
    assert s.steps_per_epoch == 6 and s.num_micro_batches == 4
    steps = take(s, 12)
    assert all(len(step) == 4 and all(len(mb) == mbs for mb in step) for step in steps)
    epoch0 = [i for step in steps[:6] for mb in step for i in mb]
    epoch1 = [i for step in steps[6:] for mb in step for i in mb]
    assert len(set(epoch0)) == len(epoch0) == 48 and len(set(epoch1)) == 48
    assert epoch0 != epoch1  # reshuffled
    again = take(MicroBatchSampler(n, gbs, mbs, 0, 1, seed=SEED), 12)
    assert again == steps  # deterministic from (seed, epoch)
    assert take(MicroBatchSampler(n, gbs, mbs, 0, 1, seed=SEED + 1), 1) != steps[:1]
    ordered = take(MicroBatchSampler(n, gbs, mbs, 0, 1, seed=SEED, shuffle=False), 1)
    assert ordered == [[[0, 1], [2, 3], [4, 5], [6, 7]]]


def test_sampler_dp_ranks_together_see_the_dp1_step():
    n, gbs, mbs, dp = 64, 16, 2, 2
    single = take(MicroBatchSampler(n, gbs, mbs, 0, 1, seed=SEED), 10)
    ranks = [take(MicroBatchSampler(n, gbs, mbs, r, dp, seed=SEED), 10) for r in range(dp)]
    for step in range(10):
        want = sorted(i for mb in single[step] for i in mb)
        got = sorted(i for r in range(dp) for mb in ranks[r][step] for i in mb)
        assert got == want
        assert len(ranks[0][step]) == gbs // (mbs * dp)
        assert not set(i for mb in ranks[0][step] for i in mb) & set(i for mb in ranks[1][step] for i in mb)


@pytest.mark.parametrize("consumed", [0, 3, 7, 13])  # before, inside and across epoch ends (7 steps/epoch)
def test_sampler_resume_sees_the_same_remaining_batches(consumed):
    n, gbs, mbs, dp = 60, 8, 2, 2
    args = dict(num_examples=n, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=1, dp_size=dp, seed=SEED)
    uninterrupted = take(MicroBatchSampler(**args), consumed + 20)
    first = MicroBatchSampler(**args)
    take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint
    resumed = MicroBatchSampler(**args)
    resumed.load_state_dict(state)
    assert take(resumed, 20) == uninterrupted[consumed:]


def test_sampler_rejects_bad_arguments_and_foreign_state():
    with pytest.raises(ValueError, match="dp_rank=2"):
        MicroBatchSampler(64, 8, 2, dp_rank=2, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="num_examples=4"):
        MicroBatchSampler(4, 8, 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="not divisible"):
        MicroBatchSampler(64, 10, 4, 0, 1, seed=0)
    s = MicroBatchSampler(64, 8, 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="seed=1"):
        s.load_state_dict({**s.state_dict(), "seed": 1})
