"""IWSLT 2017 German -> English (TED talk translation) -> NeMo SFT JSONL.

Hub: ``IWSLT/iwslt2017`` (legacy name ``iwslt2017``), config ``iwslt2017-de-en``; one
column ``translation{de, en}``. 206,112 / 888 / 8,079 sentence pairs. The repository
is a loading script, which ``datasets`` >= 4 no longer runs: it is then read from the
hub's Parquet export (``<config>/iwslt2017-{train,validation,test}.parquet``).

Splits: the official three (validation = dev2010, test = tst2010-2015 as packaged).

Record::

    {"input": <German sentence>, "output": <English sentence>}
"""

from tiedlora.prepare_data._common import Hub, RowError, text

HUB = Hub("IWSLT/iwslt2017", "iwslt2017-de-en")
COLUMNS = ("translation",)
OFFICIAL = {"train": "train", "validation": "validation", "test": "test"}  # our split <- official split


def convert(row: dict) -> dict:
    pair = row["translation"]
    if not isinstance(pair, dict):
        raise RowError(f"column 'translation' must be {{de: ..., en: ...}}, got {pair!r:.80}")
    return {"input": text(pair, "de"), "output": text(pair, "en")}
