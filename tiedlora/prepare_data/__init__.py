"""Convert the paper's five tasks from the Hugging Face ``datasets`` format to NeMo SFT JSONL.

From the hub (needs network and ``pip install 'tiedlora[data]'``)::

    python -m tiedlora.prepare_data task=squad

From files already on disk (a hub snapshot, ``datasets``' cache or ``save_to_disk``
folder, or your own export: ``.parquet``, ``.arrow``, ``.jsonl``/``.json``, ``.csv``)::

    python -m tiedlora.prepare_data task=gsm8k input=/datasets/gsm8k/main output=data/gsm8k

Options (``key=value``)::

    task        squad | dialogsum | hellaswag | iwslt2017_de_en | gsm8k (one module here each)
    source      hub | local          (default: local when input= is given, else hub)
    input       folder holding the dataset's split files (source=local)
    output      where train/validation/test.jsonl go (default: data/<task>, the task YAML's data_dir)
    val_size    examples held out of train as validation (tasks without a usable validation split)
    seed        seed of that holdout (default 0)
    hub_id, hub_config, revision, cache_dir     override where/how the hub copy is loaded

Writes ``<output>/{train,validation,test}.jsonl`` (``{"input", "output"}`` a line, plus
``references`` / ``choices`` and ``label`` where the task has them) and
``<output>/prepare_info.json`` (source, counts, holdout), all atomically. Same input, same
options -> byte-identical files. A malformed row stops the run with its file and row.

Adding a task: ``conf/task/<name>.yaml`` plus, if its data needs converting, a module
``tiedlora/prepare_data/<name>.py`` (see :mod:`tiedlora.prepare_data._common` and
``docs/tasks.md``); no registry to edit.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from tiedlora.files import to_json
from tiedlora.prepare_data._common import (SPLITS, ConversionError, Holdout, Hub, convert_rows, find_files,
                                           holdout, load_hub, read_file, write_splits)

__all__ = ["PrepareConfig", "available_tasks", "load_converter", "prepare", "main", "ConversionError"]

SOURCES = ("hub", "local")


def available_tasks() -> List[str]:
    """Task names with a converter: the public modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


@dataclass
class PrepareConfig:
    task: str = "???"
    source: Optional[str] = None  # hub | local; None: local when input is set, else hub
    input: Optional[str] = None  # folder with the dataset's files (source=local)
    output: Optional[str] = None  # None: data/<task>
    val_size: Optional[int] = None  # None: the converter's default holdout size
    seed: int = 0  # holdout seed
    hub_id: Optional[str] = None  # None: the converter's HUB.path
    hub_config: Optional[str] = None  # None: the converter's HUB.name
    revision: Optional[str] = None  # hub revision (branch, tag, commit)
    cache_dir: Optional[str] = None  # datasets' cache folder

    def __post_init__(self):
        tasks = available_tasks()
        if self.task not in tasks:
            raise ValueError(f"task={self.task!r}: expected one of {tasks}")
        if self.source is None:
            self.source = "local" if self.input is not None else "hub"
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: expected one of {list(SOURCES)}")
        if self.source == "local" and self.input is None:
            raise ValueError("source=local: set input=<folder with the dataset's files>")
        if self.source == "hub" and self.input is not None:
            raise ValueError(f"input={self.input!r} is read with source=local, not source=hub")
        if self.val_size is not None and self.val_size < 1:
            raise ValueError(f"val_size={self.val_size!r}: must be >= 1")
        if self.output is None:
            self.output = f"data/{self.task}"


def load_converter(task: str):
    """The converter module of ``task``, its declarations checked."""
    if task not in available_tasks():
        raise ValueError(f"task={task!r}: expected one of {available_tasks()}")
    mod = importlib.import_module(f"{__name__}.{task}")
    for attr, kind in (("HUB", Hub), ("COLUMNS", tuple), ("OFFICIAL", dict)):
        if not isinstance(getattr(mod, attr, None), kind):
            raise TypeError(f"{mod.__name__}.{attr} must be a {kind.__name__}")
    if not callable(getattr(mod, "convert", None)):
        raise TypeError(f"{mod.__name__}.convert(row) -> record is missing")
    hold = getattr(mod, "HOLDOUT", None)
    ours = set(mod.OFFICIAL) | ({"validation"} if hold is not None else set())
    if ours != set(SPLITS) or (hold is not None and "validation" in mod.OFFICIAL):
        raise TypeError(f"{mod.__name__}: OFFICIAL (+ HOLDOUT for validation) must give exactly "
                        f"{list(SPLITS)}; got OFFICIAL={mod.OFFICIAL}, HOLDOUT={hold}")
    return mod


def prepare(cfg: PrepareConfig) -> dict:
    """Convert one task; returns what ``prepare_info.json`` holds."""
    mod = load_converter(cfg.task)
    hub = Hub(cfg.hub_id or mod.HUB.path, cfg.hub_config if cfg.hub_config is not None else mod.HUB.name)
    needed = sorted(set(mod.OFFICIAL.values()))
    if cfg.source == "local":
        found = find_files(Path(cfg.input), hub.name)
        missing = [s for s in needed if s not in found]
        if missing:
            seen = {s: [str(p) for p in ps] for s, ps in found.items()}
            raise FileNotFoundError(
                f"task {cfg.task!r} needs the official split(s) {needed}; under input={cfg.input!r} no "
                f"file for {missing} (files found by split: {seen or 'none'}). A file's split is the "
                f"first word of its name or folder: train, validation (valid, val, dev), test")
        streams = {s: [(str(p), read_file(p)) for p in found[s]] for s in needed}
        origin = {"input": str(Path(cfg.input).resolve()),
                  "files": {s: [str(p.relative_to(cfg.input)) for p in found[s]] for s in needed}}
    else:
        rows = load_hub(hub, needed, revision=cfg.revision, cache_dir=cfg.cache_dir)
        streams = {s: [(f"hub:{hub.path}[{s}]", rows[s])] for s in needed}
        origin = {"hub": {"path": hub.path, "name": hub.name, "revision": cfg.revision}}

    errors: list = []
    converted: Dict[str, list] = {}
    for s in needed:
        converted[s] = []
        for where, rows in streams[s]:
            converted[s] += convert_rows(rows, where, mod.COLUMNS, mod.convert, errors)
    if errors:
        raise ConversionError(errors)

    pairs = {ours: list(converted[official]) for ours, official in mod.OFFICIAL.items()}
    hold: Optional[Holdout] = getattr(mod, "HOLDOUT", None)
    if hold is not None:
        hold = dataclasses.replace(hold, size=cfg.val_size or hold.size)
        pairs["train"], pairs["validation"] = holdout(pairs["train"], hold, cfg.seed)
    elif cfg.val_size is not None:
        raise ValueError(f"val_size={cfg.val_size}: task {cfg.task!r} uses its official validation split "
                         f"({mod.OFFICIAL['validation']!r}); there is nothing to hold out")
    empty = [s for s in SPLITS if not pairs[s]]
    if empty:
        raise ValueError(f"task {cfg.task!r}: split(s) {empty} came out empty")

    records = {s: [rec for _, rec in pairs[s]] for s in SPLITS}
    info = {"task": cfg.task, "source": cfg.source, **origin,
            "splits": {s: {"examples": len(records[s]),
                           "from": (f"{mod.OFFICIAL['train']} (held out)" if s == "validation" and hold
                                    else mod.OFFICIAL[s])} for s in SPLITS},
            "holdout": None if hold is None else {"size": hold.size, "group": hold.group, "seed": cfg.seed}}
    write_splits(Path(cfg.output), records, {"prepare_info.json": to_json(info, indent=2) + "\n"})
    return info


def main(argv: Optional[List[str]] = None) -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tiedlora.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(f"tasks: {', '.join(available_tasks())}")
        return
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise UserError(f"prepare_data: arguments are key=value, got {bad} (try --help)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepareConfig), OmegaConf.from_dotlist(argv))
        cfg = OmegaConf.to_object(merged)
        info = prepare(cfg)
    except (ValueError, TypeError, FileNotFoundError, ImportError, OmegaConfBaseException) as e:
        # a missing optional package (datasets) or a source row of the wrong type is the input's fault too
        raise UserError(f"prepare_data task={dict(a.split('=', 1) for a in argv).get('task', '?')}: {e}") from e
    counts = ", ".join(f"{s} {v['examples']:,} (from {v['from']})" for s, v in info["splits"].items())
    print(f"{cfg.task}: wrote {cfg.output}/{{train,validation,test}}.jsonl: {counts}")


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
