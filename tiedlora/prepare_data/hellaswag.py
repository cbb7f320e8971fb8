"""HellaSwag (commonsense sentence completion, multiple choice) -> NeMo SFT JSONL.

Hub: ``Rowan/hellaswag``; columns ``ind, activity_label, ctx_a, ctx_b, ctx, endings
(4 strings), source_id, split, split_type, label`` (a string "0".."3"; empty in the
test split, whose labels are not public). 39,905 / 10,042 / 10,003 examples.

Preprocessing as in the usual evaluation harness (lm-evaluation-harness's
``hellaswag``): query = ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``;
query and endings lose WikiHow's `` [title]`` markers (-> ". "), any other ``[...]``
and double spaces. Scored by the length-normalised log-likelihood of ``" " + ending``
after the query (task template ``"{input} {output}"``).

Splits: our test is the official validation split; our validation is about 2,000 train
examples from whole held-out source videos/articles (``source_id``).

Record::

    {"ind": ..., "input": <query>, "output": <gold ending>,
     "choices": [<4 endings>], "label": <0..3>}
"""

import re

from tiedlora.prepare_data._common import Holdout, Hub, RowError, strings, text

HUB = Hub("Rowan/hellaswag")
COLUMNS = ("activity_label", "ctx_a", "ctx_b", "endings", "source_id", "label")
OFFICIAL = {"train": "train", "test": "validation"}  # our split <- official split
HOLDOUT = Holdout(size=2000, group="source_id")  # our validation <- whole train sources

_BRACKETS = re.compile(r"\[.*?\]")


def preprocess(s: str) -> str:
    """The harness's cleaning of WikiHow artifacts."""
    s = s.strip().replace(" [title]", ". ")
    s = _BRACKETS.sub("", s)
    return s.replace("  ", " ")


def convert(row: dict) -> dict:
    for c in ("ctx_a", "ctx_b"):  # ctx_b may be empty (then the context is ctx_a alone)
        if not isinstance(row[c], str):
            raise RowError(f"column {c!r} must be a string, got {type(row[c]).__name__}")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    choices = [preprocess(e) for e in strings(row["endings"], "endings")]
    label = row["label"]
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise RowError(f"column 'label' must be an index like '2', got {row['label']!r} "
                       f"(the official test split has no labels)")
    if not 0 <= label < len(choices):
        raise RowError(f"label {label} out of range for {len(choices)} endings")
    rec = {"input": preprocess(text(row, "activity_label") + ": " + ctx), "output": choices[label],
           "choices": choices, "label": label}
    return {"ind": row["ind"], **rec} if "ind" in row else rec
