"""Sweep report: the comparison table, the paper-style tables and figures, and missing cells.

    python -m tiedlora.report runs/demo                    # table on stdout; files in runs/demo/report/
    python -m tiedlora.report runs/demo --out docs/results # files elsewhere
    python -m tiedlora.report runs/lr runs/grid --out rep  # one report over several sweeps
    python -m tiedlora.report outputs/ --no-figures        # tables only (no matplotlib needed)
    python -m tiedlora.report outputs/ --json              # the runs as JSON on stdout, nothing written

Every ``results.json`` below the folder is one run; ``config.yaml`` next to it supplies the seed
(``trainer.seed``) and the learning rate (``optim.lr``). A *cell* is one (task, model, preset,
rank); its runs are its seeds, possibly at several learning rates::

    runs ──► cells (task, model, preset, rank) ──► learning rate chosen on validation loss
                                                   ──► mean ± spread over seeds
        ├─► <task>__<model>.md / .csv     rows preset, columns rank, cell "metric ±spread (share of LoRA)"
        ├─► <task>__<model>__rank.png     metric vs rank, a line per preset (the paper's per-task figure)
        ├─► <model>__average.png          mean over tasks vs rank per preset, LoRA and VeRA as baselines
        ├─► <model>__pareto.png           metric vs trainable parameters (log axis), Pareto front marked
        ├─► learning_rates.md / .csv      per cell that tried several rates: the choice, the tried rates
        │                                 beside it and their validation losses, EDGE where one side is missing
        └─► missing.md / .csv             cells without a result: failed, running, not started, never submitted

Learning-rate selection: when a cell holds runs at several rates, the rate whose runs have the
lowest mean best validation loss is reported (never the test metric), and the tables name it.
A run that diverged (results.json with ``"status": "diverged"``) is never a result: it is listed
as a missing cell, "diverged at step N", and its rate is not among those compared.
Spread is half the range over seeds (max − min) / 2, shown when a cell has two or more seeds.

Missing cells: with a ``sweep.json`` (written by ``python -m tiedlora.submit``; every one at or
below the folders given counts, and a sweep folder may have been moved or copied) each planned job
without ``results.json`` is listed with its Slurm state when Slurm answers (failed, running,
pending) or else with what its output folder shows (not started / started, no results); every
combination of the tasks, models, presets and ranks seen that has no run at all is listed as
never submitted. Figures need matplotlib (``pip install 'tiedlora[report]'``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from tiedlora.files import atomic_write_text, read_results, to_json

if TYPE_CHECKING:
    from tiedlora.lr_bracket import Bracket

PRESET_ORDER = ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5", "tl6", "tl7"]
BASELINES = ("lora", "vera")
REPORT_DIR = "report"
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED")
LIVE_STATES = ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
               "REQUEUE_HOLD", "REQUEUE_FED")


# ----------------------------------------------------------------------------- runs
def load_results(paths: Iterable[str | Path]) -> List[dict]:
    """Every ``results.json`` given, or found below the folders given, with ``_path``, ``seed``
    and ``lr`` added from the ``config.yaml`` beside it where there is one. A missing path or
    a file that is not one JSON object raises ``FileNotFoundError``/``ValueError`` naming it."""
    rows = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory (give results.json files or run folders)")
        files = [p] if p.is_file() else sorted(p.rglob("results.json"))
        for f in files:
            try:
                r = json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{f}: not a results.json file ({e})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{f}: expected one JSON object, got {type(r).__name__}")
            r["_path"] = str(f.parent)
            cfg = _run_config(f.parent)
            r.setdefault("seed", _get(cfg, "trainer", "seed"))
            r.setdefault("lr", _get(cfg, "optim", "lr"))
            rows.append(r)
    return rows


def _run_config(folder: Path) -> dict:
    p = folder / "config.yaml"
    if not p.is_file():
        return {}
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def diverged_at(r: dict) -> Optional[str]:
    """``"diverged at step N"`` for a run whose results.json says it diverged, else None."""
    if r.get("status") != "diverged":
        return None
    step = _get(r, "diverged", "step")
    return f"diverged at step {step}" if step is not None else "diverged"


def main_metric(m: Optional[dict]) -> Tuple[Optional[str], Optional[float]]:
    """The headline number of a metrics dict: its first key (em, rougeL, bleu, accuracy, ...)."""
    if not m:
        return None, None
    k = next(iter(m))
    return k, m[k]


def render(rows: List[dict]) -> str:
    """One line per run: the table printed after a sweep."""
    if not rows:
        return "no results.json found"
    head = ["task", "model", "preset", "rank", "trainable", "% of LoRA", "metric", "before", "after",
            "steps", "wall s"]
    body = []
    for r in sorted(rows, key=lambda r: (r.get("task", ""), r.get("model", ""), r.get("rank", 0),
                                         _preset_key(r.get("preset", "")), r.get("seed") or 0)):
        k, after = main_metric(r.get("metrics"))
        _, before = main_metric(r.get("metrics_before"))
        shown = diverged_at(r) or ("-" if after is None else f"{after:.1f}")
        body.append([r.get("task", "?"), r.get("model", "?"), r.get("preset", "?"), str(r.get("rank", "?")),
                     f"{r.get('trainable_params', 0):,}", f"{100 * r.get('share_of_lora', 0):.1f}",
                     k or "-", "-" if before is None else f"{before:.1f}", shown, str(r.get("steps", "-")),
                     f"{r.get('wall_time_s', 0):.0f}"])
    return _text_table(head, body, left=3)


def _text_table(head: List[str], body: List[List[str]], left: int) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _preset_key(p: str):
    return (PRESET_ORDER.index(p), p) if p in PRESET_ORDER else (len(PRESET_ORDER), p)


# ---------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """All runs of one (task, model, preset, rank), reduced to the reported numbers."""

    task: str
    model: str
    preset: str
    rank: int
    runs: List[dict] = field(default_factory=list)
    metric: Optional[str] = None
    mean: Optional[float] = None
    spread: Optional[float] = None   # half the range over seeds; None with one seed
    seeds: int = 0
    lr: Optional[float] = None       # the chosen rate (None when every run used one rate)
    lrs: List[float] = field(default_factory=list)
    trainable: Optional[int] = None
    share_of_lora: Optional[float] = None

    @property
    def key(self):
        return (self.task, self.model, self.preset, self.rank)


def _select_lr(runs: List[dict]) -> Tuple[List[dict], Optional[float], List[float]]:
    """The runs at the learning rate with the lowest mean best validation loss."""
    by_lr: Dict[Optional[float], List[dict]] = {}
    for r in runs:
        by_lr.setdefault(r.get("lr"), []).append(r)
    lrs = sorted(x for x in by_lr if x is not None)
    if len(by_lr) == 1:
        return runs, None, lrs

    def score(group):
        vals = [r["best_val_loss"] for r in group if isinstance(r.get("best_val_loss"), (int, float))]
        return sum(vals) / len(vals) if vals else math.inf
    best = min(by_lr, key=lambda lr: (score(by_lr[lr]), lr if lr is not None else math.inf))
    return by_lr[best], best, lrs


def _cell_key(r: dict) -> tuple:
    """(task, model, preset, rank) of a run."""
    return (str(r.get("task", "?")), str(r.get("model", "?")), str(r.get("preset", "?")), int(r.get("rank", 0)))


def build_cells(rows: List[dict]) -> Dict[tuple, Cell]:
    cells: Dict[tuple, Cell] = {}
    for r in rows:
        if r.get("metrics") is None or diverged_at(r):
            continue  # diverged, or trained but not evaluated: counted as missing, not as a number
        key = _cell_key(r)
        cells.setdefault(key, Cell(*key)).runs.append(r)
    for c in cells.values():
        chosen, c.lr, c.lrs = _select_lr(c.runs)
        vals = []
        for r in chosen:
            k, v = main_metric(r.get("metrics"))
            c.metric = c.metric or k
            if v is not None:
                vals.append(float(v))
        c.seeds = len(vals)
        if vals:
            c.mean = sum(vals) / len(vals)
            c.spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else None
        c.trainable = chosen[0].get("trainable_params")
        c.share_of_lora = chosen[0].get("share_of_lora")
    return cells


def _fmt_cell(c: Optional[Cell], status: Optional[str]) -> str:
    if c is None or c.mean is None:
        return f"— ({status})" if status else "—"
    s = f"{c.mean:.1f}"
    if c.spread is not None:
        s += f" ±{c.spread:.1f}"
    if c.share_of_lora is not None:
        s += f" ({100 * c.share_of_lora:.1f}%)"
    if c.lr is not None:
        s += f" lr={c.lr:g}"
    return s


# -------------------------------------------------------------------------- missing
@dataclass
class Missing:
    task: str
    model: str
    preset: str
    rank: Optional[int]
    status: str
    where: str = ""   # job name / output folder


def _override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            return v
    return None


def _yaml_choices(path: Path) -> Dict[str, str]:
    """Group choices (model, peft, task) and ``peft.rank`` a primary config file sets itself."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    out = {}
    for item in doc.get("defaults") or [] if isinstance(doc, dict) else []:
        if isinstance(item, dict):
            for k, v in item.items():
                k = k.replace("override", "").strip().lstrip("/")
                if k in ("model", "peft", "task") and isinstance(v, str):
                    out[k] = v
    rank = _get(doc, "peft", "rank") if isinstance(doc, dict) else None
    if rank is not None:
        out["peft.rank"] = str(rank)
    return out


def _job_dir(job: dict, sweep_dir: Path) -> Path:
    """A planned job's output folder: the folder of that name beside the manifest (the same
    place unless the sweep folder was moved or copied, e.g. into a repository, and then the
    copy's own run even while the original exists), else where the manifest says."""
    out = Path(job["output_dir"])
    beside = sweep_dir / out.name  # a copy's own runs first, even while the original exists
    return beside if beside.exists() else out


def _job_identity(job: dict, out: Path) -> Tuple[str, str, str, Optional[int]]:
    """(task, model, preset, rank) of a planned job, as Hydra would compose it: the config the job
    wrote when it started (in ``out``), else its command-line overrides, else its recipe file,
    else the defaults of conf/finetune.yaml."""
    from tiedlora.config import CONF_DIR

    cfg = _run_config(out)
    ov = job.get("overrides") or []
    files = {**_yaml_choices(CONF_DIR / "finetune.yaml"),
             **(_yaml_choices(Path(job["recipe"])) if job.get("recipe") else {})}

    def pick(section, key, override):
        return _get(cfg, section, key) or _override_value(ov, override) or files.get(override) or "?"
    task, model, preset = pick("task", "name", "task"), pick("model", "name", "model"), pick("peft", "name", "peft")
    rank = _get(cfg, "peft", "rank") or _override_value(ov, "peft.rank") or files.get("peft.rank")
    try:
        rank = int(rank) if rank is not None else None
    except ValueError:
        rank = None
    return str(task), str(model), str(preset), rank


def _slurm_rows(sweep_dir: Path) -> Dict[int, dict]:
    """submit's status rows by job index; empty where Slurm does not answer here."""
    from tiedlora import submit

    try:
        return {r["index"]: r for r in submit.status(sweep_dir)}
    except (OSError, ValueError, KeyError):
        return {}


def _job_status(job: dict, out: Path, slurm: Optional[dict]) -> str:

    diverged = diverged_at(read_results(out / "results.json") or {})
    if diverged:
        return diverged
    state = ""
    if slurm is not None:
        if not slurm.get("train_id"):
            return "never submitted"
        state = str(slurm.get("train") or "")
        ev = str(slurm.get("eval") or "")
        for s in FAILED_STATES:
            if s in state:
                return f"failed ({state})"
            if s in ev:
                return f"failed in evaluation ({ev})"
        for s in LIVE_STATES:
            if s in state or s in ev:
                return "running" if "RUNNING" in state or "RUNNING" in ev else f"queued: {state or ev}"
    if not out.exists():
        return "not started"
    if (out / "results.json").is_file():
        return "not evaluated (results.json has no metrics)"
    done = "finished training; no results.json" if state.startswith("COMPLETED") else "started; no results.json"
    return done + " (running, failed or preempted: see the job's log)"


def find_missing(roots: Sequence[Path], rows: List[dict], cells: Dict[tuple, Cell]) -> List[Missing]:
    """Cells without a result: planned jobs of every ``sweep.json`` at or below ``roots`` that have
    no evaluated run, runs without metrics, and grid combinations never submitted."""
    missing: List[Missing] = []
    planned, listed = set(), set()  # listed: folders of planned jobs already accounted for
    manifests = sorted({m for root in roots if root.is_dir()
                        for m in [root / "sweep.json", *root.rglob("sweep.json")] if m.is_file()})
    for manifest in manifests:
        try:
            jobs = json.loads(manifest.read_text(encoding="utf-8"))["jobs"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}: not a sweep manifest ({e})") from None
        slurm = _slurm_rows(manifest.parent)
        for job in jobs:
            out = _job_dir(job, manifest.parent)
            ident = _job_identity(job, out)
            planned.add(ident)
            listed.add(out.resolve())
            if (out / "results.json").is_file() and ident in cells and any(
                    Path(r["_path"]).resolve() == out.resolve() for r in cells[ident].runs):
                continue
            missing.append(Missing(*ident, status=_job_status(job, out, slurm.get(job["index"]) if slurm else None),
                                   where=job.get("name", job["output_dir"])))
    for r in rows:  # runs outside any manifest that diverged, or trained but have no metrics
        if Path(r["_path"]).resolve() in listed:
            continue
        why = diverged_at(r) or ("not evaluated (results.json has no metrics)" if r.get("metrics") is None else None)
        if why:
            missing.append(Missing(str(r.get("task", "?")), str(r.get("model", "?")), str(r.get("preset", "?")),
                                   r.get("rank"), why, r["_path"]))
    # the grid: every combination of the axes seen, per (task, model)
    seen = set(cells) | planned | {(m.task, m.model, m.preset, m.rank) for m in missing}
    pairs = sorted({(t, m) for t, m, _, _ in seen})
    presets = sorted({p for _, _, p, _ in seen}, key=_preset_key)
    ranks = sorted({k for _, _, _, k in seen if k is not None})
    for t, m in pairs:
        for p in presets:
            for k in ranks:
                if (t, m, p, k) not in seen:
                    missing.append(Missing(t, m, p, k, "never submitted"))
    missing.sort(key=lambda x: (x.task, x.model, _preset_key(x.preset), x.rank or 0))
    return missing


# --------------------------------------------------------------------------- tables
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "x"


def grid_tables(cells: Dict[tuple, Cell], missing: List[Missing]) -> Dict[Tuple[str, str], Tuple[str, str]]:
    """Per (task, model): (Markdown, CSV) tables, rows preset, columns rank."""
    status = {(m.task, m.model, m.preset, m.rank): m.status for m in missing}
    out = {}
    pairs = sorted({(t, m) for t, m, _, _ in list(cells) + list(status)})
    for t, m in pairs:
        keys = [k for k in list(cells) + list(status) if k[0] == t and k[1] == m]
        presets = sorted({k[2] for k in keys}, key=_preset_key)
        ranks = sorted({k[3] for k in keys if k[3] is not None})
        metric = next((c.metric for c in cells.values() if c.task == t and c.model == m and c.metric), "metric")
        seeds = sorted({c.seeds for c in cells.values() if c.task == t and c.model == m and c.seeds})
        md = [f"### {t} on {m}: {metric}",
              "",
              f"Cells: mean {metric} over seeds (±half the range when ≥ 2 seeds; seeds per cell: "
              f"{', '.join(map(str, seeds)) or '-'}), trainable parameters as a share of LoRA's at the same "
              f"rank; lr = the rate chosen on validation loss where several were run; — = missing "
              f"(why, in brackets).",
              "",
              "| preset | " + " | ".join(f"r={k}" for k in ranks) + " |",
              "|---|" + "---|" * len(ranks)]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["task", "model", "preset", "rank", "metric", "mean", "spread", "seeds", "lr",
                    "trainable_params", "share_of_lora", "status"])
        for p in presets:
            row = []
            for k in ranks:
                c = cells.get((t, m, p, k))
                st = status.get((t, m, p, k))
                row.append(_fmt_cell(c, st))
                if c is not None and c.mean is not None:
                    w.writerow([t, m, p, k, c.metric, f"{c.mean:.4f}",
                                "" if c.spread is None else f"{c.spread:.4f}", c.seeds,
                                "" if c.lr is None else f"{c.lr:g}", c.trainable,
                                "" if c.share_of_lora is None else f"{c.share_of_lora:.6f}", "ok"])
                else:
                    w.writerow([t, m, p, k, metric, "", "", 0, "", "", "", st or "missing"])
            md.append(f"| {p} | " + " | ".join(row) + " |")
        out[(t, m)] = ("\n".join(md) + "\n", buf.getvalue())
    return out


def missing_tables(missing: List[Missing]) -> Tuple[str, str]:
    md = ["### Missing cells", ""]
    if not missing:
        md.append("None: every cell of the grid has a result.")
    else:
        md += ["| task | model | preset | rank | status | job / folder |", "|---|---|---|---|---|---|"]
        md += [f"| {x.task} | {x.model} | {x.preset} | {x.rank if x.rank is not None else '?'} | {x.status} | "
               f"{x.where or '-'} |" for x in missing]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "model", "preset", "rank", "status", "where"])
    for x in missing:
        w.writerow([x.task, x.model, x.preset, "" if x.rank is None else x.rank, x.status, x.where])
    return "\n".join(md) + "\n", buf.getvalue()


def learning_rates(rows: List[dict]) -> List[Tuple[tuple, "Bracket"]]:
    """Every cell whose runs tried two rates or more: its choice, with the tried rates beside it
    and their validation losses (tiedlora.lr_bracket; seeds averaged, a diverged one diverges)."""
    from tiedlora.lr_bracket import decide, outcomes_by

    out = [(k, decide(d)) for k, d in outcomes_by(rows, _cell_key).items() if len(d) > 1]
    return sorted(out, key=lambda kb: (kb[0][0], kb[0][1], _preset_key(kb[0][2]), kb[0][3]))


def lr_tables(brackets: List[Tuple[tuple, "Bracket"]]) -> Tuple[str, str]:
    from tiedlora.lr_bracket import DIVERGED, fmt

    def side(n):
        if n is None:
            return "none tried"
        return f"{fmt(n.lr)} (diverged)" if n.outcome == DIVERGED else f"{fmt(n.lr)} ({n.outcome:.4f})"

    md = ["### Learning rates", "",
          "Cells that tried two rates or more: the rate with the lowest validation loss, and the tried rates "
          "beside it (validation loss). A choice without a tried rate on one side is an **EDGE**: the best "
          "rate may lie beyond it.", ""]
    if not brackets:
        md.append("None: every cell ran at one rate.")
    else:
        md += ["| task | model | preset | rank | lr | val loss | below | above | tried | |", "|" + "---|" * 10]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "model", "preset", "rank", "lr", "val_loss", "lower_lr", "lower_val_loss", "upper_lr",
                "upper_val_loss", "tried", "state", "why"])
    for (t, m, p, k), b in brackets:
        flag = "" if b.state == "bracketed" else f"**EDGE**: {b.why}"
        md.append(f"| {t} | {m} | {p} | {k} | {fmt(b.chosen) if b.chosen else '-'} | "
                  f"{'-' if b.chosen_loss is None else f'{b.chosen_loss:.4f}'} | {side(b.lower)} | {side(b.upper)} | "
                  f"{', '.join(map(fmt, b.tried))} | {flag} |")
        nb = [(n.lr, None if n.outcome == DIVERGED else n.outcome) if n else (None, None) for n in (b.lower, b.upper)]
        w.writerow([t, m, p, k, b.chosen, b.chosen_loss, *nb[0], *nb[1], " ".join(map(fmt, b.tried)),
                    "bracketed" if b.state == "bracketed" else "edge", b.why])
    return "\n".join(md) + "\n", buf.getvalue()


# -------------------------------------------------------------------------- figures
def pareto_front(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Points not dominated by another (fewer or equal parameters AND higher or equal metric,
    one of them strictly), sorted by parameters."""
    front = []
    for x, y in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def write_figures(cells: Dict[tuple, Cell], out: Path) -> List[Path]:
    try:
        import matplotlib
    except ImportError:
        from tiedlora.errors import MissingPackageError

        raise MissingPackageError("figures need matplotlib: pip install 'tiedlora[report]' "
                                  "(or run with --no-figures)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    done = [c for c in cells.values() if c.mean is not None]
    written: List[Path] = []
    styles = {p: dict(marker="o", linestyle="-") for p in PRESET_ORDER}
    for b in BASELINES:
        styles[b] = dict(marker="s", linestyle="--", linewidth=2.2)
    colors = dict(zip(PRESET_ORDER, plt.get_cmap("tab10").colors))

    def _save(fig, name):
        path = out / name
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)

    # 1. per task and model: metric vs rank, a line per preset
    for t, m in sorted({(c.task, c.model) for c in done}):
        sub = [c for c in done if c.task == t and c.model == m]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in sorted({c.preset for c in sub}, key=_preset_key):
            pts = sorted((c.rank, c.mean, c.spread or 0.0) for c in sub if c.preset == p)
            ax.errorbar([x for x, _, _ in pts], [y for _, y, _ in pts], yerr=[e for _, _, e in pts], label=p,
                        capsize=3, color=colors.get(p), **styles.get(p, {}))
        ax.set_xscale("log", base=2)
        ranks = sorted({c.rank for c in sub})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(sub[0].metric or "metric")
        ax.set_title(f"{t} on {m}: {sub[0].metric} vs rank")
        ax.grid(alpha=0.3)
        ax.legend(title="preset", fontsize=8, ncol=2)
        _save(fig, f"{_slug(t)}__{_slug(m)}__rank.png")

    for m in sorted({c.model for c in done}):
        sub = [c for c in done if c.model == m]
        tasks = sorted({c.task for c in sub})
        # 2. average over tasks per preset and rank (only where every task has the cell)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in sorted({c.preset for c in sub}, key=_preset_key):
            pts = []
            for k in sorted({c.rank for c in sub}):
                vals = [c.mean for c in sub if c.preset == p and c.rank == k]
                if len(vals) == len(tasks):
                    pts.append((k, sum(vals) / len(vals)))
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=p + (" (baseline)" if p in BASELINES else ""),
                        color=colors.get(p), **styles.get(p, {}))
        ranks = sorted({c.rank for c in sub})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel("mean over tasks (ranks where every task has a result)")
        ax.set_title(f"{m}: average over {len(tasks)} task(s) ({', '.join(tasks)})")
        ax.grid(alpha=0.3)
        ax.legend(title="preset", fontsize=8, ncol=2)
        _save(fig, f"{_slug(m)}__average.png")

        # 3. metric vs trainable parameters, one panel per task, Pareto front marked
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            tc = [c for c in sub if c.task == t and c.trainable]
            for p in sorted({c.preset for c in tc}, key=_preset_key):
                pc = [c for c in tc if c.preset == p]
                ax.scatter([c.trainable for c in pc], [c.mean for c in pc], label=p, color=colors.get(p),
                           marker=styles.get(p, {}).get("marker", "o"), zorder=3)
                for c in pc:
                    ax.annotate(f"r{c.rank}", (c.trainable, c.mean), textcoords="offset points", xytext=(5, -10),
                                fontsize=7, color=colors.get(p))
            front = pareto_front([(c.trainable, c.mean) for c in tc])
            if front:
                ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black",
                        linewidth=1.2, alpha=0.7, label="Pareto front", zorder=2)
                ax.scatter([x for x, _ in front], [y for _, y in front], s=140, facecolors="none",
                           edgecolors="black", zorder=4)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("trainable parameters (log)")
            ax.set_ylabel(tc[0].metric if tc else "metric")
            ax.set_title(f"{t} on {m}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, ncol=2)
        _save(fig, f"{_slug(m)}__pareto.png")
    return written


# ----------------------------------------------------------------------------- main
def write_report(roots, out: Path, figures: bool = True) -> dict:
    """Write the tables (and figures) for the runs below ``roots`` (one folder or several, e.g. a
    learning-rate sweep and the grid that used its rates) into ``out``; return what was written."""
    roots = [Path(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
    rows = load_results(roots)
    cells = build_cells(rows)
    missing = find_missing(roots, rows, cells)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    index = [f"# Report of {', '.join(map(str, roots))}", ""]
    for (t, m), (md, text) in grid_tables(cells, missing).items():
        stem = f"{_slug(t)}__{_slug(m)}"
        atomic_write_text(out / f"{stem}.md", md)
        atomic_write_text(out / f"{stem}.csv", text)
        written += [out / f"{stem}.md", out / f"{stem}.csv"]
        index += [md, ""]
    lrs = learning_rates(rows)
    lmd, lcsv = lr_tables(lrs)
    atomic_write_text(out / "learning_rates.md", lmd)
    atomic_write_text(out / "learning_rates.csv", lcsv)
    written += [out / "learning_rates.md", out / "learning_rates.csv"]
    index += [lmd, ""]
    mmd, mcsv = missing_tables(missing)
    atomic_write_text(out / "missing.md", mmd)
    atomic_write_text(out / "missing.csv", mcsv)
    written += [out / "missing.md", out / "missing.csv"]
    index.append(mmd)
    pngs = write_figures(cells, out) if figures and cells else []
    written += pngs
    if pngs:
        index += ["", "### Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    atomic_write_text(out / "README.md", "\n".join(index) + "\n")
    written.append(out / "README.md")
    return {"rows": rows, "cells": cells, "missing": missing, "written": written, "learning_rates": lrs}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tiedlora.report",
                                description="Tables, figures and missing cells of a sweep's results.json files.")
    p.add_argument("folders", nargs="*", default=["outputs"], help="sweep folder(s) (default: outputs)")
    p.add_argument("--out", help=f"where the files go (default: <folder>/{REPORT_DIR})")
    p.add_argument("--no-figures", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--json", action="store_true", help="print the runs as JSON and write nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.json:
        print(to_json(load_results(args.folders), indent=2))
        return 0
    rows = load_results(args.folders)
    print(render(rows))
    if not rows and not any((Path(f) / "sweep.json").is_file() for f in args.folders):
        return 0
    if len(args.folders) > 1 and args.out is None:
        raise ValueError("several folders make one report: name its folder with --out")
    out = Path(args.out) if args.out else Path(args.folders[0]) / REPORT_DIR
    res = write_report(args.folders, out, figures=not args.no_figures)
    n_missing = len(res["missing"])
    print(f"\nreport: {len(res['written'])} files in {out} "
          f"({len(res['cells'])} cells with results, {n_missing} missing"
          + (f": see {out / 'missing.md'})" if n_missing else ")"))
    edges = [k for k, b in res["learning_rates"] if b.state != "bracketed"]
    if edges:
        print(f"learning rates: {len(edges)} choice(s) at the EDGE of the rates tried ("
              + ", ".join(" ".join(map(str, k)) for k in edges) + f"): see {out / 'learning_rates.md'}")
    return 0

if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
