"""Submit fine-tuning runs to Slurm: one recipe, a Hydra sweep, or a grid of recipe files.

Each run becomes one index of a job array (``--array=0-(N-1)%K``) or, with ``--no-array``, one
job of its own; ``srun`` starts one rank per GPU in the job; the training checkpoints on the
time-limit signal and the job requeues itself; ``--eval`` chains an evaluation job after each
training run. The cluster is described once in ``conf/launcher/<name>.yaml`` (see local.yaml).

Usage::

    # a sweep of 4 runs as one job array on the one-node test cluster (.ci/slurm/start.sh)
    python -m tiedlora.submit launcher=local --sweep-dir runs/demo peft=lora,tl6 peft.rank=2,8
    # recipe files (Hydra primary configs), each crossed with the sweep overrides
    python -m tiedlora.submit launcher=ngc --sweep-dir runs/gpt2b 'recipes/gpt2b_001/squad/*.yaml'
    # write the scripts and list the jobs without submitting; then submit for real with --eval
    python -m tiedlora.submit --dry-run launcher=ngc task=squad,dialogsum peft=lora,tl6 peft.rank=8
    # what is queued, running, done (squeue/sacct) and which results.json exist
    python -m tiedlora.submit status runs/demo

Arguments with ``=`` are Hydra overrides of the recipe (sweeps: ``a,b``, ``range(...)``), except
``launcher=NAME`` (a file of conf/launcher/ or a YAML path) and ``launcher.KEY=VALUE``, which
change the cluster description; other arguments are recipe files or globs of them. Every job
gets ``output_dir=<sweep dir>/<index>-<name>`` (through the environment: any characters); the sweep folder holds ``sweep.json``,
``slurm/*.sbatch`` and ``logs/``.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tiedlora.cli import report_error
from tiedlora.files import atomic_write_text, read_results, to_json
from tiedlora.launch.cluster import ClusterConfig, load_cluster
from tiedlora.launch.sbatch import OUTPUT_DIR_ENV, OUTPUT_DIR_OVERRIDE, JobSpec, hydra_quote, render_script

MANIFEST = "sweep.json"
TRAIN_ENTRY = "tiedlora.finetune"
EVAL_ENTRY = "tiedlora.evaluate"


# ------------------------------------------------------------------------ jobs
def split_arguments(items: Sequence[str]) -> Tuple[List[str], List[str], List[str]]:
    """(recipe files, recipe overrides, launcher overrides) from the positional arguments."""
    recipes, overrides, launcher = [], [], []
    for a in items:
        key = a.split("=", 1)[0].lstrip("+~")
        if key == "launcher" or key.startswith("launcher."):
            launcher.append(a)
        elif "=" in a or a.startswith("~"):
            if key == "output_dir":
                raise ValueError(f"{a!r}: the submit command sets output_dir per job; use --sweep-dir")
            overrides.append(a)
        else:
            found = sorted(glob.glob(a, recursive=True)) if glob.has_magic(a) else [a]
            if not found:
                raise ValueError(f"{a!r}: no recipe file matches")
            for f in found:
                if not (Path(f).is_file() and Path(f).suffix in (".yaml", ".yml")):
                    raise ValueError(f"{f!r}: not a recipe YAML file (and not an override: no '=')")
                recipes.append(str(Path(f).resolve()))
    return recipes, overrides, launcher


def expand_overrides(overrides: Sequence[str]) -> List[List[str]]:
    """Hydra's sweep semantics (as BasicSweeper): ``a=1,2 b=x,y`` -> 4 override lists, in order.

    Sweep overrides are expanded by Hydra's parser; all others are kept exactly as typed.
    """
    if not overrides:
        return [[]]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    choices = []
    for text in overrides:
        ov = parser.parse_overrides([text])[0]  # (its errors name the override)
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(c) for c in itertools.product(*choices)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "x"


def job_name(index: int, recipe: Optional[str], varying: Sequence[str]) -> str:
    """``007-squad_lora_r8``-style names: index, recipe label, then what varies across the sweep."""
    parts = [recipe] if recipe else []
    for ov in varying:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        last = key.split(".")[-1]
        short = {"rank": "r"}.get(last, last)
        parts.append(value if "." not in key else f"{short}{value}")
    return f"{index:03d}-" + _slug("_".join(parts))[:80] if parts else f"{index:03d}"


def build_jobs(recipes: Sequence[str], overrides: Sequence[str], sweep_dir: Path,
               recipe_root: Optional[Path] = None) -> List[JobSpec]:
    """The runs: recipes x Hydra sweep. ``recipe_root``: pass recipe folders relative to it (the
    repository, which a container has at its own path: ``--container-workdir``)."""
    combos = expand_overrides(overrides)
    varying_keys = set()
    if len(combos) > 1:
        for i in range(len(combos[0])):
            if len({c[i] for c in combos}) > 1:
                varying_keys.add(i)
    # recipes/<model>/<task>/<preset>_r<rank>.yaml: name them by the folders that differ too
    parents = {str(Path(r).parent) for r in recipes}
    jobs = []
    for recipe in (recipes or [None]):
        label = None
        if recipe and len(recipes) > 1:
            label = f"{Path(recipe).parent.name}_{Path(recipe).stem}" if len(parents) > 1 else Path(recipe).stem
        for combo in combos:
            i = len(jobs)
            name = job_name(i, label, [ov for k, ov in enumerate(combo) if k in varying_keys])
            out = str(sweep_dir / name)
            args = []
            if recipe:
                folder = Path(recipe).parent
                if recipe_root is not None and folder.is_relative_to(recipe_root):
                    folder = folder.relative_to(recipe_root)
                args += [f"--config-dir={folder}", f"--config-name={Path(recipe).stem}"]
            args += [*combo, OUTPUT_DIR_OVERRIDE]
            jobs.append(JobSpec(index=i, name=name, output_dir=out, args=args, overrides=list(combo),
                                recipe=recipe))
    return jobs


def covering_jobs(jobs: Sequence[JobSpec]) -> List[JobSpec]:
    """A few jobs that together use every recipe file and every override value at least once."""
    seen, picked = set(), []
    for j in jobs:
        parts = {("recipe", j.recipe)} | {("override", o) for o in j.overrides}
        if parts - seen:
            picked.append(j)
            seen |= parts
    return picked


def validate(jobs: Sequence[JobSpec]) -> List[str]:
    """Compose configs as the jobs will (catches a typo before hundreds of jobs start).

    Composing takes ~0.5 s, so only :func:`covering_jobs` are composed: each recipe file and each
    override value once (a 5 x 4 x 9 grid: 16 compositions instead of 180). Returns the
    environment variables the configs read (``${oc.env:NAME}``) that are not set here; the jobs
    inherit the submitting shell's environment, so they must be exported before submitting.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tiedlora.config import CONF_DIR, register_configs, to_object

    register_configs()
    saved = dict(os.environ)
    missing: List[str] = []
    try:
        for j in covering_jobs(jobs):
            os.environ[OUTPUT_DIR_ENV] = j.output_dir
            ovs = [a for a in j.args if not a.startswith("--config-")]
            name, primary = "finetune", CONF_DIR
            if j.recipe:  # (validated from this machine's copy of the recipe)  # as --config-dir/--config-name do: the recipe's folder first, then conf/
                name, primary = Path(j.recipe).stem, Path(j.recipe).parent
                ovs.append(f"hydra.searchpath=[{hydra_quote('file://' + str(CONF_DIR))}]")
            for _ in range(10):
                GlobalHydra.instance().clear()
                try:
                    with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
                        to_object(compose(config_name=name, overrides=ovs))
                    break
                except Exception as e:  # noqa: BLE001 - reported with the job it belongs to
                    m = re.search(r"Environment variable '(\w+)' not found", str(e))
                    if m and m.group(1) not in os.environ:  # set on the cluster side: check the rest
                        missing.append(m.group(1))
                        os.environ[m.group(1)] = f"<{m.group(1)}>"
                        continue
                    raise ValueError(f"job {j.name} ({' '.join(j.overrides)}"
                                     f"{' recipe ' + j.recipe if j.recipe else ''}): {e}") from e
    finally:
        os.environ.clear()
        os.environ.update(saved)
        GlobalHydra.instance().clear()
    return missing


# ---------------------------------------------------------------------- scripts
def write_scripts(cluster: ClusterConfig, jobs: Sequence[JobSpec], sweep_dir: Path, *, array: bool,
                  with_eval: bool, eval_overrides: Sequence[str], python: str, tag: str) -> List[dict]:
    """Write the sbatch scripts atomically; return the submission plan (one dict per sbatch call)."""
    slurm_dir, log_dir = sweep_dir / "slurm", sweep_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = dict(entry=TRAIN_ENTRY, python=python, log_dir=str(log_dir), sweep_dir=str(sweep_dir))
    eval_jobs = [JobSpec(j.index, j.name, j.output_dir,
                         [OUTPUT_DIR_OVERRIDE, "parallel.pp=1", "parallel.vpp=null",
                          *eval_overrides]) for j in jobs]
    plan = []
    groups = [(jobs, eval_jobs)] if array and len(jobs) > 1 else [([j], [e]) for j, e in zip(jobs, eval_jobs)]
    for train, ev in groups:
        stem = "" if len(train) > 1 else f"-{train[0].name}"
        script = slurm_dir / f"train{stem}.sbatch"
        atomic_write_text(script, render_script(cluster, train, kind="train", job_name=f"tl-{tag}{stem}",
                                                array=len(train) > 1, **common))
        entry = {"kind": "train", "script": str(script), "indices": [j.index for j in train],
                 "array": len(train) > 1}
        plan.append(entry)
        if with_eval:
            escript = slurm_dir / f"eval{stem}.sbatch"
            atomic_write_text(escript, render_script(cluster, ev, kind="eval", job_name=f"tl-eval-{tag}{stem}",
                                                     array=len(ev) > 1, **{**common, "entry": EVAL_ENTRY}))
            # arrays: index i of the evaluation starts when index i of the training succeeded
            plan.append({"kind": "eval", "script": str(escript), "indices": entry["indices"],
                         "array": entry["array"], "after": len(plan) - 1,
                         "dependency": "aftercorr" if entry["array"] else "afterok"})
    for f in (slurm_dir / f for f in os.listdir(slurm_dir)):
        f.chmod(0o755)
    return plan


def sbatch_command(item: dict, plan: Sequence[dict]) -> List[str]:
    cmd = ["sbatch", "--parsable"]
    if "after" in item:
        dep = plan[item["after"]].get("job_id", "<job id of " + Path(plan[item["after"]]["script"]).name + ">")
        cmd.append(f"--dependency={item['dependency']}:{dep}")
    return cmd + [item["script"]]


def submit_plan(plan: List[dict]) -> None:
    for item in plan:
        cmd = sbatch_command(item, plan)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        item["job_id"] = res.stdout.strip().split(";")[0]
        item["submitted"] = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"submitted {item['kind']} {'array ' if item['array'] else ''}job {item['job_id']}: "
              f"{Path(item['script']).name}", flush=True)


def job_ids(item: dict) -> Dict[int, str]:
    """Array index -> Slurm job id as squeue/sacct print it (``123_4`` for array tasks)."""
    jid = item.get("job_id")
    if not jid:
        return {}
    return {i: f"{jid}_{i}" if item["array"] else jid for i in item["indices"]}


# ----------------------------------------------------------------------- status
def _squeue(ids: Sequence[str]) -> Dict[str, str]:
    if not ids:
        return {}
    # -t all: finished jobs too, while slurmctld still holds them (MinJobAge); sacct has the rest
    res = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(ids)],
                         capture_output=True, text=True)
    states = {}
    for line in res.stdout.splitlines():
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        states[jid.strip()] = state + (f" ({reason})" if reason and reason != "None" else "")
    return states


def _sacct(ids: Sequence[str]) -> Dict[str, str]:
    """Final states from the accounting database (empty where sacct is unavailable)."""
    if not ids:
        return {}
    try:
        res = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "--format=JobID,State,ExitCode"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        jid, state, code = (line.split("|") + ["", ""])[:3]
        out[jid] = state + (f" exit {code}" if code not in ("0:0", "") else "")
    return out


def status(sweep_dir: Path) -> List[dict]:
    """One row per job: name, Slurm ids and states (train/eval), and its folder's results.json:
    ``results`` (a completed run's exists), ``metrics``, ``diverged`` (the step it diverged at, or
    None) and ``written_by`` (the Slurm job that wrote it, when another job of this row's folder
    did: the doubled submission of a folder that another job holds writes nothing)."""
    manifest = json.loads((sweep_dir / MANIFEST).read_text())
    plan = manifest.get("submissions", [])
    ids = {kind: {} for kind in ("train", "eval")}
    for item in plan:
        ids[item["kind"]].update(job_ids(item))
    all_ids = sorted({i.split("_")[0] for d in ids.values() for i in d.values()})
    live, final = _squeue(all_ids), _sacct(all_ids)
    rows = []
    for job in manifest["jobs"]:
        row = {"index": job["index"], "name": job["name"]}
        for kind in ("train", "eval"):
            jid = ids[kind].get(job["index"])
            row[f"{kind}_id"] = jid
            row[kind] = (live.get(jid) or final.get(jid) or "not in squeue") if jid else "-"
        res = read_results(Path(job["output_dir"]) / "results.json") or {}
        diverged = res.get("status") == "diverged"
        row["results"] = bool(res) and not diverged
        row["metrics"] = res.get("metrics") if row["results"] else None
        row["diverged"] = (res.get("diverged") or {}).get("step", "?") if diverged else None
        writer = (res.get("run") or {}).get("slurm_job")
        row["written_by"] = writer if writer and row["train_id"] and writer != row["train_id"] else None
        rows.append(row)
    return rows


def print_status(sweep_dir: Path) -> None:
    rows = status(sweep_dir)
    print(f"{'job':<40} {'train':<28} {'eval':<24} results.json")
    for r in rows:
        tr = f"{r['train_id'] or '-'} {r['train']}" if r["train_id"] else "not submitted"
        ev = f"{r['eval_id']} {r['eval']}" if r["eval_id"] else "-"
        if r["written_by"]:
            res = f"no (its folder's results.json is job {r['written_by']}'s)"
        elif r["diverged"] is not None:
            res = f"no: diverged at step {r['diverged']}"
        else:
            res = "yes " + ", ".join(f"{k}={v:.1f}" for k, v in (r["metrics"] or {}).items()) if r["results"] else "no"
        print(f"{r['name']:<40} {tr:<28} {ev:<24} {res}")
    done = sum(r["results"] and not r["written_by"] for r in rows)
    diverged = sum(r["diverged"] is not None and not r["written_by"] for r in rows)
    print(f"{done}/{len(rows)} jobs have results.json" + (f"; {diverged} diverged" if diverged else ""), flush=True)


# ------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tiedlora.submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Also: python -m tiedlora.submit status SWEEP_DIR")
    p.add_argument("items", nargs="*", help="recipe files/globs, Hydra overrides, launcher=NAME, launcher.KEY=VALUE")
    p.add_argument("--sweep-dir", help="folder of this sweep (default: outputs/sweeps/<date-time>)")
    p.add_argument("--dry-run", action="store_true", help="write the scripts and list the jobs; submit nothing")
    p.add_argument("--no-array", action="store_true", help="one sbatch job per run instead of one job array")
    p.add_argument("--eval", action="store_true", help="chain an evaluation job after each training run")
    p.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the evaluation jobs (repeatable), e.g. eval.limit=500")
    p.add_argument("--no-validate", action="store_true", help="do not compose every job's config first")
    p.add_argument("--force", action="store_true", help="reuse a sweep folder whose jobs were submitted before")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        if len(argv) != 2:
            print("usage: python -m tiedlora.submit status SWEEP_DIR", file=sys.stderr)
            return 2
        print_status(Path(argv[1]))
        return 0
    args = _parser().parse_intermixed_args(argv)  # options and overrides in any order
    try:
        recipes, overrides, launcher_ovs = split_arguments(args.items)
        name = "local"
        cluster_ovs = []
        for ov in launcher_ovs:
            key, _, value = ov.partition("=")
            if key.lstrip("+") == "launcher":
                name = value
            else:
                cluster_ovs.append(f"{key.lstrip('+')[len('launcher.'):]}={value}")
        cluster = load_cluster(name, cluster_ovs)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        sweep_dir = Path(args.sweep_dir or f"outputs/sweeps/{stamp}").resolve()
        manifest_path = sweep_dir / MANIFEST
        if manifest_path.is_file() and not args.force and not args.dry_run:
            old = json.loads(manifest_path.read_text())
            if any(s.get("job_id") for s in old.get("submissions", [])):
                raise ValueError(f"{sweep_dir} holds a submitted sweep (python -m tiedlora.submit status "
                                 f"{shlex.quote(str(sweep_dir))}); pass --force to submit into it again "
                                 "(runs resume from their checkpoints)")
        # in a container the repository lives at container.workdir: recipes go by relative path
        root = Path.cwd().resolve() if cluster.container.image and cluster.container.workdir else None
        jobs = build_jobs(recipes, overrides, sweep_dir, recipe_root=root)
        missing = [] if args.no_validate else validate(jobs)
        if missing:
            msg = (f"the configs read environment variable(s) {', '.join(missing)}, unset here; the jobs "
                   "inherit this shell's environment: export them first")
            if not args.dry_run:
                raise ValueError(msg)
            print(f"warning: {msg}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a user's mistake -> one message, status 2; a bug re-raises
        return report_error(e)
    python = cluster.python or sys.executable
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", sweep_dir.name)[:40]
    plan = write_scripts(cluster, jobs, sweep_dir, array=not args.no_array, with_eval=args.eval,
                         eval_overrides=args.eval_override, python=python, tag=tag)
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "launcher": name,
                "cluster": _asdict(cluster), "argv": argv, "dry_run": args.dry_run,
                "jobs": [vars(j) for j in jobs], "submissions": plan}
    atomic_write_text(manifest_path, to_json(manifest, indent=2) + "\n")
    print(f"{len(jobs)} job(s) in {sweep_dir} (launcher={name}: {cluster.nodes} node(s) x "
          f"{cluster.ntasks_per_node} task(s), time {cluster.time})")
    for j in jobs:
        print(f"  {j.name}: {' '.join(j.overrides) or '(recipe defaults)'}"
              + (f"  [{Path(j.recipe).parent.name}/{Path(j.recipe).name}]" if j.recipe else ""))
    if args.dry_run:
        print("dry run: nothing submitted; would run:")
        for item in plan:
            print("  " + shlex.join(sbatch_command(item, plan)))
        return 0
    try:
        submit_plan(plan)
    finally:
        manifest["submissions"] = plan
        atomic_write_text(manifest_path, to_json(manifest, indent=2) + "\n")
    print(f"status: python -m tiedlora.submit status {shlex.quote(str(sweep_dir))}")
    return 0


def _asdict(cluster: ClusterConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cluster)


if __name__ == "__main__":
    from tiedlora.cli import run

    run(main)
