"""SQuAD v1.1 (extractive QA, the paper's first task) -> NeMo SFT JSONL.

Hub: ``rajpurkar/squad`` (the legacy name ``squad`` redirects there), config
``plain_text``; columns ``id, title, context, question, answers{text: [...],
answer_start: [...]}``. 87,599 train and 10,570 validation questions; the test set is
not public.

Splits: our **test** is the official validation split, scored with every reference
answer kept (``references``: EM/F1 take the max over them, as the official script
does); our **validation** is about 2,000 train questions from whole held-out articles
(``title``), so no paragraph is shared with our train split.

Record::

    {"id": ..., "input": "Context: <context>\\nQuestion: <question>",
     "output": <first answer>, "references": [<every answer, as published>]}
"""

from tiedlora.prepare_data._common import Holdout, Hub, RowError, strings, text

HUB = Hub("rajpurkar/squad", "plain_text")
COLUMNS = ("title", "context", "question", "answers")
OFFICIAL = {"train": "train", "test": "validation"}  # our split <- official split
HOLDOUT = Holdout(size=2000, group="title")  # our validation <- whole train articles


def convert(row: dict) -> dict:
    answers = row["answers"]
    if not isinstance(answers, dict):
        raise RowError(f"column 'answers' must be {{text: [...], answer_start: [...]}}, got {answers!r:.80}")
    refs = [a.strip() for a in strings(answers.get("text"), "answers.text")]
    rec = {"input": f"Context: {text(row, 'context')}\nQuestion: {text(row, 'question')}",
           "output": refs[0], "references": refs}
    return {"id": str(row["id"]), **rec} if "id" in row else rec
