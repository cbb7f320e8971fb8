"""The paper's comparison in miniature: every preset x ranks x tasks on the embedded mini base,
through the Slurm launcher, with a learning rate chosen per preset and task on validation loss
and bracketed: the chosen rate has a tried rate on each side (tiedlora.lr_bracket).

    python launch/miniature_grid.py --root runs/grid            # all phases, then the report
    python launch/miniature_grid.py --root runs/grid --dry-run  # print the first submit command only
    python launch/miniature_grid.py --root runs/g --presets lora,tl6 -- eval.before=false trainer.max_steps=100

Arguments after ``--`` are Hydra overrides for every run (default: ``eval.before=false``).

Phases (each one a `python -m tiedlora.submit launcher=local` sweep folder below --root; a sweep
whose folder already has a sweep.json is not submitted again, so a rerun picks up where it stopped):

1. ``lr/round1/``: every preset at rank --lr-rank on every task, at each of --lrs, first seed.
   ``lr/round2/``, ...: per (task, preset), the rates the bracketing rule still asks for (one
   ladder step, a factor of ~3, beyond a chosen rate that has no tried neighbour on that side),
   until every pair is bracketed (a diverged run above the best counts as its upper bracket) or
   --max-rounds is reached. Each pair's choice, its neighbours and their validation losses are
   printed and written to ``ROOT/rates.json``. A pair left at an edge stops the script (exit 2,
   named) unless --allow-edge.
2. ``grid/<task>-<preset>/``: the chosen rate at every rank and seed (the lr phase's run at
   --lr-rank and the first seed is reused, so it is not run twice).
3. ``python -m tiedlora.report ROOT --out ROOT/report``: the tables, figures, missing cells and
   the learning-rate table (the report picks, per cell, the rate with the lowest validation loss
   among its runs, and flags any choice at the edge of its rates).

Each phase waits for its Slurm jobs (squeue) before the next starts. Needs a Slurm cluster
(``.ci/slurm/start.sh`` starts a one-node one) and the slurm extra (submitit).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

PRESETS = ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5", "tl6", "tl7"]


def submit(sweep_dir: Path, overrides: list[str], dry_run: bool) -> None:
    cmd = [sys.executable, "-m", "tiedlora.submit", "launcher=local", "--sweep-dir", str(sweep_dir), *overrides]
    print("$", shlex.join(cmd), flush=True)
    if dry_run:
        return
    if (sweep_dir / "sweep.json").is_file():
        print(f"  {sweep_dir}/sweep.json exists: submitted before, not again", flush=True)
        return
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def wait(sweep_dirs: list[Path], poll_s: float = 20.0) -> None:
    """Until none of the sweeps' Slurm jobs is queued or running."""
    ids = set()
    for d in sweep_dirs:
        manifest = d / "sweep.json"
        if manifest.is_file():
            ids |= {str(s["job_id"]) for s in json.loads(manifest.read_text())["submissions"] if s.get("job_id")}
    start = time.monotonic()
    while ids:
        out = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(sorted(ids))],
                             capture_output=True, text=True).stdout.split()
        live = ids & set(out)
        done = sum(len(list(d.glob("*/results.json"))) for d in sweep_dirs)
        print(f"  waiting: {done} runs with results, Slurm jobs {sorted(live) or 'none'} live "
              f"({time.monotonic() - start:.0f} s)", flush=True)
        if not live:
            return
        time.sleep(poll_s)


def outcomes(folders: list[Path], rank: int) -> dict[tuple[str, str], dict[float, object]]:
    """(task, preset) -> {rate: outcome} of the runs at ``rank`` below ``folders`` (the best
    validation loss, or "diverged"; runs without a validation loss are left out)."""
    from tiedlora.lr_bracket import outcomes_by
    from tiedlora.report import load_results

    runs = [r for r in load_results([f for f in folders if f.exists()]) if r.get("rank") == rank]
    return outcomes_by(runs, lambda r: (r["task"], r["preset"]))


def choose_rates(a, tasks: list[str], presets: list[str], seed: str, extra: list[str], submit=None, wait=None):
    """The lr phase in rounds (module docstring). Returns ({(task, preset): Bracket}, the round
    folders); the dict is empty when no run has a validation loss to choose on."""
    from tiedlora.lr_bracket import decide, fmt, give_up

    submit, wait = submit or globals()["submit"], wait or globals()["wait"]
    lr_root = a.root / "lr"
    first = lr_root / "round1"
    submit(first, [f"peft={','.join(presets)}", f"peft.rank={a.lr_rank}", f"task={','.join(tasks)}",
                   f"optim.lr={a.lrs}", f"trainer.seed={seed}", *extra], a.dry_run)
    if a.dry_run:
        print("(dry run: the later rounds and phases depend on the first round's results)")
        return {}, []
    wait([first])
    rounds = [first]
    for k in range(2, a.max_rounds + 1):
        brackets = {key: decide(o, max_lr=a.max_lr) for key, o in outcomes(rounds, a.lr_rank).items()
                    if key[0] in tasks and key[1] in presets}
        if not brackets:
            return {}, rounds
        todo: dict[tuple[str, tuple], list[str]] = {}
        for (t, pr), b in sorted(brackets.items()):
            if b.state == "widen":
                todo.setdefault((t, tuple(b.next)), []).append(pr)
        if not todo:
            break
        print(f"  round {k}: " + "; ".join(f"{t} {','.join(prs)} at {', '.join(map(fmt, lrs))}"
                                          for (t, lrs), prs in sorted(todo.items())), flush=True)
        here = lr_root / f"round{k}"
        dirs = []
        for (t, lrs), prs in sorted(todo.items()):
            d = here / f"{t}-lr{'_'.join(map(fmt, lrs))}"
            submit(d, [f"peft={','.join(prs)}", f"peft.rank={a.lr_rank}", f"task={t}",
                       f"optim.lr={','.join(map(fmt, lrs))}", f"trainer.seed={seed}", *extra], False)
            dirs.append(d)
        wait(dirs)
        rounds.append(here)
    brackets = {key: give_up(decide(o, max_lr=a.max_lr), f"--max-rounds={a.max_rounds} reached")
                for key, o in outcomes(rounds, a.lr_rank).items() if key[0] in tasks and key[1] in presets}
    return brackets, rounds


def write_rates(path: Path, brackets: dict) -> None:
    from tiedlora.files import atomic_write_text, to_json

    doc: dict = {}
    for (t, pr), b in sorted(brackets.items()):
        doc.setdefault(t, {})[pr] = b.as_json()
    atomic_write_text(path, to_json(doc, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python launch/miniature_grid.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="folder of the sweeps and the report")
    p.add_argument("--tasks", default="mini_sum,mini_qa")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--ranks", default="2,8,32")
    p.add_argument("--seeds", default="1234,1235")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="rates of the lr phase's first round")
    p.add_argument("--lr-rank", type=int, default=8, help="the rank the rates are chosen at")
    p.add_argument("--max-rounds", type=int, default=5, help="rounds of the lr phase at most (first included)")
    p.add_argument("--max-lr", type=float, default=1.0, help="the lr phase never tries a rate above this")
    p.add_argument("--allow-edge", action="store_true",
                   help="go on to the grid even where a chosen rate has no tried rate on one side")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", default=["eval.before=false"], help="Hydra overrides for every run")
    a = p.parse_args(argv)
    tasks, presets = a.tasks.split(","), a.presets.split(",")
    ranks, seeds = [int(x) for x in a.ranks.split(",")], a.seeds.split(",")
    extra = a.overrides
    if a.max_rounds < 1:
        p.error(f"--max-rounds={a.max_rounds}: must be >= 1")

    print(f"[1/3] learning rates: round 1 at {a.lrs}, rank {a.lr_rank}, seed {seeds[0]}; "
          f"then bracketing rounds (at most {a.max_rounds} in all)", flush=True)
    brackets, rounds = choose_rates(a, tasks, presets, seeds[0], extra)
    if a.dry_run:
        return 0
    if not brackets:
        from tiedlora.report import load_results

        n = len(load_results([d for d in rounds if d.exists()]))
        why = ("validation is off (trainer.val_check_interval=0 in the overrides)"
               if any(o.replace(" ", "") == "trainer.val_check_interval=0" for o in extra)
               else "see the runs' logs under that folder")
        print(f"error: the lr phase in {a.root / 'lr'} has {n} runs with results but none at rank {a.lr_rank} with a "
              f"validation loss, so no rate can be chosen: {why}", file=sys.stderr)
        return 2
    from tiedlora.lr_bracket import EdgeError, require_bracketed

    for (t, pr), b in sorted(brackets.items()):
        print(f"  {t:>12} {pr:>5}: {b.describe()}", flush=True)
    write_rates(a.root / "rates.json", brackets)
    print(f"  written: {a.root / 'rates.json'}", flush=True)
    try:
        require_bracketed({f"{t} {pr}": b for (t, pr), b in brackets.items()}, allow_edge=a.allow_edge)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = {k: b.chosen for k, b in brackets.items() if b.chosen is not None}

    print(f"[2/3] the grid: ranks {ranks} x seeds {seeds} at the chosen rates", flush=True)
    dirs = []
    for t in tasks:
        for pr in presets:
            if (t, pr) not in chosen:
                print(f"  {t} {pr}: no rate chosen in the lr phase, left out (the report lists it as missing)", flush=True)
                continue
            lr = f"optim.lr={chosen[(t, pr)]:g}"
            base = [f"peft={pr}", f"task={t}", lr, *extra]
            others = [r for r in ranks if r != a.lr_rank]
            if others:
                d = a.root / "grid" / f"{t}-{pr}"
                submit(d, [f"peft.rank={','.join(map(str, others))}", f"trainer.seed={','.join(seeds)}", *base], False)
                dirs.append(d)
            if a.lr_rank in ranks and len(seeds) > 1:
                d = a.root / "grid" / f"{t}-{pr}-r{a.lr_rank}"
                submit(d, [f"peft.rank={a.lr_rank}", f"trainer.seed={','.join(seeds[1:])}", *base], False)
                dirs.append(d)
    wait(dirs)

    print("[3/3] report", flush=True)
    subprocess.run([sys.executable, "-m", "tiedlora.report", str(a.root), "--out", str(a.root / "report")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
