"""GSM8K (grade-school math word problems) -> NeMo SFT JSONL.

Hub: ``openai/gsm8k`` (legacy name ``gsm8k``), config ``main``; columns ``question,
answer``. 7,473 train and 1,319 test problems; no validation split. The answer is a
worked solution (with ``<<48/2=24>>`` calculator annotations) ending in a line
``#### <number>``: the model learns to write the same, and the metric compares the
number after ``####`` (``tiedlora.metrics.gsm8k_accuracy``).

Splits: test is the official test; validation is 500 problems held out of train.

Record::

    {"input": <question>, "output": <solution ending in "#### <number>">}
"""

from tiedlora.prepare_data._common import Holdout, Hub, RowError, text

HUB = Hub("openai/gsm8k", "main")
COLUMNS = ("question", "answer")
OFFICIAL = {"train": "train", "test": "test"}  # our split <- official split
HOLDOUT = Holdout(size=500)  # our validation <- 500 train problems


def convert(row: dict) -> dict:
    answer = text(row, "answer")
    if "####" not in answer:
        raise RowError("column 'answer' has no final '#### <number>' line")
    return {"input": text(row, "question"), "output": answer}
