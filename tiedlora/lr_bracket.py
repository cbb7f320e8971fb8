"""Bracketing a learning rate: the rule shared by the miniature grid, the ``+sweep=lr`` sweeper
and the report.

A rate is *chosen* on validation loss, and the choice is only trusted when a tried rate sits on
each side of it: a lower rate that did worse, and a higher rate that did worse or diverged. A rate
chosen at the edge of what was tried says "go further", not "this is the best rate"; so does a
neighbour more than one ladder step away. So a sweep runs
in rounds: try a few rates, ask :func:`decide` what is missing, try that, and so on, until every
choice is bracketed, or a limit stops it (then the choice is reported as an *edge*, and refused
unless the caller allows edges).

Rates live on a ladder of two steps per decade, 1 and 3 (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, ...): one
step is a factor of about 3, the spacing at which the loss of a 200-step run still changes
measurably. A rate off the ladder (5e-5, say) is bracketed by the ladder's rates around it.

    >>> b = decide({1e-3: 2.1, 3e-3: 1.9, 1e-2: 1.7})
    >>> b.chosen, b.state, b.next
    (0.01, 'widen', [0.03])
    >>> decide({1e-3: 2.1, 3e-3: 1.9, 1e-2: 1.7, 3e-2: "diverged"}).state
    'bracketed'

Outcomes are a run's best validation loss (a finite number), or ``"diverged"`` (its results.json
says ``"status": "diverged"``, or its loss is not finite). A divergence above the best rate is an
upper bracket: the rate cannot go higher. Several runs at one rate (seeds) are averaged by the
caller before they get here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Union

DIVERGED = "diverged"
Outcome = Union[float, str]  # best validation loss, or DIVERGED

MIN_LR = 1e-7  # the ladder's ends: a sweep never goes past them
MAX_LR = 10.0


def ladder(lo: float, hi: float) -> List[float]:
    """The ladder's rates in [lo, hi] (1 and 3 per decade), as clean floats (3e-2, not 0.030000000000000002)."""
    out = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 3):
            x = float(f"{m}e{e}")
            if lo * (1 - 1e-9) <= x <= hi * (1 + 1e-9):
                out.append(x)
    return out


def step_up(lr: float) -> float:
    """The ladder's next rate above ``lr``."""
    return min(x for x in ladder(lr, lr * 10) if x > lr * (1 + 1e-9))


def step_down(lr: float) -> float:
    """The ladder's next rate below ``lr``."""
    return max(x for x in ladder(lr / 10, lr) if x < lr * (1 - 1e-9))


def fmt(lr: float) -> str:
    return f"{lr:g}"


def outcome_of(result: Mapping) -> Optional[Outcome]:
    """A results.json (dict) -> its outcome: DIVERGED, the best validation loss, or None (no
    validation loss: validation was off, or the run has not finished)."""
    if result.get("status") == DIVERGED:
        return DIVERGED
    v = result.get("best_val_loss")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else DIVERGED


def mean_outcome(outcomes: Sequence[Outcome]) -> Outcome:
    """Several runs at one rate (seeds): the mean loss; diverged when any of them diverged."""
    if any(o == DIVERGED for o in outcomes):
        return DIVERGED
    return sum(outcomes) / len(outcomes)


def outcomes_by(results: Iterable[Mapping], key: Callable[[Mapping], Hashable]) -> Dict[Hashable, Dict[float, Outcome]]:
    """Runs (results.json dicts carrying their ``lr``) grouped by ``key(run)``, then by rate:
    ``{key: {rate: outcome}}``, seeds averaged by :func:`mean_outcome`. Runs without a rate or
    an outcome (no validation loss) are left out."""
    by: Dict[Hashable, Dict[float, list]] = {}
    for r in results:
        o = outcome_of(r)
        lr = r.get("lr")
        if o is None or isinstance(lr, bool) or not isinstance(lr, (int, float)):
            continue
        by.setdefault(key(r), {}).setdefault(float(lr), []).append(o)
    return {k: {lr: mean_outcome(v) for lr, v in d.items()} for k, d in by.items()}


@dataclass
class Neighbour:
    lr: float
    outcome: Outcome

    def describe(self) -> str:
        o = self.outcome if self.outcome == DIVERGED else f"val loss {self.outcome:.4f}"
        return f"{fmt(self.lr)} ({o})"


@dataclass
class Bracket:
    """What :func:`decide` found for one (task, preset, ...) key.

    ``state``: ``bracketed`` (a tried rate on both sides of ``chosen``; the upper one may have
    diverged), ``widen`` (``next`` holds the rates to try), or ``edge`` (no neighbour on one side
    and no rate left to try there: ``why`` says which limit)."""

    chosen: Optional[float]
    chosen_loss: Optional[float]
    lower: Optional[Neighbour]
    upper: Optional[Neighbour]
    tried: List[float]
    state: str
    next: List[float] = field(default_factory=list)
    why: str = ""

    def describe(self) -> str:
        if self.chosen is None:
            return f"no rate chosen: {self.why}"
        s = f"lr {fmt(self.chosen)} (val loss {self.chosen_loss:.4f})"
        s += "; below " + (self.lower.describe() if self.lower else "nothing tried")
        s += "; above " + (self.upper.describe() if self.upper else "nothing tried")
        if self.state == "edge":
            s += f"  EDGE: {self.why}"
        elif self.state == "widen":
            s += f"  ({self.why}; next: {', '.join(map(fmt, self.next))})"
        return s

    def as_json(self) -> dict:
        def nb(n: Optional[Neighbour]):
            return None if n is None else {"lr": n.lr, "val_loss": None if n.outcome == DIVERGED else n.outcome,
                                           "diverged": n.outcome == DIVERGED}
        return {"lr": self.chosen, "val_loss": self.chosen_loss, "lower": nb(self.lower), "upper": nb(self.upper),
                "tried": self.tried, "state": self.state, "why": self.why or None}


def decide(outcomes: Mapping[float, Outcome], min_lr: float = MIN_LR, max_lr: float = MAX_LR) -> Bracket:
    """The chosen rate of ``outcomes`` ({rate: outcome}), its neighbours, and what to try next.

    The chosen rate has the lowest validation loss (ties: the smaller rate). Its lower neighbour
    is the largest tried rate below it, its upper neighbour the smallest tried rate above it (a
    diverged one counts). A missing neighbour, or one more than a ladder step away (1e-3 chosen,
    1e-1 the next rate tried above: the best may lie between), asks for the ladder's next rate on
    that side; past ``min_lr``/``max_lr`` a missing neighbour makes the choice an edge. When every
    rate diverged, the next rate is one step below the lowest tried."""
    outcomes = {float(lr): o for lr, o in outcomes.items()}
    tried = sorted(outcomes)
    if not tried:
        raise ValueError("no rates tried")
    finite = {float(lr): float(o) for lr, o in outcomes.items() if o != DIVERGED}
    if not finite:
        down = step_down(tried[0])
        if down < min_lr * (1 - 1e-9):
            return Bracket(None, None, None, None, tried, "edge",
                           why=f"every rate tried diverged ({', '.join(map(fmt, tried))}) and {fmt(down)} is "
                               f"below the lowest rate allowed ({fmt(min_lr)})")
        return Bracket(None, None, None, None, tried, "widen", [down], why="every rate tried diverged")
    chosen = min(finite, key=lambda lr: (finite[lr], lr))
    below = [lr for lr in tried if lr < chosen]
    above = [lr for lr in tried if lr > chosen]
    lower = Neighbour(below[-1], outcomes[below[-1]]) if below else None
    upper = Neighbour(above[0], outcomes[above[0]]) if above else None
    nxt, limits, gaps = [], [], []
    down, up = step_down(chosen), step_up(chosen)
    if lower is None or lower.lr < down * (1 - 1e-9):  # none, or more than one ladder step away
        gaps.append("nothing tried below it" if lower is None else
                    f"the nearest rate tried below it, {fmt(lower.lr)}, is more than a ladder step away")
        if down >= min_lr * (1 - 1e-9):
            nxt.append(down)
        elif lower is None:
            limits.append(f"nothing tried below it, and {fmt(down)} is below the lowest rate allowed ({fmt(min_lr)})")
    if upper is None or upper.lr > up * (1 + 1e-9):
        gaps.append("nothing tried above it" if upper is None else
                    f"the nearest rate tried above it, {fmt(upper.lr)}, is more than a ladder step away")
        if up <= max_lr * (1 + 1e-9):
            nxt.append(up)
        elif upper is None:
            limits.append(f"nothing tried above it, and {fmt(up)} is above the highest rate allowed ({fmt(max_lr)})")
    if limits:
        return Bracket(chosen, finite[chosen], lower, upper, tried, "edge", why="; ".join(limits))
    if nxt:
        return Bracket(chosen, finite[chosen], lower, upper, tried, "widen", nxt, why="; ".join(gaps))
    return Bracket(chosen, finite[chosen], lower, upper, tried, "bracketed")


def give_up(b: Bracket, why: str) -> Bracket:
    """``b`` marked as an edge because the sweep stopped (e.g. its round limit) while it still
    asked for more rates."""
    if b.state != "widen":
        return b
    return Bracket(b.chosen, b.chosen_loss, b.lower, b.upper, b.tried, "edge",
                   why=f"{why}; it still asked for {', '.join(map(fmt, b.next))} ({b.why})")


class EdgeError(ValueError):
    """A rate was chosen without a tried neighbour on both sides (and edges were not allowed)."""


def require_bracketed(brackets: Dict[str, Bracket], allow_edge: bool = False) -> None:
    """Raise :class:`EdgeError` naming every key whose choice is not bracketed, unless
    ``allow_edge`` (then the caller reports them as edges)."""
    bad = {k: b for k, b in brackets.items() if b.state != "bracketed"}
    if not bad or allow_edge:
        return
    lines = [f"  {k}: {b.describe() if b.chosen is not None else b.why} (tried {', '.join(map(fmt, b.tried))})"
             for k, b in sorted(bad.items())]
    raise EdgeError(f"{len(bad)} learning-rate choice(s) without a tried rate on both sides:\n" + "\n".join(lines)
                    + "\nwiden the sweep (more rounds, or other rates), or accept the edge explicitly "
                      "(--allow-edge / allow_edge=true)")
