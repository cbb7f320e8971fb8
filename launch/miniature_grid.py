"""The paper's comparison in miniature: every preset x ranks x tasks on the embedded mini base,
through the Slurm launcher, with a learning rate chosen per preset and task on validation loss.

    python launch/miniature_grid.py --root runs/grid            # all phases, then the report
    python launch/miniature_grid.py --root runs/grid --dry-run  # print the submit commands only
    python launch/miniature_grid.py --root runs/g --presets lora,tl6 -- eval.before=false trainer.max_steps=100

Arguments after ``--`` are Hydra overrides for every run (default: ``eval.before=false``).

Phases (each one a `python -m tiedlora.submit launcher=local` sweep folder below --root; a phase
whose folder already has a sweep.json is not submitted again, so a rerun picks up where it stopped):

1. ``lr/``: every preset at rank --lr-rank on every task, at each of --lrs, first seed.
2. ``lr-up/``: where the best rate of a (task, preset) was the largest one tried, that rate x3
   (tied presets with few trainable parameters tend to want larger rates); chosen again.
3. ``grid/<task>-<preset>/``: the chosen rate at every rank and seed (the lr phase's run at
   --lr-rank and the first seed is reused, so it is not run twice).
4. ``python -m tiedlora.report ROOT --out ROOT/report``: the tables, figures and missing cells
   (the report picks, per cell, the rate with the lowest validation loss among its runs).

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


def best_rates(folders: list[Path], rank: int) -> dict[tuple[str, str], tuple[float, list[float]]]:
    """(task, preset) -> (the rate with the lowest best validation loss at ``rank``, rates tried)."""
    from tiedlora.report import load_results

    by: dict[tuple[str, str], dict[float, float]] = {}
    for r in load_results([f for f in folders if f.exists()]):
        if r.get("rank") != rank or not isinstance(r.get("best_val_loss"), (int, float)):
            continue
        by.setdefault((r["task"], r["preset"]), {})[float(r["lr"])] = float(r["best_val_loss"])
    return {k: (min(v, key=lambda lr: (v[lr], lr)), sorted(v)) for k, v in by.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python launch/miniature_grid.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="folder of the sweeps and the report")
    p.add_argument("--tasks", default="mini_sum,mini_qa")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--ranks", default="2,8,32")
    p.add_argument("--seeds", default="1234,1235")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="rates of the lr phase")
    p.add_argument("--lr-rank", type=int, default=8, help="the rank the rates are chosen at")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", default=["eval.before=false"], help="Hydra overrides for every run")
    a = p.parse_args(argv)
    tasks, presets = a.tasks.split(","), a.presets.split(",")
    ranks, seeds = [int(x) for x in a.ranks.split(",")], a.seeds.split(",")
    extra = a.overrides
    lr_dir, up_dir = a.root / "lr", a.root / "lr-up"

    print(f"[1/4] learning rates {a.lrs} at rank {a.lr_rank}, seed {seeds[0]}", flush=True)
    submit(lr_dir, [f"peft={','.join(presets)}", f"peft.rank={a.lr_rank}", f"task={','.join(tasks)}",
                    f"optim.lr={a.lrs}", f"trainer.seed={seeds[0]}", *extra], a.dry_run)
    if a.dry_run:
        print("(dry run: the later phases depend on the lr phase's results)")
        return 0
    wait([lr_dir])

    chosen = best_rates([lr_dir], a.lr_rank)
    if not chosen:
        from tiedlora.report import load_results

        n = len(load_results([lr_dir]))
        why = ("validation is off (trainer.val_check_interval=0 in the overrides)"
               if any(o.replace(" ", "") == "trainer.val_check_interval=0" for o in extra)
               else "see the runs' logs under that folder")
        print(f"error: the lr phase in {lr_dir} has {n} runs with results but none at rank {a.lr_rank} with a "
              f"validation loss, so no rate can be chosen: {why}", file=sys.stderr)
        return 2
    top = max(float(x) for x in a.lrs.split(","))
    up = sorted({(t, pr) for (t, pr), (lr, _) in chosen.items() if lr == top})
    print(f"[2/4] best rate at the top ({top:g}) for {len(up)} (task, preset) pairs: {up or 'none'}", flush=True)
    if up:
        for t in sorted({t for t, _ in up}):
            names = [pr for tt, pr in up if tt == t]
            submit(up_dir / t, [f"peft={','.join(names)}", f"peft.rank={a.lr_rank}", f"task={t}",
                                f"optim.lr={top * 3:g}", f"trainer.seed={seeds[0]}", *extra], False)
        wait([up_dir / t for t in sorted({t for t, _ in up})])
    chosen = best_rates([lr_dir, up_dir], a.lr_rank)
    for (t, pr), (lr, tried) in sorted(chosen.items()):
        print(f"  {t:>12} {pr:>5}: lr {lr:g} (of {', '.join(f'{x:g}' for x in tried)})", flush=True)

    print(f"[3/4] the grid: ranks {ranks} x seeds {seeds} at the chosen rates", flush=True)
    dirs = []
    for t in tasks:
        for pr in presets:
            if (t, pr) not in chosen:
                print(f"  {t} {pr}: no lr-phase result, left out (the report lists it as missing)", flush=True)
                continue
            lr = f"optim.lr={chosen[(t, pr)][0]:g}"
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

    print("[4/4] report", flush=True)
    subprocess.run([sys.executable, "-m", "tiedlora.report", str(a.root), "--out", str(a.root / "report")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
