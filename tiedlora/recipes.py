"""Generate the paper's recipe grid: ``recipes/<model>/<task>/<preset>_r<rank>.yaml``.

The paper's two bases x five tasks x nine presets x four ranks = 360 Hydra primary configs,
plus LLaMA-3.1-8B x five tasks x (LoRA, VeRA, TL6) x four ranks = 60, each a
few lines: ``defaults`` composing ``conf/finetune.yaml`` with the model, preset and task
groups and the paper's training settings (``conf/sweep/paper_settings.yaml``), then the
rank and the parallel layout of one 8-GPU node. Also generated: ``recipes/README.md``
(the grid with its commands) and ``recipes/<model>/grid.yaml`` (the same grid as one
Hydra multirun), so the grid lives in ``recipes/`` alone. Run a recipe with::

    export GPT2B_001=/path/to/GPT-2B-001_bf16_tp1.nemo     # or model.checkpoint=... on the command line
    torchrun --nproc_per_node 8 -m tiedlora.finetune --config-dir recipes/gpt2b_001/squad --config-name tl6_r8

Regenerate after changing this file (``tests/test_recipes.py`` fails while the committed
files differ from what it writes)::

    python -m tiedlora.recipes            # write; stale recipe files are removed
    python -m tiedlora.recipes --check    # exit 1 and list the files that differ
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = "recipes"
GENERATOR = "python -m tiedlora.recipes"

PRESETS = ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5", "tl6", "tl7"]  # conf/peft
RANKS = [2, 8, 32, 128]
TASKS = {  # conf/task name -> (title, metric shown in the README)
    "squad": ("SQuAD v1.1", "EM / F1"),
    "dialogsum": ("DialogSum", "ROUGE-L"),
    "hellaswag": ("HellaSwag", "accuracy"),
    "iwslt2017_de_en": ("IWSLT 2017 de→en", "BLEU"),
    "gsm8k": ("GSM8K", "accuracy"),
}


@dataclass(frozen=True)
class Base:
    """A base model of the grid and its layout on one node of ``gpus`` GPUs."""

    title: str
    checkpoint: str  # what model.checkpoint points at
    env: str  # shell variable used in the README's commands
    tp: int
    sp: bool
    why: str  # one-line justification of the layout
    bos: str = ""  # why the recipes set task.add_bos (empty: they do not)
    gpus: int = 8
    presets: tuple = tuple(PRESETS)  # the presets of this base's grid

    @property
    def dp(self) -> int:
        return self.gpus // self.tp


MODELS: Dict[str, Base] = {
    "gpt2b_001": Base(
        title="GPT-2B-001", checkpoint="GPT-2B-001_bf16_tp1.nemo", env="GPT2B_001", tp=1, sp=False,
        why="2B in bf16 is ~5 GB, 4 x 2048-token micro-batches fit one 80 GB GPU: no model parallelism"),
    "llama2_7b": Base(
        title="LLaMA-2-7B", checkpoint="a Hugging Face Llama-2-7b-hf folder", env="LLAMA2_7B", tp=2, sp=True,
        bos="LLaMA-2 saw <s> at the start of every pretraining document",
        why="13.5 GB of bf16 weights plus 4 x 2048-token activations (no recompute) overflow one 80 GB GPU; "
            "TP=2 with sequence parallel halves both"),
    # Not in the paper: the base most adapters are trained on today, with the three methods that
    # frame Tied-LoRA (LoRA, VeRA, the paper's recommended TL6)
    "llama3_8b": Base(
        title="LLaMA-3.1-8B", checkpoint="a Hugging Face Llama-3.1-8B folder", env="LLAMA3_8B", tp=2, sp=True,
        bos="LLaMA-3 saw <|begin_of_text|> at the start of every document", presets=("lora", "vera", "tl6"),
        why="16 GB of bf16 weights, ~40 GB of 4 x 2048-token activations and ~15 GB of 128k-vocabulary logits "
            "leave no headroom on one 80 GB GPU; TP=2 with sequence parallel halves all three (~35 GB)"),
}


# ------------------------------------------------------------------------- rendering
def recipe_path(model: str, task: str, preset: str, rank: int) -> str:
    return f"{RECIPES}/{model}/{task}/{preset}_r{rank}.yaml"


def run_command(model: str, task: str, preset: str, rank: int) -> str:
    b = MODELS[model]
    return (f"torchrun --nproc_per_node {b.gpus} -m tiedlora.finetune --config-dir {RECIPES}/{model}/{task} "
            f"--config-name {preset}_r{rank}")


def _c(code: str, comment: str) -> str:
    """A YAML line with its comment in column 35, like the hand-written files."""
    return f"{code:<33} # {comment}"


def _layout(b: Base) -> List[str]:
    return [_c("parallel:", b.why),
            _c(f"  tp: {b.tp}", f"tensor parallel; dp = {b.gpus} GPUs / tp = {b.dp}"),
            _c("  pp: 1", "pipeline parallel"),
            _c(f"  sp: {str(b.sp).lower()}", "sequence parallel (with tp >= 2)")]


def _model_lines(b: Base) -> List[str]:
    lines = ["model:", _c(f"  checkpoint: ${{oc.env:{b.env}}}",
                          f"{b.checkpoint}: export {b.env}=... or set model.checkpoint=...")]
    if b.bos:
        lines += ["task:", _c("  add_bos: true", b.bos)]
    return lines


def render_recipe(model: str, task: str, preset: str, rank: int) -> str:
    b = MODELS[model]
    lines = [
        "# @package _global_",
        f"# {'Paper grid' if b.presets == tuple(PRESETS) else 'Grid beyond the paper'}: {b.title}, "
        f"{TASKS[task][0]}, {preset} at rank {rank} "
        f"(generated by `{GENERATOR}`: edit the generator, not this file).",
        f"# Used by: {run_command(model, task, preset, rank)}",
        f"# Override example: ... --config-name {preset}_r{rank} model.checkpoint=/ckpt/other optim.lr=3e-4 "
        f"task.data_dir=/datasets/{task}",
        "defaults:",
        _c("  - /finetune", "conf/finetune.yaml: schema, checkpointing, Hydra settings"),
        _c("  - /sweep/paper_settings", "the paper's optimizer, batch, validation and evaluation settings"),
        f"  - override /model: {model}",
        f"  - override /peft: {preset}",
        f"  - override /task: {task}",
        "  - _self_",
        "",
        *_model_lines(b),
        "peft:",
        f"  rank: {rank}",
        *_layout(b),
        "",
    ]
    return "\n".join(lines)


def grid_path(model: str) -> str:
    return f"{RECIPES}/{model}/grid.yaml"


def grid_command(model: str, *overrides: str) -> str:
    return " ".join(["python -m tiedlora.finetune -m", f"--config-dir {RECIPES}/{model} --config-name grid", *overrides])


def render_grid(model: str) -> str:
    b = MODELS[model]
    n = len(TASKS) * len(b.presets) * len(RANKS)
    lines = [
        "# @package _global_",
        f"# The grid on {b.title} as one Hydra multirun: {len(TASKS)} tasks x {len(b.presets)} presets x "
        f"{len(RANKS)} ranks = {n} runs, the recipes beside this file (generated by `{GENERATOR}`).",
        f"# Used by: {grid_command(model, 'hydra/launcher=submitit_slurm')}   "
        f"(one {b.gpus}-GPU job each; export {b.env}=<checkpoint> first)",
        "# Override example: ... --config-name grid task=squad peft=tl6,lora   (a command-line value replaces that axis)",
        "defaults:",
        _c("  - /finetune", "conf/finetune.yaml: schema, checkpointing, Hydra settings"),
        _c("  - /sweep/paper_settings", "the paper's training settings, as in every recipe"),
        f"  - override /model: {model}",
        "  - _self_",
        "",
        *_model_lines(b),
        *_layout(b),
        "hydra:",
        "  sweep:",
        _c(f"    dir: outputs/multirun/paper_{model}", "Hydra's and the launcher's logs; each run writes output_dir"),
        "  sweeper:",
        "    params:",
        f"      task: {','.join(TASKS)}",
        f"      peft: {','.join(b.presets)}",
        f"      peft.rank: {','.join(map(str, RANKS))}",
        "",
    ]
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> List[tuple]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def render_readme(root: Path = ROOT) -> str:
    settings = yaml.safe_load((root / "conf" / "sweep" / "paper_settings.yaml").read_text())
    total = sum(len(TASKS) * len(b.presets) * len(RANKS) for b in MODELS.values())
    paper = [b.title for b in MODELS.values() if b.presets == tuple(PRESETS)]
    extra = [b for b in MODELS.values() if b.presets != tuple(PRESETS)]
    out = [
        "# Recipes: the paper's grid",
        "",
        f"Generated by `{GENERATOR}` (tiedlora/recipes.py); do not edit by hand: `tests/test_recipes.py` fails",
        "when these files and the generator disagree, and composes every recipe.",
        "",
        f"`recipes/<model>/<task>/<preset>_r<rank>.yaml`, {total} recipes: the paper's bases ({', '.join(paper)}) x "
        f"{len(TASKS)} tasks x {len(PRESETS)} presets ({', '.join(PRESETS)}) x ranks {', '.join(map(str, RANKS))}, and "
        + "; ".join(f"{b.title} with {', '.join(b.presets)} only" for b in extra)
        + ". Each is a Hydra primary config of a few lines: it",
        "composes `conf/finetune.yaml` with the model, preset and task groups and the paper's training",
        "settings (`conf/sweep/paper_settings.yaml`), and sets the rank and the parallel layout of one",
        "8-GPU node. Conf groups are found because `tiedlora.finetune` always searches `conf/`;",
        "`--config-dir` adds the recipe's folder.",
        "",
        "## Run one recipe",
        "",
        "```bash",
        "python -m tiedlora.prepare_data task=squad            # once per task: data/squad/{train,validation,test}.jsonl",
        "export GPT2B_001=/path/to/GPT-2B-001_bf16_tp1.nemo LLAMA2_7B=/path/to/Llama-2-7b-hf   # read by the recipes",
        "export LLAMA3_8B=/path/to/Llama-3.1-8B",
        run_command("gpt2b_001", "squad", "tl6", 8),
        "```",
        "",
        "Everything lands in `outputs/paper/<model>/<task>/<preset>_r<rank>/` (checkpoints, metrics,",
        "`adapter.safetensors`, `results.json`); rerunning the command resumes. Any key can be overridden",
        "on the command line (`optim.lr=3e-4`, `task.data_dir=...`). Trainable parameters of every cell:",
        "`python -m tiedlora.params all=true model=gpt2b_001` (or `model=llama2_7b`, `model=llama3_8b`).",
        "",
        "## Shared settings (conf/sweep/paper_settings.yaml)",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| `{k}` | `{v}` |" for k, v in _flatten(settings)],
        "",
        "## Learning rates",
        "",
        "Every recipe uses the paper's rate, 1e-4, for every preset (`optim.lr` in",
        "`conf/sweep/paper_settings.yaml`), so that the grid is the paper's setting. That one rate is",
        "unlikely to be every preset's best. AdamW moves each trainable entry by about `lr` per step",
        "whatever its gradient's scale, so what a step does depends on the preset: a tied A or B gets",
        "the sum of the L layers' gradients, and one step of it changes every layer at once (up to L",
        "times a per-layer factor's effect: a lower rate suits it), while presets that start from a",
        "zero v with a random B (VeRA, TL1, TL2, TL6, TL7) change ΔW about √r times less per step of",
        "`lr` than LoRA's zero B does (a higher rate suits them). Which effect wins is measured, not",
        "assumed: on the embedded mini base the tied presets chose higher rates than LoRA (each",
        "preset's `lr` in `conf/peft/`; the sweep in docs/results/, and docs/design.md, 'Learning",
        "rates'). To choose a rate for your preset, base and task, bracket it on validation loss:",
        "",
        "```bash",
        "python -m tiedlora.finetune -m +sweep=lr --config-dir recipes/gpt2b_001/squad --config-name tl6_r8",
        "```",
        "",
        "It starts at 3e-5, 1e-4 and 3e-4 and adds rates (x3 or /3) until the best one has a worse (or",
        "diverged) rate beside it on both sides; the chosen rate and its neighbours' validation losses",
        "are printed and written to `<hydra.sweep.dir>/lr_bracket.json`. Then run the recipe with",
        "`optim.lr=<chosen>`.",
        "",
        "## Layout on one 8-GPU node",
        "",
        "| model | tp | pp | sp | dp | micro-batches per step | why |",
        "|---|---|---|---|---|---|---|",
    ]
    gbs, mbs = settings["trainer"]["global_batch_size"], settings["trainer"]["micro_batch_size"]
    for name, b in MODELS.items():
        out.append(f"| {b.title} (`{name}`) | {b.tp} | 1 | {str(b.sp).lower()} | {b.dp} | "
                   f"{gbs // (mbs * b.dp)} | {b.why} |")
    out += [
        "",
        "## The grid",
        "",
        f"Each row is a group of recipes (its presets x {len(RANKS)} ranks). The \"one node\"",
        "command runs them one after another; the \"sweep\" command submits them as one Hydra multirun",
        "(add the Slurm launcher's overrides, e.g. `hydra/launcher=submitit_slurm`; each job needs one node).",
        "",
        "| model | task | metric | data | recipes | one node, one after another | sweep |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, b in MODELS.items():
        for task, (title, metric) in TASKS.items():
            folder = f"{RECIPES}/{model}/{task}"
            loop = (f"`for r in {folder}/*.yaml; do torchrun --nproc_per_node {b.gpus} -m tiedlora.finetune "
                    f"--config-dir {folder} --config-name $(basename $r .yaml); done`")
            sweep = f"`{grid_command(model, f'task={task}')}`"
            out.append(f"| {b.title} | {title} | {metric} | `python -m tiedlora.prepare_data task={task}` | "
                       f"[`{folder}/`]({model}/{task}) | {loop} | {sweep} |")
    out += [
        "",
        f"Whole grid of one model ({len(TASKS) * len(PRESETS) * len(RANKS)} runs for a paper base): "
        f"`{grid_command('gpt2b_001', 'hydra/launcher=submitit_slurm')}`",
        "(`recipes/<model>/grid.yaml`). Learning-rate sweep of one recipe: `python -m tiedlora.finetune -m",
        "--config-dir recipes/gpt2b_001/squad --config-name tl6_r8 +sweep=lr` (outputs in",
        "`outputs/lr_sweep/...`, one folder per rate).",
        "",
    ]
    return "\n".join(out)


def generated(root: Path = ROOT) -> Dict[str, str]:
    """Every generated file: path relative to the repository root -> text."""
    files = {recipe_path(m, t, p, r): render_recipe(m, t, p, r)
             for m, b in MODELS.items() for t in TASKS for p in b.presets for r in RANKS}
    files[f"{RECIPES}/README.md"] = render_readme(root)
    files.update({grid_path(m): render_grid(m) for m in MODELS})
    return files


def stale(root: Path, files: Dict[str, str]) -> List[str]:
    """Recipe files under recipes/<model>/ that the generator no longer writes."""
    found = [p.relative_to(root).as_posix() for p in (root / RECIPES).glob("*/*/*.yaml")]
    found += [p.relative_to(root).as_posix() for p in (root / RECIPES).glob("*/*.yaml")]
    return sorted(p for p in found if p not in files)


def drift(root: Path = ROOT) -> List[str]:
    """Generated files that are missing or differ on disk, and stale ones; [] when in sync."""
    files = generated(root)
    bad = [p for p, text in sorted(files.items())
           if not (root / p).is_file() or (root / p).read_text(encoding="utf-8") != text]
    return bad + [f"{p} (stale)" for p in stale(root, files)]


def write(root: Path = ROOT) -> int:
    files = generated(root)
    changed = 0
    for rel, text in files.items():
        path = root / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        changed += 1
    for rel in stale(root, files):
        (root / rel).unlink()
        changed += 1
    return changed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog=GENERATOR, description="Generate recipes/ (every recipe, each model's grid.yaml, README.md).")
    p.add_argument("--check", action="store_true", help="exit 1 if the files on disk differ from the generator")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = p.parse_args(argv)
    if args.check:
        bad = drift(args.root)
        if bad:
            print(f"{len(bad)} generated file(s) out of date; run `{GENERATOR}`:", *bad[:20], sep="\n  ")
            sys.exit(1)
        print(f"{len(generated(args.root))} generated files up to date")
        return
    n = write(args.root)
    print(f"{n} file(s) written or removed; {len(generated(args.root))} generated files in total")


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
