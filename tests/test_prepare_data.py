"""``python -m tiedlora.prepare_data``: the five converters on fixture files written here in
each dataset's real hub schema (column names and nesting as published), in JSON Lines
(standard library), CSV (DialogSum's hub format), Parquet and Arrow (``datasets``), and
the five prepared tasks fine-tuned for two steps and evaluated on the tiny base.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, tiny_base_args
from tiedlora.data.sft import read_jsonl
from tiedlora.prepare_data import PrepareConfig, available_tasks, load_converter, prepare
from tiedlora.prepare_data._common import ConversionError, Holdout, holdout, write_splits

TASKS = ["squad", "dialogsum", "hellaswag", "iwslt2017_de_en", "gsm8k"]
VAL_SIZE = 3  # fixture holdouts (squad: whole articles, so possibly more)
METRIC_KEYS = {"squad": "exact_match", "dialogsum": "rougeL", "hellaswag": "accuracy",
               "iwslt2017_de_en": "bleu", "gsm8k": "gsm8k_accuracy"}


# ------------------------------------------------------------------ fixture rows (hub schema)
def _squad(split):
    rows = []
    for a, (title, place) in enumerate([("Tovin", "the harbour"), ("Marrow", "the hills"),
                                        ("Eskel", "the river"), ("Brindle", "the market")]):
        context = f" {title} is a city near {place}. It was founded in 1{a}02 by Mara and Oren. "
        for q, (question, answer) in enumerate([(f"Where is {title}?", place),
                                                (f"Who founded {title}?", "Mara and Oren"),
                                                (f"When was {title} founded?", f"1{a}02")]):
            texts = [answer] if split == "train" else [answer, answer, answer.replace("the ", "")]
            rows.append({"id": f"{split[:2]}{a}{q:02d}", "title": title, "context": context,
                         "question": question + " ", "answers": {"text": texts,
                                                                 "answer_start": [context.index(answer)] * len(texts)}})
    return rows


def _dialogsum(split):
    n = {"train": 8, "validation": 3, "test": 3}[split]
    return [{"id": f"{split}_{i}",
             "dialogue": f"#Person1#: Hello, is the {i}th train late?\n#Person2#: Yes, by {i + 2} minutes.",
             "summary": f"#Person2# tells #Person1# the {i}th train is {i + 2} minutes late.",
             "topic": "train delay"} for i in range(n)]


def _hellaswag(split):
    n = {"train": 10, "validation": 4, "test": 3}[split]
    rows = []
    for i in range(n):
        wikihow = i % 2 == 0
        rows.append({
            "ind": 100 * len(split) + i,
            "activity_label": "Cleaning windows" if wikihow else "Playing drums",
            "ctx_a": "[header] How to clean windows [title] Get a cloth." if wikihow else f"A man sits at drum kit {i}.",
            "ctx_b": "" if wikihow else "he",
            "ctx": "unused",
            "endings": [f"[step] Wipe the glass {i} times.", "starts to sing.", f"drops the sticks {i}.",
                        "walks  away."],
            "source_id": f"wikihow~{i // 2}" if wikihow else f"activitynet~v_{i // 2}",
            "split": split, "split_type": "indomain",
            "label": "" if split == "test" else str(i % 4),
        })
    return rows


def _iwslt(split):
    n = {"train": 8, "validation": 3, "test": 3}[split]
    return [{"translation": {"de": f"Das ist Satz Nummer {i} über Bäume.", "en": f"This is sentence number {i} about trees."}}
            for i in range(n)]


def _gsm8k(split, config="main"):
    n = {"train": 9, "test": 3}[split]
    note = "Let's think step by step. " if config == "socratic" else ""
    return [{"question": f"Mara has {i} apples and buys {i + 3} more. How many apples does she have?",
             "answer": f"{note}She has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3}"}
            for i in range(n)]


# The files of each task as the hub lays them out: relative path (without suffix) -> rows.
FIXTURES = {
    "squad": {"plain_text/train-00000-of-00001": _squad("train"),
              "plain_text/validation-00000-of-00001": _squad("validation")},
    "dialogsum": {s: _dialogsum(s) for s in ("train", "validation", "test")},
    "hellaswag": {f"data/{s}-00000-of-00001": _hellaswag(s) for s in ("train", "validation", "test")},
    "iwslt2017_de_en": {f"iwslt2017-de-en/iwslt2017-{s}": _iwslt(s) for s in ("train", "validation", "test")},
    "gsm8k": {"main/train-00000-of-00001": _gsm8k("train"), "main/test-00000-of-00001": _gsm8k("test"),
              "socratic/train-00000-of-00001": _gsm8k("train", "socratic"),
              "socratic/test-00000-of-00001": _gsm8k("test", "socratic")},
}


def write_fixture(task: str, root: Path, fmt: str = "jsonl") -> Path:
    """The task's fixture files under ``root`` in format jsonl | parquet | csv | arrow."""
    if fmt == "arrow":  # datasets' save_to_disk folder: <split>/data-00000-of-00001.arrow
        import datasets

        by_split = {}
        for rel, rows in FIXTURES[task].items():
            if "socratic" not in rel:
                by_split[Path(rel).name.split("-")[-1 if task == "iwslt2017_de_en" else 0]] = rows
        datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in by_split.items()}).save_to_disk(str(root))
        return root
    for rel, rows in FIXTURES[task].items():
        path = root / f"{rel}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        elif fmt == "parquet":
            import datasets

            datasets.Dataset.from_list(rows).to_parquet(str(path))
        elif fmt == "csv":
            import csv

            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    return root


def run(task, src, out, **kw) -> dict:
    return prepare(PrepareConfig(task=task, input=str(src), output=str(out), **kw))


def _val_size(task):
    return {"val_size": VAL_SIZE} if getattr(load_converter(task), "HOLDOUT", None) else {}


def split_files(out: Path) -> dict:
    return {s: (out / f"{s}.jsonl").read_bytes() for s in ("train", "validation", "test")}


# ------------------------------------------------------------------------------ tests
def test_every_task_has_a_converter_and_a_yaml_that_reads_its_output():
    assert available_tasks() == sorted(TASKS)
    for task in TASKS:
        cfg = yaml.safe_load((ROOT / "conf" / "task" / f"{task}.yaml").read_text())
        assert cfg["name"] == task
        assert cfg["data_dir"] == PrepareConfig(task=task).output == f"data/{task}"
        assert cfg["eval_split"] == "test"


@pytest.mark.parametrize("task", TASKS)
def test_convert_from_jsonl(task, tmp_path):
    src = write_fixture(task, tmp_path / "src")
    info = run(task, src, tmp_path / "out", **_val_size(task))
    recs = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in recs.items()} == {s: v["examples"] for s, v in info["splits"].items()}
    assert all(recs.values())
    assert json.loads((tmp_path / "out" / "prepare_info.json").read_text()) == info
    # same input, same options -> the same bytes
    first = split_files(tmp_path / "out")
    run(task, src, tmp_path / "out", **_val_size(task))
    assert split_files(tmp_path / "out") == first
    CHECKS[task](recs, info)


def _check_squad(recs, info):
    test = recs["test"]
    assert len(test) == len(_squad("validation"))  # the official validation split, whole
    assert test[0]["input"] == "Context: Tovin is a city near the harbour. It was founded in 1002 by Mara and Oren.\n" \
                               "Question: Where is Tovin?"
    assert test[0]["output"] == "the harbour" and test[0]["references"] == ["the harbour", "the harbour", "harbour"]
    # held out by whole article: no context in both train and validation
    train_ctx = {r["input"].split("\n")[0] for r in recs["train"]}
    val_ctx = {r["input"].split("\n")[0] for r in recs["validation"]}
    assert val_ctx and not train_ctx & val_ctx
    assert len(recs["train"]) + len(recs["validation"]) == len(_squad("train"))
    assert len(recs["validation"]) >= VAL_SIZE and len(recs["validation"]) % 3 == 0
    assert info["holdout"] == {"size": VAL_SIZE, "group": "title", "seed": 0}


def _check_dialogsum(recs, info):
    assert [len(recs[s]) for s in ("train", "validation", "test")] == [8, 3, 3]
    r = recs["test"][1]
    assert r["input"] == "#Person1#: Hello, is the 1th train late?\n#Person2#: Yes, by 3 minutes."
    assert r["output"] == "#Person2# tells #Person1# the 1th train is 3 minutes late." and r["id"] == "test_1"
    assert info["holdout"] is None


def _check_hellaswag(recs, info):
    assert len(recs["test"]) == 4  # official validation; the unlabelled official test is not read
    wiki, drums = recs["test"][0], recs["test"][1]
    # the harness's preprocessing: " [title]" -> ". ", other [..] dropped, double spaces collapsed
    assert wiki["input"] == "Cleaning windows: How to clean windows. Get a cloth."
    assert wiki["choices"] == [" Wipe the glass 0 times.", "starts to sing.", "drops the sticks 0.", "walks away."]
    assert drums["input"] == "Playing drums: A man sits at drum kit 1. He"  # ctx_b capitalised
    assert [r["label"] for r in recs["test"]] == [0, 1, 2, 3]
    assert all(r["output"] == r["choices"][r["label"]] for rs in recs.values() for r in rs)
    sources = {row["ind"]: row["source_id"] for row in _hellaswag("train")}
    train_src, val_src = ({sources[r["ind"]] for r in recs[s]} for s in ("train", "validation"))
    assert len(recs["validation"]) == VAL_SIZE and val_src and not train_src & val_src
    assert len(recs["train"]) + len(recs["validation"]) == 10 and info["holdout"]["group"] == "source_id"


def _check_iwslt(recs, info):
    assert recs["test"][2] == {"input": "Das ist Satz Nummer 2 über Bäume.", "output": "This is sentence number 2 about trees."}
    assert [len(recs[s]) for s in ("train", "validation", "test")] == [8, 3, 3]


def _check_gsm8k(recs, info):
    assert len(recs["test"]) == 3 and len(recs["validation"]) == VAL_SIZE and len(recs["train"]) == 9 - VAL_SIZE
    assert not any("Let's think" in r["output"] for rs in recs.values() for r in rs)  # socratic/ not read
    assert recs["test"][1]["output"].endswith("\n#### 5") and "<<1+4=5>>" in recs["test"][1]["output"]
    assert info["files"]["train"] == ["main/train-00000-of-00001.jsonl"]


CHECKS = {"squad": _check_squad, "dialogsum": _check_dialogsum, "hellaswag": _check_hellaswag,
          "iwslt2017_de_en": _check_iwslt, "gsm8k": _check_gsm8k}


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_parquet_and_arrow_give_the_same_files_as_jsonl(fmt, tmp_path):
    pytest.importorskip("datasets")
    for task in TASKS:
        ref = tmp_path / task / "ref"
        run(task, write_fixture(task, tmp_path / task / "jsonl"), ref, **_val_size(task))
        out = tmp_path / task / fmt
        run(task, write_fixture(task, tmp_path / task / f"src_{fmt}", fmt), out, **_val_size(task))
        assert split_files(out) == split_files(ref), (task, fmt)


def test_dialogsum_from_the_hubs_csv_files(tmp_path):
    run("dialogsum", write_fixture("dialogsum", tmp_path / "jsonl"), tmp_path / "ref")
    run("dialogsum", write_fixture("dialogsum", tmp_path / "csv", "csv"), tmp_path / "out")
    assert split_files(tmp_path / "out") == split_files(tmp_path / "ref")


def test_hub_source_loads_the_named_dataset_and_falls_back_to_its_parquet_export(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, revision=None, **kw):
        calls.append((path, name, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found iwslt2017.py")
        return datasets.DatasetDict({s: datasets.Dataset.from_list(_iwslt(s)) for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    run("iwslt2017_de_en", write_fixture("iwslt2017_de_en", tmp_path / "jsonl"), tmp_path / "ref")
    info = prepare(PrepareConfig(task="iwslt2017_de_en", output=str(tmp_path / "out")))
    assert calls == [("IWSLT/iwslt2017", "iwslt2017-de-en", None),
                     ("IWSLT/iwslt2017", "iwslt2017-de-en", "refs/convert/parquet")]
    assert info["source"] == "hub" and split_files(tmp_path / "out") == split_files(tmp_path / "ref")


def test_missing_datasets_package_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'tiedlora\[data\]'"):
        prepare(PrepareConfig(task="gsm8k", output=str(tmp_path / "out")))


@pytest.mark.parametrize("task, split_file, row, patch, reason", [
    ("squad", "plain_text/validation-00000-of-00001.jsonl", 5, lambda r: r.pop("answers"), "missing column(s) ['answers']"),
    ("squad", "plain_text/train-00000-of-00001.jsonl", 2, lambda r: r["answers"].update(text=[]), "answers.text must be a non-empty list"),
    ("hellaswag", "data/validation-00000-of-00001.jsonl", 3, lambda r: r.update(label=""), "the official test split has no labels"),
    ("hellaswag", "data/train-00000-of-00001.jsonl", 1, lambda r: r.update(label="7"), "label 7 out of range for 4 endings"),
    ("gsm8k", "main/test-00000-of-00001.jsonl", 2, lambda r: r.update(answer="It is 5."), "no final '#### <number>' line"),
    ("iwslt2017_de_en", "iwslt2017-de-en/iwslt2017-train.jsonl", 4, lambda r: r["translation"].pop("en"), "column 'en' must be a string"),
    ("dialogsum", "validation.jsonl", 3, lambda r: r.update(summary="  "), "column 'summary' is empty"),
])
def test_malformed_row_names_file_and_row(task, split_file, row, patch, reason, tmp_path):
    src = write_fixture(task, tmp_path / "src")
    path = src / split_file
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    patch(rows[row - 1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.jsonl").write_text("previous\n")
    with pytest.raises(ConversionError) as e:
        run(task, src, tmp_path / "out", **_val_size(task))
    assert f"{path}: row {row}: " in str(e.value) and reason in str(e.value)
    assert (tmp_path / "out" / "train.jsonl").read_text() == "previous\n"  # nothing written


def test_command_line_and_its_errors(tmp_path):
    src = write_fixture("gsm8k", tmp_path / "src")
    bad = src / "main" / "train-00000-of-00001.jsonl"
    good_text = bad.read_text()
    bad.write_text(good_text + "{not json\n")
    cmd = [sys.executable, "-m", "tiedlora.prepare_data", "task=gsm8k", f"input={src}", f"output={tmp_path / 'out'}",
           "val_size=2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and f"{bad}: row 10: bad JSON line" in res.stderr, res.stderr
    bad.write_text(good_text)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "train 7 (from train), validation 2 (from train (held out)), test 3 (from test)" in res.stdout
    for args, msg in [(["task=nope"], "expected one of ['dialogsum', 'gsm8k'"),
                      (["task=gsm8k", "source=local"], "source=local: set input="),
                      (["task=gsm8k", f"input={src}", "colour=red"], "colour"),
                      (["task=dialogsum", f"input={src}"], "needs the official split(s) ['test', 'train', 'validation']"),
                      (["task=dialogsum", f"input={write_fixture('dialogsum', tmp_path / 'd')}", "val_size=2"],
                       "uses its official validation split")]:
        res = subprocess.run([sys.executable, "-m", "tiedlora.prepare_data", *args, f"output={tmp_path / 'x'}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and msg in res.stderr, (args, res.stderr)


def test_holdout_takes_whole_groups_deterministically():
    pairs = [({"g": i // 4, "i": i}, {"n": i}) for i in range(40)]
    kept, held = holdout(pairs, Holdout(size=6, group="g"), seed=0)
    groups = {r["g"] for r, _ in held}
    assert len(held) == 8 and len(groups) == 2 and not groups & {r["g"] for r, _ in kept}
    assert [r["i"] for r, _ in kept + held] != list(range(40)) and sorted(r["i"] for r, _ in kept + held) == list(range(40))
    assert holdout(list(reversed(pairs)), Holdout(size=6, group="g"), seed=0)[1][0][0]["g"] in groups  # order-free
    assert {r["g"] for r, _ in holdout(pairs, Holdout(size=6, group="g"), seed=1)[1]} != groups
    with pytest.raises(ValueError, match="val_size=40"):
        holdout(pairs, Holdout(size=40), seed=0)


def test_writes_are_atomic(tmp_path):
    write_splits(tmp_path, {"train": [{"a": 1}], "validation": [{"a": 2}]}, {})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before == {"train.jsonl": b'{"a": 1}\n', "validation.jsonl": b'{"a": 2}\n'}
    with pytest.raises(TypeError):  # the second file fails half-way: nothing is replaced, no temp left
        write_splits(tmp_path, {"train": [{"a": 3}], "validation": [{"a": 4}, {"a": {5}}]}, {})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --------------------------------------------------------------- end to end, five tasks
def test_prepare_then_finetune_and_evaluate_all_five_tasks(tiny_base, tmp_path):
    data = tmp_path / "data"
    for task in TASKS:  # the command a user runs, from the hub-layout fixture files
        src = write_fixture(task, tmp_path / "src" / task)
        res = subprocess.run([sys.executable, "-m", "tiedlora.prepare_data", f"task={task}", f"input={src}",
                              f"output={data / task}", *[f"{k}={v}" for k, v in _val_size(task).items()]],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    # the paper's GPT-2B-001 sweep itself, its task axis kept; model, preset, rank and sizes made tiny
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "tiedlora.finetune", "-m", "--config-dir", "recipes/gpt2b_001", "--config-name", "grid",
           *tiny_base_args(tiny_base),
           "peft=tl6", "peft.rank=8", f"task.data_dir={data}/${{task.name}}", "task.max_length=64",
           "task.max_new_tokens=4", "trainer.max_steps=2", "trainer.global_batch_size=4",
           "trainer.micro_batch_size=2", "trainer.val_check_interval=2", "eval.limit=3", "eval.batch_size=4",
           f"output_dir={out}/${{task.name}}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    res = subprocess.run(cmd, cwd=ROOT, env=tiny_base["env"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(TASKS)  # one run per task of the sweep
    for task in TASKS:
        r = json.loads((out / task / "results.json").read_text())
        assert r["task"] == task and r["steps"] == 2 and r["best_val_loss"] is not None
        assert METRIC_KEYS[task] in r["metrics"], r["metrics"]
        assert all(0.0 <= v <= 100.0 for v in r["metrics"].values())
        preds = [json.loads(line) for line in (out / task / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 3
        if task == "hellaswag":
            assert all(len(p["scores"]) == 4 for p in preds)
