"""Machinery shared by the task converters: find and read the official splits, check
rows, hold out a validation set, write NeMo SFT JSONL atomically.

A converter module (``tiedlora/prepare_data/<task>.py``, named like its task YAML) holds
only data and one function::

    HUB = Hub("openai/gsm8k", "main")       # load_dataset(path, name) when source=hub
    COLUMNS = ("question", "answer")         # columns every row must have
    OFFICIAL = {"train": "train", "test": "test"}   # our split <- official split
    HOLDOUT = Holdout(size=500)              # carve our validation split out of our train
    def convert(row: dict) -> dict: ...      # one official row -> one SFT record

Local files (``source=local input=DIR``): every ``.parquet``, ``.arrow``, ``.jsonl``,
``.json`` and ``.csv`` file under ``DIR``; a file's split is the first word of its name
(``train-00000-of-00001.parquet``, ``iwslt2017-validation.parquet``, ``test.jsonl``) or
else of its nearest folder (``train/data-00000-of-00001.arrow``) that names one.
When the files of several hub configs are present (``main/`` and ``socratic/``), only
those under a folder named like the task's config are read. JSON Lines, JSON and CSV
need only the standard library; Parquet and Arrow need ``pyarrow`` and the hub needs
``datasets`` (both: ``pip install 'tiedlora[data]'``).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from tiedlora.files import staged, to_json

SPLITS = ("train", "validation", "test")
SPLIT_WORDS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}
FORMATS = (".parquet", ".arrow", ".jsonl", ".json", ".csv")
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
PARQUET_EXPORT = "refs/convert/parquet"  # the hub's Parquet copy of script-based datasets
_MAX_REPORTED = 10


@dataclass(frozen=True)
class Hub:
    """Where ``datasets.load_dataset`` finds the task (``path``, config ``name``)."""

    path: str
    name: Optional[str] = None


@dataclass(frozen=True)
class Holdout:
    """Move about ``size`` examples of our train split into our validation split.

    Whole groups move together (rows sharing ``group``'s value: a SQuAD article, a
    HellaSwag source video), so no context is shared between the two splits. Groups are
    ordered by a hash of (seed, value): the choice is deterministic and does not depend
    on the order of the rows."""

    size: int
    group: Optional[str] = None  # column; None: every row is its own group


class RowError(ValueError):
    """A converter's complaint about one row (the message is the reason only)."""


class ConversionError(ValueError):
    """Malformed input: ``errors`` lists ``(where, row, reason)``; ``row`` is 1-based (the
    line number for JSON Lines), 0 for a problem of the whole file."""

    def __init__(self, errors: Sequence[Tuple[str, int, str]]):
        self.errors = list(errors)
        shown = [f"{w}: row {n}: {r}" if n else f"{w}: {r}" for w, n, r in self.errors[:_MAX_REPORTED]]
        more = len(self.errors) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more bad rows" if more > 0 else ""))


# ------------------------------------------------------------------------ row helpers
def text(row: dict, column: str, strip: bool = True) -> str:
    """``row[column]`` as a non-empty string, else :class:`RowError`."""
    v = row.get(column)
    if not isinstance(v, str):
        raise RowError(f"column {column!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise RowError(f"column {column!r} is empty")
    return v.strip() if strip else v


def strings(value, what: str) -> List[str]:
    """``value`` as a non-empty list of non-empty strings, else :class:`RowError`."""
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"{what} must be a non-empty list, got {value!r:.80}")
    if not all(isinstance(s, str) and s.strip() for s in value):
        raise RowError(f"{what} must hold non-empty strings, got {value!r:.120}")
    return list(value)


# ------------------------------------------------------------------------- local files
def _words(name: str) -> List[str]:
    return [w for w in re.split(r"[^0-9a-z]+", name.lower()) if w]


def split_of(path: Path, root: Path) -> Optional[str]:
    """Our split name for a data file, from its file name or else its nearest folder."""
    names = [path.name[: -len(path.suffix)]] + [p.name for p in path.relative_to(root).parents if p.name]
    for name in names:
        for w in _words(name):
            if w in SPLIT_WORDS:
                return SPLIT_WORDS[w]
    return None


def find_files(root: Path, config: Optional[str] = None) -> Dict[str, List[Path]]:
    """``{official split: [files]}`` under ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input={str(root)!r}: no such folder")
    if not root.is_dir():
        raise ValueError(f"input={str(root)!r}: give the folder that holds the dataset's split files "
                         f"(e.g. train-00000-of-00001.parquet, validation.jsonl), not one file")
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in FORMATS
             and p.name not in METADATA_FILES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if config:
        mine = [p for p in files if config in p.relative_to(root).parts[:-1]]
        files = mine or files
    found: Dict[str, List[Path]] = {}
    for p in files:
        s = split_of(p, root)
        if s is not None:
            found.setdefault(s, []).append(p)
    for s, ps in found.items():
        kinds = sorted({p.suffix for p in ps})
        if len(kinds) > 1:
            raise ValueError(f"input={str(root)!r}: split {s!r} has files of several formats {kinds} "
                             f"({', '.join(str(p) for p in ps[:4])}); keep one copy")
    return found


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the '{module.split('.')[0]}' package: "
                          f"pip install 'tiedlora[data]'   (or: pip install 'datasets>=2.18')") from None


def read_file(path: Path) -> Iterator[Tuple[int, dict]]:
    """``(row number, row)`` of one data file; a bad line raises :class:`ConversionError`."""
    path = Path(path)
    if path.suffix == ".parquet":
        pq = _need("pyarrow.parquet", f"reading {path.name}")
        n = 0
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    elif path.suffix == ".arrow":
        pa = _need("pyarrow", f"reading {path.name}")
        with pa.memory_map(str(path)) as src:
            try:
                reader = pa.ipc.open_stream(src)  # datasets' cache and save_to_disk files
            except pa.ArrowInvalid:
                src.seek(0)
                reader = pa.ipc.open_file(src)
            table = reader.read_all()
        for n, row in enumerate(table.to_pylist(), start=1):
            yield n, row
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a leading BOM is skipped
            for n, row in enumerate(csv.DictReader(f), start=1):
                yield n, row
    else:  # .jsonl, or .json: JSON Lines (datasets' to_json) or one array of objects
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
        if path.suffix == ".json" and head.startswith(b"["):
            try:
                rows = json.loads(path.read_text(encoding="utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError([(str(path), 0, f"bad JSON: {e}")]) from None
            for n, row in enumerate(rows, start=1):
                yield n, row
            return
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield n, json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ConversionError([(str(path), n, f"bad JSON line: {e}")]) from None


# ---------------------------------------------------------------------------- the hub
def load_hub(hub: Hub, splits: Iterable[str], revision: Optional[str] = None,
             cache_dir: Optional[str] = None) -> Dict[str, Iterable[Tuple[int, dict]]]:
    """``{official split: rows}`` from the Hugging Face hub (``datasets.load_dataset``).

    A dataset still published as a loading script (which ``datasets`` >= 4 no longer
    runs) is read from the hub's Parquet export of it instead (``refs/convert/parquet``).
    """
    datasets = _need("datasets", "source=hub")
    kw = dict(cache_dir=cache_dir)
    try:
        dd = datasets.load_dataset(hub.path, hub.name, revision=revision, **kw)
    except Exception as e:  # noqa: BLE001 - the library raises several kinds
        if revision is not None or "script" not in str(e).lower():
            raise
        dd = datasets.load_dataset(hub.path, hub.name, revision=PARQUET_EXPORT, **kw)
    missing = [s for s in splits if s not in dd]
    if missing:
        raise ValueError(f"hub dataset {hub.path!r} (config {hub.name!r}) has no split(s) {missing}; "
                         f"it has {sorted(dd)}")
    return {s: ((n, row) for n, row in enumerate(dd[s], start=1)) for s in splits}


# ------------------------------------------------------------------------- conversion
def convert_rows(rows: Iterable[Tuple[int, dict]], where: str, columns: Sequence[str], convert,
                 errors: List[Tuple[str, int, str]]) -> List[Tuple[dict, dict]]:
    """``[(row, record)]``; bad rows are appended to ``errors`` as ``(where, n, reason)``."""
    out = []
    try:
        for n, row in rows:
            if not isinstance(row, dict):
                errors.append((where, n, f"expected an object with columns {list(columns)}, "
                                         f"got {type(row).__name__}"))
                continue
            missing = [c for c in columns if c not in row]
            if missing:
                errors.append((where, n, f"missing column(s) {missing} (present: {sorted(row)})"))
                continue
            try:
                out.append((row, convert(row)))
            except RowError as e:
                errors.append((where, n, str(e)))
    except ConversionError as e:
        errors.extend(e.errors)
    return out


def holdout(pairs: List[Tuple[dict, dict]], spec: Holdout, seed: int):
    """Split ``pairs`` into (kept, held out) by whole groups; both keep the input order."""
    if not 0 < spec.size < len(pairs):
        raise ValueError(f"val_size={spec.size}: must be between 1 and the {len(pairs) - 1} "
                         f"examples train can give up")
    keys = [str(row[spec.group]) if spec.group else str(i) for i, (row, _) in enumerate(pairs)]
    sizes: Dict[str, int] = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1

    def rank(k: str) -> str:
        return hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest()

    chosen, total = set(), 0
    for k in sorted(sizes, key=rank):
        if total >= spec.size:
            break
        chosen.add(k)
        total += sizes[k]
    if len(chosen) == len(sizes):
        raise ValueError(f"val_size={spec.size}: holding out whole {spec.group!r} groups leaves no "
                         f"training data; use a smaller val_size")
    kept = [p for p, k in zip(pairs, keys) if k not in chosen]
    held = [p for p, k in zip(pairs, keys) if k in chosen]
    return kept, held


def write_splits(out_dir: Path, records: Dict[str, List[dict]], extra: Dict[str, str]) -> Dict[str, Path]:
    """Write ``<split>.jsonl`` (one JSON object a line, UTF-8) and the ``extra`` text files:
    every file goes to a temporary name first and is renamed into place only once all of
    them are complete, so an interrupted run leaves the previous files untouched."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {f"{s}.jsonl": (to_json(r, ensure_ascii=False) + "\n" for r in recs)
             for s, recs in records.items()}
    texts.update({name: iter([t]) for name, t in extra.items()})
    with contextlib.ExitStack() as stack:  # every rename happens after the last write
        for name, chunks in texts.items():
            tmp = stack.enter_context(staged(out_dir / name))
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(chunks)
    return {s: out_dir / f"{s}.jsonl" for s in records}
