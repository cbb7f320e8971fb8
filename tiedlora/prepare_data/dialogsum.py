"""DialogSum (dialogue summarisation) -> NeMo SFT JSONL.

Hub: ``knkarthick/dialogsum`` (CSV files ``train.csv``, ``validation.csv``,
``test.csv``); columns ``id, dialogue, summary, topic``. 12,460 / 500 / 1,500 dialogues.
The turns of a dialogue are lines ``#Person1#: ...``.

Splits: the official three, as published (the hub copy has one reference summary per
test dialogue; ROUGE-L is scored against it).

Record::

    {"id": ..., "input": <dialogue>, "output": <summary>, "topic": <topic>}
"""

from tiedlora.prepare_data._common import Hub, text

HUB = Hub("knkarthick/dialogsum")
COLUMNS = ("dialogue", "summary")
OFFICIAL = {"train": "train", "validation": "validation", "test": "test"}  # our split <- official split


def convert(row: dict) -> dict:
    rec = {"input": text(row, "dialogue"), "output": text(row, "summary")}
    if "id" in row:
        rec = {"id": str(row["id"]), **rec}
    if isinstance(row.get("topic"), str):
        rec["topic"] = row["topic"]
    return rec
