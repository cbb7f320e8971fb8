"""``hydra/sweeper=lr_bracket`` (selected by ``+sweep=lr``): a learning-rate sweep that brackets
its choice. It runs the first rates, reads each job's ``results.json``, and asks
:mod:`tiedlora.lr_bracket` what is missing: the ladder's next rate below or above a choice that has
no tried rate beside it. It runs those too, round after round, through whichever launcher the
run uses (in-process, or ``hydra/launcher=slurm``), until every choice has a tried rate on both
sides (a diverged rate above the best counts) or a limit stops it::

    python -m tiedlora.finetune -m --config-dir recipes/gpt2b_001/squad --config-name tl6_r8 +sweep=lr
    python -m tiedlora.finetune -m +sweep=lr peft=lora,tl6 optim.lr=1e-2,3e-2   # other first rates
    python -m tiedlora.finetune -m +sweep=lr hydra.sweeper.max_rounds=3 hydra.sweeper.allow_edge=true

Every other swept parameter (``peft=lora,tl6``) is a separate choice, bracketed on its own. At the
end one line per choice names the chosen rate and its neighbours' validation losses, and
``<hydra.sweep.dir>/lr_bracket.json`` holds them. A choice left at an edge (no tried rate on one
side when ``max_rounds``, ``min_lr`` or ``max_lr`` stops the sweep) ends the command with status
2 and the reason, unless ``hydra.sweeper.allow_edge=true``. A diverged rate is an outcome here,
not a failure: a bracketed sweep exits 0 even when its highest rate diverged.
"""

from __future__ import annotations

import itertools
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper

from tiedlora.files import atomic_write_text, read_results, to_json
from tiedlora.lr_bracket import (MAX_LR, MIN_LR, Bracket, EdgeError, decide, fmt, give_up, outcome_of,
                                 require_bracketed)

LR_KEY = "optim.lr"
# Hydra instantiates sweepers only from the `hydra_plugins` namespace (see register())
_PLUGIN_MODULE = "hydra_plugins.tiedlora_lr_bracket"


@dataclass
class LRBracketSweeperConf:
    _target_: str = f"{_PLUGIN_MODULE}.LRBracketSweeper"
    lrs: List[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])  # the first round (optim.lr=a,b replaces)
    max_rounds: int = 4  # rounds at most, the first included
    min_lr: float = MIN_LR  # the sweep never tries a rate outside [min_lr, max_lr]
    max_lr: float = 1.0
    allow_edge: bool = False  # end with status 0 even when a choice has no tried rate on one side
    params: Optional[Dict[str, str]] = None  # more swept parameters, as hydra.sweeper.params of the basic sweeper


class LRBracketSweeper(Sweeper):
    def __init__(self, lrs: Sequence[float], max_rounds: int = 4, min_lr: float = MIN_LR, max_lr: float = MAX_LR,
                 allow_edge: bool = False, params: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        if max_rounds < 1:
            raise ValueError(f"hydra.sweeper.max_rounds={max_rounds!r}: must be >= 1")
        if not 0 < min_lr < max_lr:
            raise ValueError(f"hydra.sweeper.min_lr={min_lr!r}, max_lr={max_lr!r}: need 0 < min_lr < max_lr")
        self.lrs = [float(x) for x in lrs]
        self.max_rounds, self.min_lr, self.max_lr, self.allow_edge = max_rounds, min_lr, max_lr, allow_edge
        self.params = dict(params or {})
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # -- the arguments: first rates, and one choice per combination of the other swept values
    def _plan(self, arguments: List[str]):
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        lrs, others = list(self.lrs), OrderedDict()
        for o in overrides:
            key = o.get_key_element()
            if o.is_sweep_override() and not o.is_discrete_sweep():
                raise ValueError(f"{key}: the lr_bracket sweeper takes comma-separated values only "
                                 f"(got a {o.value_type.name} sweep)")
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            if key == LR_KEY:
                try:
                    lrs = [float(v) for v in values]
                except ValueError:
                    raise ValueError(f"{LR_KEY}={','.join(values)}: rates must be numbers") from None
            else:
                others[key] = [f"{key}={v}" for v in values]
        if not lrs or any(not lr > 0 for lr in lrs):
            raise ValueError(f"{LR_KEY}: the first rates must be positive numbers, got {lrs}")
        combos = [list(c) for c in itertools.product(*others.values())]
        swept = [i for i, vals in enumerate(others.values()) if len(vals) > 1]
        named = {" ".join(c): " ".join(c[i] for i in swept) or "(run)" for c in map(list, combos)}
        return sorted(set(lrs)), combos, named

    def sweep(self, arguments: List[str]) -> Any:
        from omegaconf import OmegaConf


        first, combos, named = self._plan(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # one choice per combination of the other swept values, named by those values
        outcomes: Dict[str, Dict[float, Any]] = {named[" ".join(c)]: {} for c in combos}
        asked: Dict[str, Dict[float, str]] = {k: {} for k in outcomes}  # rate -> output_dir of its job
        todo = {k: list(first) for k in outcomes}
        returns, job_idx = [], 0
        for rnd in range(1, self.max_rounds + 1):
            batch, keys = [], []
            for combo in combos:
                key = named[" ".join(combo)]
                for lr in todo.get(key, []):
                    batch.append([*combo, f"{LR_KEY}={fmt(lr)}"])
                    keys.append((key, lr))
            if not batch:
                break
            print(f"[lr sweep] round {rnd}: " + "; ".join(
                f"{k} at {', '.join(map(fmt, lrs))}" for k, lrs in todo.items() if lrs), flush=True)
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            job_idx += len(batch)
            returns.append(results)
            for (key, lr), ret in zip(keys, results):
                out = Path(str(ret.cfg.output_dir)) if ret.cfg is not None else None
                res = read_results(out / "results.json") if out is not None else None
                o = outcome_of(res) if res else None
                asked[key][lr] = str(out)
                if o is not None:
                    outcomes[key][lr] = o
            todo = {}
            for key, oc in outcomes.items():
                missing = [lr for lr in asked[key] if lr not in oc]
                if missing:
                    where = ", ".join(asked[key][lr] for lr in missing)
                    raise ValueError(f"[lr sweep] {key}: no validation loss for rate(s) {', '.join(map(fmt, missing))}"
                                     f" (validation off, or the job failed): see {where}")
                b = decide(oc, self.min_lr, self.max_lr)
                if b.state == "widen":
                    todo[key] = [lr for lr in b.next if lr not in asked[key]]
        limit = f"hydra.sweeper.max_rounds={self.max_rounds} reached"
        brackets = {k: give_up(decide(oc, self.min_lr, self.max_lr), limit) for k, oc in outcomes.items()}
        self._report(brackets, sweep_dir)
        require_bracketed(brackets, allow_edge=self.allow_edge)
        return returns

    @staticmethod
    def _report(brackets: Dict[str, Bracket], sweep_dir: Path) -> None:
        print("\n[lr sweep] chosen rates (validation loss), with the tried rates beside them:", flush=True)
        for k, b in brackets.items():
            print(f"  {k}: {b.describe()}", flush=True)
        atomic_write_text(sweep_dir / "lr_bracket.json",
                          to_json({k: b.as_json() for k, b in brackets.items()}, indent=2) + "\n")
        print(f"[lr sweep] written: {sweep_dir / 'lr_bracket.json'}", flush=True)


def register() -> None:
    """Store ``hydra/sweeper=lr_bracket`` in Hydra's ConfigStore and its class in Hydra's plugins."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    ConfigStore.instance().store(group="hydra/sweeper", name="lr_bracket", node=LRBracketSweeperConf,
                                 provider="tiedlora")
    sys.modules.setdefault(_PLUGIN_MODULE, sys.modules[__name__])
    LRBracketSweeper.__module__ = _PLUGIN_MODULE
    Plugins.instance().register(LRBracketSweeper)


__all__ = ["EdgeError", "LRBracketSweeper", "LRBracketSweeperConf", "register"]
