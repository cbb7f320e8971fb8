"""Every configuration schema of a run, and their registration with Hydra.

YAML under ``conf/`` is data composed onto these dataclasses; unknown keys and wrong
types are rejected by OmegaConf (naming the full key), and each dataclass's
``__post_init__`` rejects bad values naming the field and the value. Defaults live here
and nowhere else::

    FinetuneConfig (conf/finetune.yaml; also the schema of conf/evaluate.yaml)
    ├── model: ModelConfig         conf/model/*.yaml
    ├── peft: PeftConfig           conf/peft/*.yaml   (FactorConfig for A, B, u, v)
    ├── task: TaskConfig           conf/task/*.yaml
    ├── trainer: TrainerConfig  ├── optim: OptimConfig  ├── parallel: ParallelConfig
    ├── checkpoint: CheckpointConfig  ├── eval: EvalConfig
    └── data: DataConfig
    ParamsConfig (conf/params.yaml): model + peft

This module imports no model code (torch or megatron-core), so it sits below every
module that reads a config.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from tiedlora.data.packing import PACK_ALGORITHMS
from tiedlora.data.sft import PromptTemplate
from tiedlora.errors import preempt_exit_code_problem

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("sdpa", "local", "te")  # see tiedlora.models.attention
ROPE_SCALINGS = (None, "llama3")  # model.rope_scaling; see tiedlora.models.gpt.apply_rope_scaling
KINDS = ("generate", "multiple_choice")
SPLITS = ("train", "validation", "test")
NONFINITE_POLICIES = ("skip", "raise")  # trainer.nonfinite


def cache_root() -> Path:
    """``$TIEDLORA_CACHE`` or ``~/.cache/tiedlora``."""
    return Path(os.environ.get("TIEDLORA_CACHE") or Path.home() / ".cache" / "tiedlora")


# ------------------------------------------------------------------------------ the adapter
# Typed, self-validating adapter configuration (``conf/peft/*.yaml``).
#
# Every preset (LoRA, VeRA, TL1-TL7) is nothing but flags on four factors::
#
#     h = W x + s * v ⊙ B( u ⊙ A(dropout(x)) )        s = alpha / r     (dropout_position=pre)
#     h = W x + dropout( s * v ⊙ B( u ⊙ A x ) )                         (dropout_position=post)
#
#     A: (r, d_in)   B: (d_out, r)   u: (r,)   v: (d_out,)
#
# Each factor is ``trainable`` or frozen; A and B are ``tied`` (one tensor shared by all
# layers of a target kind) or per layer; u and v are always per layer. A frozen vector
# initialised to ones is the identity and is not allocated at all.
#
# Default initialisation (each overridable with ``<factor>.init``):
#
# * A: kaiming-uniform.  B: zeros when v is frozen, else kaiming-uniform.
# * u: ones.  v: zeros when v is trainable, else ones.
#
# so that ΔW = 0 at step 0 and exactly one factor, a trainable one, starts at zero (two
# zero factors would be a saddle where neither receives a gradient).


TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")  # column-parallel in megatron-core
ROW_TARGETS = ("linear_proj", "linear_fc2")  # row-parallel in megatron-core
FACTORS = ("A", "B", "u", "v")
NAMED_INITS = ("kaiming_uniform", "zeros", "ones", "normal")
DROPOUT_POSITIONS = ("pre", "post")  # dropout(x) before A, or dropout(ΔW x) after B (as NeMo's LoRA)


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
    dropout: float = 0.0  # probability; where it acts: dropout_position
    dropout_position: str = "pre"  # pre: on the adapter input x; post: on the adapter output ΔW x
    target_modules: List[str] = field(default_factory=lambda: ["linear_qkv"])
    seed: int = 1234  # seeds frozen random factors and all adapter inits
    A: FactorConfig = field(default_factory=lambda: FactorConfig(trainable=True, tied=True))
    B: FactorConfig = field(default_factory=lambda: FactorConfig(trainable=True, tied=True))
    u: FactorConfig = field(default_factory=FactorConfig)
    v: FactorConfig = field(default_factory=FactorConfig)
    # the peak learning rate that suits this preset on the embedded mini base (chosen by the
    # miniature grid's bracketing sweep); a run uses it when optim.lr is null
    lr: Optional[float] = None

    def __post_init__(self):
        if self.lr is not None and (isinstance(self.lr, bool) or not math.isfinite(float(self.lr)) or self.lr <= 0):
            raise ValueError(f"peft.lr={self.lr!r}: must be a positive number (or null)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"peft.rank={self.rank!r}: must be a positive integer")
        if self.alpha is not None and (not math.isfinite(float(self.alpha)) or self.alpha <= 0):
            raise ValueError(f"peft.alpha={self.alpha!r}: must be a positive number (or null for alpha = rank)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"peft.dropout={self.dropout!r}: must be in [0, 1)")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"peft.dropout_position={self.dropout_position!r}: expected one of "
                             f"{list(DROPOUT_POSITIONS)} (dropout on the adapter input or on its output)")
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


# ------------------------------------------------------------------------ the base model
@dataclass
class ModelConfig:
    """Architecture of a megatron-core GPT base model (defaults: the tiny CPU model)."""

    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (= heads)
    kv_channels: Optional[int] = None  # None: hidden_size / heads
    vocab_size: int = 512
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 256
    normalization: str = "RMSNorm"  # LayerNorm | RMSNorm
    layernorm_zero_centered_gamma: bool = False  # NeMo's layernorm1p
    layernorm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | gelu
    position_embedding_type: str = "rope"  # rope | learned_absolute
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    # RoPE frequency scaling: null (plain RoPE) | llama3 (LLaMA-3.1/3.2: low frequencies divided by
    # the factor, a smooth blend between the two wavelength bounds; the four numbers below)
    rope_scaling: Optional[str] = None
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_positions: int = 8192
    add_bias_linear: bool = False
    add_qkv_bias: bool = False  # bias on the fused QKV projection only (Qwen2)
    # Attention window of the checkpoint (Mistral v0.1); null: full causal attention. Sliding-window
    # attention is not implemented, so seq_length may not exceed it (then the window never binds).
    sliding_window: Optional[int] = None
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    params_dtype: str = "float32"  # float32 | bfloat16 (adapters always stay fp32)
    attention_backend: str = "sdpa"  # sdpa | local (megatron's unfused) | te (transformer-engine)
    # Activation recomputation (megatron-core's): null | selective (core attention) | full (layers)
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # full only: uniform | block
    recompute_num_layers: Optional[int] = None  # full only: layers per unit (uniform) / per stage (block)
    checkpoint: Optional[str] = None  # base weights (.nemo, HF dir or our .safetensors)
    tokenizer: Optional[str] = None  # tokenizer model file/dir; None: from the checkpoint

    def __post_init__(self):
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"model.{f}={v!r}: must be a positive integer")
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_query_groups={self.num_query_groups}: must divide "
                f"num_attention_heads={self.num_attention_heads}")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"model.normalization={self.normalization!r}: expected LayerNorm or RMSNorm")
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"model.activation={self.activation!r}: expected swiglu or gelu")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(
                f"model.position_embedding_type={self.position_embedding_type!r}: "
                "expected rope or learned_absolute")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"model.rotary_percent={self.rotary_percent!r}: must be in (0, 1]")
        if self.params_dtype not in DTYPES:
            raise ValueError(f"model.params_dtype={self.params_dtype!r}: expected one of {sorted(DTYPES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend={self.attention_backend!r}: "
                             f"expected one of {list(ATTENTION_BACKENDS)}")
        self._check_rope_scaling()
        if self.sliding_window is not None and self.seq_length > self.sliding_window:
            raise ValueError(
                f"model.seq_length={self.seq_length} is longer than model.sliding_window="
                f"{self.sliding_window}: sliding-window attention is not implemented; set "
                f"model.seq_length <= {self.sliding_window} (attention over that many tokens is exact)")
        self._check_recompute()

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r}: expected one of {list(ROPE_SCALINGS)}")
        if self.rope_scaling is None:
            return
        if self.position_embedding_type != "rope":
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r} needs position_embedding_type=rope")
        for f in ("rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"model.{f}={v!r}: must be a positive number")
        if not self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor:
            raise ValueError(
                f"model.rope_scaling_low_freq_factor={self.rope_scaling_low_freq_factor!r} must be smaller "
                f"than model.rope_scaling_high_freq_factor={self.rope_scaling_high_freq_factor!r}")
        n = self.rope_scaling_original_max_positions
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"model.rope_scaling_original_max_positions={n!r}: must be a positive integer")

    def _check_recompute(self) -> None:
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in (None, "selective", "full"):
            raise ValueError(f"model.recompute_granularity={g!r}: expected null, selective or full")
        if m not in (None, "uniform", "block"):
            raise ValueError(f"model.recompute_method={m!r}: expected null, uniform or block")
        if g != "full":
            for key, value in (("recompute_method", m), ("recompute_num_layers", n)):
                if value is not None:
                    raise ValueError(f"model.{key}={value!r}: only used with "
                                     f"model.recompute_granularity=full (it is {g!r}); set it to null")
            return
        if m is None:
            raise ValueError("model.recompute_method=None: recompute_granularity=full needs uniform or block")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.num_layers:
            raise ValueError(f"model.recompute_num_layers={n!r}: recompute_granularity=full needs an "
                             f"integer in [1, num_layers={self.num_layers}]")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def qkv_width(self) -> int:
        """Output width of the fused QKV projection (megatron's ``linear_qkv``)."""
        groups = self.num_query_groups or self.num_attention_heads
        return self.head_dim * (self.num_attention_heads + 2 * groups)

    def target_shape(self, target: str) -> tuple[int, int]:
        """(d_in, d_out) of an adapter target, unsharded."""
        h, ffn = self.hidden_size, self.ffn_hidden_size
        fc1_out = 2 * ffn if self.activation == "swiglu" else ffn
        shapes = {
            "linear_qkv": (h, self.qkv_width),
            "linear_proj": (self.head_dim * self.num_attention_heads, h),
            "linear_fc1": (h, fc1_out),
            "linear_fc2": (ffn, h),
        }
        return shapes[target]

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel size = world size / (tp * pp)."""

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: Optional[int] = None  # virtual pipeline stages (model chunks) per pipeline rank
    sp: bool = False  # sequence parallel (needs tp > 1)

    def __post_init__(self):
        for f in ("tp", "pp"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{f}={v!r}: must be an integer >= 1")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise ValueError(f"parallel.vpp={self.vpp!r}: needs parallel.pp >= 2 and vpp >= 1")
        if self.sp and self.tp < 2:
            raise ValueError(f"parallel.sp={self.sp!r}: sequence parallel needs parallel.tp >= 2")



# --------------------------------------------------------------------------------- task
@dataclass
class TaskConfig:
    name: str = "mini_qa"
    kind: str = "generate"  # generate (greedy decoding) | multiple_choice (log-likelihood)
    metric: str = "squad"  # squad | rouge | bleu | accuracy | gsm8k (tiedlora.metrics)
    data_dir: Optional[str] = None  # holds {train,validation,test}.jsonl; None: cache for generated tasks
    generator: Optional[str] = None  # mini task generator; files are generated when missing
    num_train: int = 2000  # generated tasks only
    num_validation: int = 200
    num_test: int = 200
    data_seed: int = 0
    template: str = "{input} {output}"  # must end with {output}
    max_length: int = 2048  # tokens per training example (prompt truncated from the left)
    max_new_tokens: int = 64  # generation budget at evaluation
    add_bos: bool = False
    add_eos: bool = True
    answer_only_loss: bool = True
    eval_split: str = "test"  # split scored at the end (validation: for tasks without labels)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task.kind={self.kind!r}: expected one of {list(KINDS)}")
        from tiedlora.metrics import METRICS

        if self.metric not in METRICS:
            raise ValueError(f"task.metric={self.metric!r}: expected one of {sorted(METRICS)}")
        try:
            PromptTemplate(self.template)
        except ValueError as e:
            raise ValueError(f"task.template: {e}") from None
        if self.eval_split not in SPLITS:
            raise ValueError(f"task.eval_split={self.eval_split!r}: expected one of {list(SPLITS)}")
        if self.data_dir is None and self.generator is None:
            raise ValueError(f"task {self.name!r}: set task.data_dir (a folder with train/validation/test.jsonl)")
        if self.generator is not None:
            from tiedlora.data.mini_tasks import TASKS

            if self.generator not in TASKS:
                raise ValueError(f"task.generator={self.generator!r}: expected one of {sorted(TASKS)}")
        for f in ("max_length", "max_new_tokens"):
            if getattr(self, f) < 1:
                raise ValueError(f"task.{f}={getattr(self, f)!r}: must be >= 1")

    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir)
        key = f"{self.generator}-n{self.num_train}-{self.num_validation}-{self.num_test}-s{self.data_seed}"
        return cache_root() / "tasks" / key



# ----------------------------------------------------------------------------- training
@dataclass
class OptimConfig:
    lr: Optional[float] = None  # peak learning rate; None: the preset's (peft.lr)
    min_lr: float = 1e-6  # cosine floor
    warmup_steps: int = 50  # linear warm-up from 0
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables

    def __post_init__(self):
        if self.lr is not None:
            if not self.lr > 0:
                raise ValueError(f"optim.lr={self.lr!r}: must be > 0")
            self.check_min_lr("optim.lr")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps!r}: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)!r}: two numbers in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip!r}: must be >= 0")

    def check_min_lr(self, source: str) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr!r}: must be in [0, the peak rate {self.lr:g} ({source})]")


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimizer steps
    global_batch_size: int = 16
    micro_batch_size: int = 4
    val_check_interval: int = 50  # steps between validation-loss checks; 0 disables
    limit_val_batches: int = 8  # micro-batches of validation per check; 0 = all
    early_stopping_patience: int = 10  # validation checks without improvement; 0 disables
    early_stopping_min_delta: float = 0.0
    log_every: int = 10  # plain log line every N steps (the progress bar updates every step)
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    preempt_exit_code: int = 3  # exit status after a signal-triggered checkpoint (requeue me)
    nonfinite: str = "skip"  # non-finite loss or gradients: skip the optimizer step | raise at once
    max_skipped_steps: int = 5  # consecutive skipped steps after which the run stops as diverged
    lock: bool = True  # hold an exclusive lock on output_dir for the run's life (false: file systems without flock)
    lock_wait_s: float = 0.0  # how long a new run waits for another run holding output_dir
    requeue_lock_wait_s: float = 120.0  # the same for a requeued Slurm job (its previous run may still be ending)

    def __post_init__(self):
        for f in ("max_steps", "global_batch_size", "micro_batch_size", "max_skipped_steps"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"trainer.{f}={v!r}: must be a positive integer")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"trainer.precision={self.precision!r}: expected auto, bf16 or fp32")
        for s in self.preempt_signals:
            if not hasattr(signal, s):
                raise ValueError(f"trainer.preempt_signals: unknown signal {s!r}")
        why = preempt_exit_code_problem(self.preempt_exit_code)
        if why:
            raise ValueError(f"trainer.preempt_exit_code={self.preempt_exit_code!r}: {why}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"trainer.nonfinite={self.nonfinite!r}: expected one of {', '.join(NONFINITE_POLICIES)}")
        for f in ("lock_wait_s", "requeue_lock_wait_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"trainer.{f}={v!r}: must be a number of seconds >= 0")


@dataclass
class DataConfig:
    """How training examples become micro-batches (tiedlora.data.sft, tiedlora.data.packing)."""

    packing: bool = False  # pack whole examples into pack_length-token micro-batches (off until measured)
    pack_length: Optional[int] = None  # tokens per pack; None: min(task.max_length, model.seq_length)
    pack_algorithm: str = "first_fit_shuffle"  # first_fit_shuffle | first_fit_decreasing

    def __post_init__(self):
        if self.pack_algorithm not in PACK_ALGORITHMS:
            raise ValueError(f"data.pack_algorithm={self.pack_algorithm!r}: expected one of {list(PACK_ALGORITHMS)}")
        if self.pack_length is not None and (isinstance(self.pack_length, bool) or self.pack_length < 2):
            raise ValueError(f"data.pack_length={self.pack_length!r}: must be an integer >= 2 (or null)")

    def resolved_pack_length(self, task: "TaskConfig", model: "ModelConfig") -> int:
        """``pack_length``, or the longest example the task keeps (its max_length, at most
        the model's sequence length)."""
        return self.pack_length or min(task.max_length, model.seq_length)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100  # 0: only at the end (and on a preemption signal)
    keep_last: int = 2  # checkpoints kept (older ones deleted after a new one is complete)
    resume: bool = True  # continue from <output_dir>/checkpoints/latest when present


@dataclass
class EvalConfig:
    before: bool = True  # score the un-adapted base first (ΔW = 0 at step 0)
    after: bool = True  # score the trained adapter at the end
    limit: int = 0  # examples to score (0: the whole split)
    batch_size: int = 16  # prompts decoded together; choices scored together (whole questions)
    use_best: bool = True  # evaluate the adapter with the best validation loss


@dataclass
class FinetuneConfig:
    model: ModelConfig = MISSING
    peft: PeftConfig = MISSING
    task: TaskConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "outputs/run"
    adapter: Optional[str] = None  # evaluate only: adapter file (default: <output_dir>/adapter.safetensors)

    def __post_init__(self):
        # the peak rate: optim.lr when set (command line, recipe, sweep), else the preset's
        if self.optim.lr is not None:
            self.lr_source = "optim.lr"
        elif self.peft.lr is not None:
            self.optim.lr = float(self.peft.lr)
            self.lr_source = "peft.lr"
            self.optim.check_min_lr(f"peft.lr of preset {self.peft.name!r}")
        else:
            raise ValueError(f"optim.lr is null and preset {self.peft.name!r} carries no rate (peft.lr): set "
                             "optim.lr=... (choose one with +sweep=lr), or give the preset's YAML an lr")
        window = self.model.sliding_window
        if window is not None and self.task.max_length > window:  # prompt + generated tokens in evaluation
            raise ValueError(
                f"task.max_length={self.task.max_length} is longer than model.sliding_window={window}: "
                f"sliding-window attention is not implemented; set task.max_length <= {window}")
        if self.data.packing:
            if self.model.attention_backend == "local":
                raise ValueError("data.packing=true with model.attention_backend='local': megatron's local core "
                                 "cannot attend within packed examples; use attention_backend=sdpa (or te)")
            length = self.data.resolved_pack_length(self.task, self.model)
            if self.parallel.sp and length % self.parallel.tp:
                raise ValueError(f"data.pack_length={length}: sequence parallelism splits each pack over "
                                 f"parallel.tp={self.parallel.tp} ranks; use a multiple of {self.parallel.tp}")



# ------------------------------------------------------------------------ parameter report
RANKS = [2, 8, 32, 128]


@dataclass
class ParamsConfig:
    model: ModelConfig = MISSING
    peft: PeftConfig = MISSING
    all: bool = False  # every preset in conf/peft × ranks
    ranks: List[int] = field(default_factory=lambda: list(RANKS))
    format: str = "table"  # table | json

    def __post_init__(self):
        if self.format not in ("table", "json"):
            raise ValueError(f"format={self.format!r}: expected table or json")



# -------------------------------------------------------------------------------- Hydra
def _conf_dir() -> Path:
    """``conf/`` of a source checkout (also an editable install), else the copy that a
    plain ``pip install .`` puts inside the package (``tiedlora/conf``, package data)."""
    here = Path(__file__).resolve().parent
    for d in (here / "conf", here.parent / "conf"):
        if (d / "finetune.yaml").is_file():
            return d
    raise FileNotFoundError(f"tiedlora's conf/ folder is neither {here / 'conf'} nor {here.parent / 'conf'}")


CONF_DIR = _conf_dir()

_REGISTERED = False


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="params_schema", node=ParamsConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)
    from tiedlora.launch.lr_sweep import register as register_lr_sweeper

    register_lr_sweeper()  # hydra/sweeper=lr_bracket, which +sweep=lr selects
    _REGISTERED = True


def to_object(cfg: DictConfig | Any) -> Any:
    """Structured DictConfig -> dataclass instances (runs every ``__post_init__``)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    return cfg


def compose(config_name: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose a primary config from ``conf/`` outside ``@hydra.main`` (tests, tools)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hcompose(config_name=config_name, overrides=overrides or [])


__all__ = ["CONF_DIR", "CheckpointConfig", "DataConfig", "EvalConfig", "FACTORS", "FactorConfig", "FinetuneConfig",
           "ModelConfig", "OptimConfig", "TARGETS",
           "ParallelConfig", "ParamsConfig", "PeftConfig", "TaskConfig", "TrainerConfig", "cache_root",
           "compose", "register_configs", "to_object"]
