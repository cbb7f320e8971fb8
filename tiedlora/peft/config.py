"""Typed, self-validating adapter configuration (``conf/peft/*.yaml``).

Every preset (LoRA, VeRA, TL1-TL7) is nothing but flags on four factors::

    h = W x + s * v ⊙ B( u ⊙ A(dropout(x)) )        s = alpha / r

    A: (r, d_in)   B: (d_out, r)   u: (r,)   v: (d_out,)

Each factor is ``trainable`` or frozen; A and B are ``tied`` (one tensor shared by all
layers of a target kind) or per layer; u and v are always per layer. A frozen vector
initialised to ones is the identity and is not allocated at all.

Default initialisation (each overridable with ``<factor>.init``):

* A: kaiming-uniform.  B: zeros when v is frozen, else kaiming-uniform.
* u: ones.  v: zeros when v is trainable, else ones.

so that ΔW = 0 at step 0 and exactly one factor, a trainable one, starts at zero (two
zero factors would be a saddle where neither receives a gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")  # column-parallel in megatron-core
ROW_TARGETS = ("linear_proj", "linear_fc2")  # row-parallel in megatron-core
FACTORS = ("A", "B", "u", "v")
NAMED_INITS = ("kaiming_uniform", "zeros", "ones", "normal")


def parse_init(value: Optional[str], where: str) -> Optional[str | float]:
    """An init is one of NAMED_INITS or a number (a constant fill)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip()
    if s in NAMED_INITS:
        return s
    try:
        num = float(s)
    except ValueError:
        raise ValueError(
            f"{where}={value!r}: expected one of {list(NAMED_INITS)} or a number") from None
    if not math.isfinite(num):
        raise ValueError(f"{where}={value!r}: must be finite")
    return num


@dataclass
class FactorConfig:
    trainable: bool = True
    tied: bool = False  # A and B only: one tensor shared by every layer of a target kind
    init: Optional[str] = None  # None: the default rule (module docstring); or a name / number


@dataclass
class PeftConfig:
    """Adapter configuration; ``__post_init__`` validates and names any bad field."""

    name: str = "tl6"  # preset name (informational; behaviour comes from the flags only)
    rank: int = 8  # r
    alpha: Optional[float] = None  # s = alpha / r; None: alpha = r (s = 1)
    dropout: float = 0.0  # on the adapter input
    target_modules: List[str] = field(default_factory=lambda: ["linear_qkv"])
    seed: int = 1234  # seeds frozen random factors and all adapter inits
    A: FactorConfig = field(default_factory=lambda: FactorConfig(trainable=True, tied=True))
    B: FactorConfig = field(default_factory=lambda: FactorConfig(trainable=True, tied=True))
    u: FactorConfig = field(default_factory=FactorConfig)
    v: FactorConfig = field(default_factory=FactorConfig)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"peft.rank={self.rank!r}: must be a positive integer")
        if self.alpha is not None and (not math.isfinite(float(self.alpha)) or self.alpha <= 0):
            raise ValueError(f"peft.alpha={self.alpha!r}: must be a positive number (or null for alpha = rank)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"peft.dropout={self.dropout!r}: must be in [0, 1)")
        targets = list(self.target_modules)
        if not targets:
            raise ValueError("peft.target_modules=[]: name at least one of " + ", ".join(TARGETS))
        for t in targets:
            if t not in TARGETS:
                raise ValueError(
                    f"peft.target_modules: unknown target {t!r}; expected some of {list(TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"peft.target_modules={targets}: duplicate target")
        self.target_modules = targets
        for name in FACTORS:
            f = getattr(self, name)
            if isinstance(f, dict):  # built from plain dicts (tests, checkpoints)
                f = FactorConfig(**f)
                setattr(self, name, f)
            f.init = parse_init(f.init, f"peft.{name}.init")
        for name in ("u", "v"):
            if getattr(self, name).tied:
                raise ValueError(
                    f"peft.{name}.tied=True: u and v are per-layer scaling vectors and cannot be tied")
        self._check_start()

    # -- initialisation -----------------------------------------------------------------
    def resolved_init(self, factor: str) -> str | float:
        """The init a factor actually gets (explicit ``init`` or the default rule)."""
        f = getattr(self, factor)
        if f.init is not None:
            return f.init
        if factor == "A":
            return "kaiming_uniform"
        if factor == "B":
            return "kaiming_uniform" if self.v.trainable else "zeros"
        if factor == "u":
            return "ones"
        return "zeros" if self.v.trainable else "ones"

    def is_identity(self, factor: str) -> bool:
        """A frozen vector of ones: not allocated, skipped in the forward pass."""
        return (factor in ("u", "v") and not getattr(self, factor).trainable
                and self.resolved_init(factor) in ("ones", 1.0))

    def _check_start(self):
        zero = [f for f in FACTORS if self.resolved_init(f) in ("zeros", 0.0)]
        if not any(getattr(self, f).trainable for f in FACTORS):
            raise ValueError(f"peft ({self.name}): every factor is frozen; nothing would train")
        if not zero:
            raise ValueError(
                f"peft ({self.name}): no factor starts at zero, so ΔW != 0 at step 0; "
                "set one trainable factor's init to zeros (e.g. peft.v.init=zeros)")
        frozen_zero = [f for f in zero if not getattr(self, f).trainable]
        if frozen_zero:
            f = frozen_zero[0]
            raise ValueError(
                f"peft.{f}.init={self.resolved_init(f)!r} with peft.{f}.trainable=False: "
                "a frozen zero factor keeps ΔW = 0 forever")
        if len(zero) > 1:
            raise ValueError(
                f"peft ({self.name}): factors {zero} all start at zero: a saddle where none of "
                f"them receives a gradient; give all but one a non-zero init "
                f"(e.g. peft.{zero[0]}.init=kaiming_uniform)")

    # -- derived ------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def trainable_count(self, shapes: dict, num_layers: int) -> int:
        """Trainable parameters by formula, from the flags alone.

        ``shapes`` maps each target to its unsharded (d_in, d_out); L = ``num_layers``.
        """
        r, L, total = self.rank, num_layers, 0
        for t in self.target_modules:
            d_in, d_out = shapes[t]
            sizes = {"A": r * d_in, "B": d_out * r, "u": r, "v": d_out}
            for name, size in sizes.items():
                f = getattr(self, name)
                if f.trainable:
                    total += size * (1 if (name in "AB" and f.tied) else L)
        return total

    def lora_count(self, shapes: dict, num_layers: int) -> int:
        """LoRA's trainable parameters at the same rank and targets: L·r·(d_in + d_out)."""
        return sum(num_layers * self.rank * (shapes[t][0] + shapes[t][1]) for t in self.target_modules)
