"""The embedded CPU tasks: determinism, disjoint splits, validity, gold = perfect score,
and a pretraining corpus that teaches the world but never a task instance or format."""
import operator
import re

import pytest

from tiedlora.data.mini_tasks import (
    ANIMALS,
    FORMAT_MARKERS,
    MAX_CHARS,
    TASKS,
    VELAN,
    WORLD,
    pretraining_corpus,
    write_task,
)
from tiedlora.data.sft import PromptTemplate, read_jsonl
from tiedlora.data.tokenizers import train_sentencepiece
from tiedlora.metrics import compute_metrics, gsm8k_extract

SEED = 7
N_TRAIN, N_VAL, N_TEST = 300, 60, 60
CORPUS_LINES = 20000
SPM_VOCAB = 1000
MAX_TOKENS = 60  # prompt + answer + EOS, with the 1000-piece corpus tokenizer

ALL_TASKS = sorted(TASKS)
ENGLISH = {v: k for k, v in VELAN.items()}
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.fixture(scope="module")
def corpus():
    return pretraining_corpus(CORPUS_LINES, SEED)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """{task: {split: records}} written by write_task and read back by read_jsonl."""
    out = {}
    for name in ALL_TASKS:
        paths = write_task(name, tmp_path_factory.mktemp(name), N_TRAIN, N_VAL, N_TEST, SEED)
        out[name] = {split: read_jsonl(path) for split, path in paths.items()}
    return out


@pytest.mark.parametrize("name", ALL_TASKS)
def test_write_task_is_deterministic_and_atomic(tmp_path, name):
    a = write_task(name, tmp_path / "a", 40, 10, 10, SEED)
    b = write_task(name, tmp_path / "b", 40, 10, 10, SEED)
    assert set(a) == {"train", "validation", "test"}
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
    c = write_task(name, tmp_path / "c", 40, 10, 10, SEED + 1)
    assert c["train"].read_bytes() != a["train"].read_bytes()
    # the test split does not depend on how much training data is drawn
    d = write_task(name, tmp_path / "d", 80, 10, 10, SEED)
    assert d["test"].read_bytes() == a["test"].read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]


def test_write_task_rejects_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="'mini_chess'"):
        write_task("mini_chess", tmp_path)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_splits_sizes_unique_and_disjoint(splits, name):
    s = splits[name]
    assert [len(s[k]) for k in ("train", "validation", "test")] == [N_TRAIN, N_VAL, N_TEST]
    inputs = {k: [r["input"] for r in recs] for k, recs in s.items()}
    for k in inputs:
        assert len(set(inputs[k])) == len(inputs[k]), f"duplicates inside {k}"
    assert not set(inputs["train"]) & set(inputs["validation"])
    assert not set(inputs["train"]) & set(inputs["test"])
    assert not set(inputs["validation"]) & set(inputs["test"])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_gold_outputs_score_perfectly(splits, name):
    recs = splits[name]["test"]
    outputs = [r["output"] for r in recs]
    scores = compute_metrics(TASKS[name].metric, outputs, outputs)
    assert scores and all(v == pytest.approx(100.0) for v in scores.values()), scores


@pytest.mark.parametrize("name", ALL_TASKS)
def test_templates_are_valid_and_examples_short(splits, name):
    PromptTemplate(TASKS[name].template)
    assert TASKS[name].max_new_tokens > 0
    for r in splits[name]["train"]:
        assert len(r["input"]) + len(r["output"]) <= MAX_CHARS
        assert "\n" not in r["input"] + r["output"]


def test_qa_answer_is_a_span_of_the_context(splits):
    for r in splits["mini_qa"]["train"]:
        context = re.match(r"Context: (.*) Question: ", r["input"]).group(1)
        assert r["output"] in context


def test_mc_label_and_choices(splits):
    recs = splits["mini_mc"]["train"]
    for r in recs:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["output"] == r["choices"][r["label"]]
        assert r["input"].endswith("Endings: " + "; ".join(r["choices"]))
        story = r["input"]
        if "took the train home to" in story:  # world knowledge: where the person lives
            person = story.split("After work, ")[1].split(" took")[0]
            assert r["output"] == WORLD[person].city
        if "next door" in story:
            animal = story.split("the ")[1].split(" next door")[0]
            assert r["output"] == f"{ANIMALS[animal]} loudly"
    assert {r["label"] for r in recs} == {0, 1, 2, 3}


def test_translation_is_word_by_word(splits):
    for r in splits["mini_translate"]["train"]:
        words = r["input"].removeprefix("Velan: ").rstrip(".").split()
        english = [ENGLISH.get(w.lower(), w) for w in words]
        english = ["an" if w == "a" and nxt[0] in "aeiou" else w for w, nxt in zip(english, english[1:] + ["."])]
        assert r["output"].lower() == (" ".join(english) + ".").lower()


def test_math_work_is_correct(splits):
    for r in splits["mini_math"]["train"]:
        work, answer = r["output"].split(" #### ")
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", work):
            assert OPS[op](int(a), int(b)) == int(c)
        assert gsm8k_extract(r["output"]) == answer == c


def test_summary_mentions_the_speakers(splits):
    for r in splits["mini_sum"]["train"]:
        speakers = set(re.findall(r"(\w+): ", r["input"].removeprefix("Dialogue: ")))
        assert 2 <= len(re.findall(r"\w+: ", r["input"].removeprefix("Dialogue: "))) <= 4
        assert sum(s in r["output"] for s in speakers) >= 1


def test_corpus_is_deterministic_and_free_of_task_formats(corpus):
    assert pretraining_corpus(200, SEED) == corpus[:200]
    assert pretraining_corpus(200, SEED + 1) != corpus[:200]
    text = "\n".join(corpus)
    for marker in FORMAT_MARKERS:
        assert marker not in text, marker


def test_corpus_contains_no_task_instance(corpus, splits):
    text = "\n".join(corpus)
    lines = set(corpus)
    for name, by_split in splits.items():
        for recs in by_split.values():
            for r in recs:
                body = r["input"].split(": ", 1)[1] if name != "mini_math" else r["input"]
                assert body not in text, (name, body)
                if name in ("mini_translate", "mini_sum", "mini_math"):
                    assert r["output"] not in lines, (name, r["output"])
                if name == "mini_translate":
                    assert r["output"] not in text, r["output"]


def test_corpus_covers_every_character_and_teaches_the_world(corpus, splits):
    chars = set("".join(corpus))
    for name, by_split in splits.items():
        template = TASKS[name].template.replace("{input}", "").replace("{output}", "")
        used = set(template) | {ch for r in by_split["train"] for ch in r["input"] + r["output"]}
        assert used <= chars, (name, used - chars)
    lines = set(corpus)
    for p in WORLD.values():
        assert f"{p.name} lives in {p.city}." in lines
    for en, ve in VELAN.items():
        assert f"In Velan, {ve} means {en}." in lines or f"The Velan word for {en} is {ve}." in lines


def test_examples_fit_in_60_tokens_of_a_1000_piece_vocab(tmp_path, corpus, splits):
    tok = train_sentencepiece(corpus, tmp_path / "tok", SPM_VOCAB)
    for name, by_split in splits.items():
        template = PromptTemplate(TASKS[name].template)
        for r in by_split["train"]:
            prompt, answer = template.split(r["input"], r["output"])
            n = len(tok.encode(prompt)) + len(tok.encode(answer)) + 1
            assert n < MAX_TOKENS, (name, n, r)
            assert len(tok.encode(answer)) + 1 <= TASKS[name].max_new_tokens, (name, r["output"])
