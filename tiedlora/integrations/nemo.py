"""Tied-LoRA as a NeMo 2 PEFT transform (``llm.finetune(..., peft=TiedLoRA("tl6"))``).

This module needs NeMo 2 (nemo_toolkit 2.7.x with ``nemo.collections.llm``); the rest of
tiedlora never imports it. It adds no second implementation of the method: the adapters
are tiedlora's own (:class:`~tiedlora.peft.layer.TiedLoRAAdapter`, built by
:func:`~tiedlora.peft.model.make_adapter`, the function :func:`~tiedlora.peft.apply_peft`
uses), so both paths compute the same numbers from the same seeded factors::

    NeMo's PEFT.__call__(model)            tiedlora's apply_peft(model, cfg)
      └─ walk: transform(linear_qkv)         └─ for each layer and target
           └─ make_adapter(...) ──────────────────► make_adapter(...)
           └─ TiedLoRALinear(to_wrap, adapter)     └─ AdaptedLinear(base, adapter)

    h = W x + s · v ⊙ B( u ⊙ A(dropout(x)) )        s = alpha / r

Where NeMo and tiedlora meet:

* Tied A/B have one owner per megatron-core model chunk, ``<chunk>.tied_adapters``
  (registered once, so NeMo's state dict, optimizer and ``named_parameters`` see each
  tied factor once); the wrapped layers only reference it.
* Trainability comes from the config flags alone (:func:`~tiedlora.peft.declare_trainable`).
* NeMo's adapter checkpoints (megatron dist-checkpointing through ``WrappedAdapterIO``)
  hold every adapter tensor, frozen tied ones included, sharded like the base weights
  (SwiGLU's stride-2 ``linear_fc1`` included), so they reload at another TP size.
* :meth:`TiedLoRA.save_adapter` / :meth:`TiedLoRA.load_adapter` convert to and from
  tiedlora's own layout-independent safetensors format (:mod:`tiedlora.checkpoint`).

Limits: the base must use megatron-core's *local* layer spec (``ColumnParallelLinear`` /
``RowParallelLinear``; in NeMo ``GPTConfig(transformer_layer_spec=local_layer_spec)``):
transformer-engine's fused layernorm-linear modules are refused.

Beyond NeMo's own PEFT machinery:

* Pipeline parallelism: every stage holds a copy of each tied factor (same seed, so equal
  at the start). NeMo's ``finalize_model_grads`` does not add the copies' gradients, so
  :meth:`TiedLoRA.apply_transform` wraps it (:func:`wrap_finalize_model_grads`); the copy
  on stage 0 is the one gradient-norm clipping and checkpoints count.
* Mixed precision: adapters stay fp32 when NeMo's precision plugin casts the model to
  bf16/fp16 (:func:`_keep_adapters_fp32_on_conversion`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

try:
    from nemo.lightning.pytorch.callbacks.peft import PEFT, AdapterWrapper
except ImportError as _err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "tiedlora.integrations.nemo needs NeMo 2 (nemo_toolkit 2.7.x with the LLM collection; "
        f"importing it failed: {_err}). Install it in its own environment, e.g. "
        "`pip install torch==2.13.0 && pip install -r requirements-nemo.txt && "
        "pip install --no-deps -e .` (CPU), or use NVIDIA's NeMo container; see docs/nemo.md. "
        "The rest of tiedlora does not need NeMo."
    ) from _err

import torch
from torch import nn

from tiedlora.config import FACTORS, PeftConfig
from tiedlora.peft.layer import TiedFactors, TiedLoRAAdapter
from tiedlora.peft.model import (
    _base_mode,
    _find_target,
    _transformer_layers,
    adapter_state_dict,
    declare_trainable,
    iter_adapter_params,
    load_adapter_state_dict,
    make_adapter,
)

__all__ = ["TiedLoRA", "TiedLoRALinear", "ShardedTiedFactors", "export_peft", "mcore_chunks",
           "model_config_from_nemo", "resolve_config", "sum_tied_grads_over_pipeline",
           "wrap_finalize_model_grads"]

_LOCAL_SPEC_HINT = (
    "In NeMo, build the model with megatron-core's local layer spec, e.g. "
    "llm.GPTConfig(..., transformer_layer_spec=nemo.collections.llm.gpt.model.base.local_layer_spec)")


# ----------------------------------------------------------------------------- config
def resolve_config(preset: Optional[str], **fields: Any) -> PeftConfig:
    """A validated :class:`PeftConfig`: ``conf/peft/<preset>.yaml`` (if given) + non-None fields.

    With ``preset=None`` the fields go onto PeftConfig's defaults (the TL6 flags). Factor
    fields (``A``, ``B``, ``u``, ``v``) are dicts such as ``{"trainable": False}``.
    """
    from omegaconf import OmegaConf

    from tiedlora.config import CONF_DIR

    node = OmegaConf.structured(PeftConfig)
    if preset is not None:
        path = CONF_DIR / "peft" / f"{preset}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in (CONF_DIR / "peft").glob("*.yaml"))
            raise ValueError(f"TiedLoRA(preset={preset!r}): no such preset; expected one of {names} "
                             "or preset=None with explicit flags")
        node = OmegaConf.merge(node, OmegaConf.load(path))
    else:
        node.name = "custom"
    overrides = {k: v for k, v in fields.items() if v is not None}
    return OmegaConf.to_object(OmegaConf.merge(node, overrides))


# ------------------------------------------------------------------ model structure
def mcore_chunks(model: nn.Module) -> List[nn.Module]:
    """The megatron-core model chunks inside a NeMo model, in pipeline order.

    Accepts NeMo's ``MegatronParallel`` (one entry per virtual-pipeline chunk), a NeMo
    Lightning model (``llm.GPTModel``), wrappers with a ``.module`` (``Float16Module``,
    DDP) or a bare megatron-core ``GPTModel``; unwraps ``.module`` as NeMo itself does.
    """
    roots = list(model) if isinstance(model, nn.ModuleList) else [model]
    chunks = []
    for m in roots:
        while isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        chunks.append(m)
    return chunks


def _sharded(tensors: Dict[str, torch.Tensor], prefix: str, sharded_offsets, metadata, tp_group):
    """megatron dist-checkpoint entries for adapter tensors, sharded as they are held.

    Tensors marked tensor-parallel are split on their ``partition_dim``; stride 2 (SwiGLU's
    ``linear_fc1``: each rank holds [gate_r; up_r]) uses megatron's SwiGLU factory, exactly
    as megatron-core does for the fc1 weight, so the saved tensor is the unsharded one.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
    )

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    axis = {n: t.partition_dim for n, t in tensors.items() if getattr(t, "tensor_model_parallel", False)}
    out = make_sharded_tensors_for_checkpoint(
        tensors, prefix, axis, sharded_offsets,
        tp_group=tp_group if tp_group is not None else ps.get_tensor_model_parallel_group(),
        dp_cp_group=metadata["dp_cp_group"])
    for n, dim in axis.items():
        stride = getattr(tensors[n], "partition_stride", 1)
        if stride == 2 and dim == 0:
            out[prefix + n] = apply_swiglu_sharded_factory(out[prefix + n], sharded_offsets)
        elif stride != 1:
            raise NotImplementedError(
                f"adapter tensor {prefix}{n}: partition stride {stride} on dim {dim} has no "
                "dist-checkpoint layout (megatron-core only defines SwiGLU's stride 2 on dim 0)")
    return out


class ShardedTiedFactors(TiedFactors):
    """:class:`TiedFactors` that megatron's dist-checkpointing (NeMo's checkpoints) can save.

    Under pipeline parallelism every stage (and every virtual chunk) holds a copy under the
    same checkpoint key; only the copy of the first chunk of stage 0 (``main_copy``) is the
    main replica, the others are marked as replicas (replica id ``(1, ...)``, as megatron
    marks the last stage's copy of tied embeddings), so the factor is written once and read
    by every copy.
    """

    main_copy: bool = True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        out = _sharded(self.state_dict(keep_vars=True), prefix, sharded_offsets, metadata, None)
        if not self.main_copy:
            for sh in out.values():
                rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                sh.replica_id = (1,) + tuple(rid[1:])
        return out


class TiedLoRALinear(AdapterWrapper):
    """NeMo's wrapper around one parallel linear: ``(W x + ΔW x, bias)``.

    Same contract as :class:`tiedlora.peft.layer.AdaptedLinear`; state-dict keys follow
    NeMo (base weights under the linear's own name, adapter tensors under ``adapter.``).
    """

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias, ln_out = self.base_linear_forward(x, *args, **kwargs)
        # the adapter adds into ``out`` as in AdaptedLinear (fused, in place where safe, in
        # the base's dtype), so both routes compute bit-identical outputs and gradients
        return self.adapter(ln_out, base_out=out), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        sd = self.to_wrap.sharded_state_dict(prefix, sharded_offsets, metadata)
        own = self.adapter.state_dict(keep_vars=True)  # per-layer factors; tied ones live on the owner
        sd.update(_sharded(own, f"{prefix}adapter.", sharded_offsets, metadata, self.adapter.tp_group))
        return sd

    def __getattr__(self, name: str):
        # megatron-core reads attributes of the linear it built (weight, config, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("to_wrap"), name)


# -------------------------------------------------------------------------- the PEFT
@dataclass
class TiedLoRA(PEFT):
    """Tied-LoRA (and LoRA, VeRA, TL1-TL7) as a NeMo 2 PEFT transform.

    ``preset`` loads ``conf/peft/<preset>.yaml`` (lora, vera, tl1 ... tl7); every other
    field, when not None, overrides it, with the names and meaning of
    :class:`tiedlora.peft.PeftConfig`. ``preset=None`` starts from PeftConfig's defaults.

    >>> peft = TiedLoRA("tl6", rank=8, target_modules=["linear_qkv"])
    >>> llm.finetune(model=model, data=data, trainer=trainer, peft=peft)   # doctest: +SKIP
    """

    preset: Optional[str] = "tl6"  # conf/peft/<preset>.yaml; None: explicit flags only
    rank: Optional[int] = None  # r
    alpha: Optional[float] = None  # s = alpha / r (None: the preset's value)
    dropout: Optional[float] = None  # probability; where it acts: dropout_position
    dropout_position: Optional[str] = None  # "pre" (adapter input; the presets') or "post" (adapter output)
    target_modules: Optional[List[str]] = None  # subset of linear_qkv, linear_proj, linear_fc1, linear_fc2
    seed: Optional[int] = None  # seeds frozen random factors and all inits
    A: Optional[Dict[str, Any]] = None  # e.g. {"trainable": True, "tied": True, "init": None}
    B: Optional[Dict[str, Any]] = None
    u: Optional[Dict[str, Any]] = None
    v: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        from tiedlora.integrations import nemo_compat

        nemo_compat.install()  # before llm.finetune sets up its logger, parallel state and restore
        self._cfg = resolve_config(
            self.preset, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
            dropout_position=self.dropout_position,
            target_modules=None if self.target_modules is None else list(self.target_modules),
            seed=self.seed, **{f: getattr(self, f) for f in FACTORS})
        self._plan: Optional[dict] = None

    @property
    def peft_config(self) -> PeftConfig:
        """The resolved, validated adapter configuration."""
        return self._cfg

    # -- NeMo callback hooks ------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        """NeMo's PEFT set-up, plus: the final checkpoint keeps the optimizer state.

        NeMo's ``ModelCheckpoint`` writes the last checkpoint of a run without optimizer
        state unless ``save_optim_on_train_end=True``, and a PEFT run cannot resume from such
        a checkpoint. An adapter run's optimizer state is as small as its adapters, so it is
        always kept: ``max_steps`` can then be raised and the run resumed from its end.
        """
        from nemo.lightning.pytorch.callbacks import ModelCheckpoint

        from tiedlora.integrations import nemo_compat

        nemo_compat.install()
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and not cb.save_optim_on_train_end:
                cb.save_optim_on_train_end = True
        super().setup(trainer, pl_module, stage=stage)

    # -- applying ---------------------------------------------------------------------
    def __call__(self, model: nn.Module) -> nn.Module:
        """Freeze ``model`` and wrap every target linear (NeMo calls this on its model)."""
        from megatron.core import parallel_state as ps

        from tiedlora import compat

        cfg = self._cfg
        compat.require("TiedLoRA")
        try:
            chunks = self._plan_chunks(model)
            if hasattr(model, "walk"):  # NeMo containers: NeMo's own freeze + walk
                super().__call__(model)
            else:  # a bare megatron-core module has no FNMixin
                from nemo.collections.llm import fn

                for p in model.parameters():
                    p.requires_grad_(False)
                fn.walk(model, self.transform)
        finally:
            self._plan = None
        _keep_adapters_fp32_on_conversion(model)
        pp_rank = ps.get_pipeline_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        pp_size = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        _mark_tied_copies(chunks, pp_rank, pp_size, cfg.A.tied or cfg.B.tied)
        inference = not _fitting(model)  # NeMo freezes everything outside trainer.fit
        for chunk in chunks:
            declare_trainable(chunk, cfg)
            if inference:
                for p in chunk.parameters():
                    p.requires_grad_(False)
        return model

    def _plan_chunks(self, model: nn.Module) -> List[nn.Module]:
        """Give each chunk its owner of tied factors; map every target linear to its layer."""
        cfg = self._cfg
        self._plan = {}
        chunks = mcore_chunks(model)
        for chunk in chunks:
            if any(isinstance(m, TiedLoRAAdapter) for m in chunk.modules()):
                raise ValueError("model already has tiedlora adapters; start from a fresh base model")
            chunk.tied_adapters = ShardedTiedFactors()
            chunk.peft_config = cfg
            sp = bool(getattr(getattr(chunk, "config", None), "sequence_parallel", False))
            for layer in _transformer_layers(chunk):
                for target in cfg.target_modules:
                    _, _, base = _find_target(layer, target)
                    try:
                        _base_mode(base)
                    except TypeError as e:
                        raise TypeError(f"{e}. {_LOCAL_SPEC_HINT}") from None
                    self._plan[id(base)] = (chunk.tied_adapters, target, layer.layer_number, sp)
        return chunks

    def transform(self, module: nn.Module, name: Optional[str] = None, prefix: Optional[str] = None):
        """Wrap ``module`` if it is a target linear found by :meth:`__call__`; else return it."""
        if self._plan is None:
            raise RuntimeError("TiedLoRA.transform is called by TiedLoRA.__call__(model) only: the "
                               "tied factors need their owner on the model chunk")
        entry = self._plan.get(id(module))
        if entry is None:
            return module
        owner, target, layer_number, sp = entry
        return TiedLoRALinear(module, make_adapter(module, target, layer_number, self._cfg, owner, sp))

    def apply_transform(self, trainer) -> None:
        """NeMo's PEFT set-up (transform, DDP, optimizer, ``finalize_model_grads``), plus the
        pipeline sum of tied-factor gradients (:func:`sum_tied_grads_over_pipeline`) after
        megatron's ``finalize_model_grads``."""
        from megatron.core.utils import get_model_config

        super().apply_transform(trainer)
        configs = [get_model_config(trainer.lightning_module)]
        configs += [getattr(c, "config", None) for c in mcore_chunks(trainer.model)]
        for config in {id(c): c for c in configs if c is not None}.values():
            wrap_finalize_model_grads(config)

    def adapter_key_filter(self, key) -> bool:
        """Which checkpoint keys are adapter state: the tied-factor owner, then NeMo's rule.

        The owner's tensors are kept even when frozen (VeRA's random A/B), so a NeMo
        checkpoint restores exactly the adapter that was trained.
        """
        if isinstance(key, str) and ".tied_adapters." in f".{key}":
            return True
        if isinstance(key, tuple) or hasattr(self, "params_to_save"):
            return super().adapter_key_filter(key)
        return ".adapter." in key  # before NeMo's trainer has set params_to_save

    # -- tiedlora's own checkpoint format --------------------------------------------
    def adapter_state_dict(self, model: nn.Module, grads: bool = False) -> Dict[str, torch.Tensor]:
        """Full adapter tensors by layout-independent name (collective over model parallel)."""
        return adapter_state_dict(mcore_chunks(model), grads=grads)

    def load_adapter_state_dict(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
        load_adapter_state_dict(mcore_chunks(model), state)

    def save_adapter(self, model: nn.Module, path, model_info: Optional[dict] = None,
                     extra: Optional[dict] = None) -> Path:
        """Write the adapter in tiedlora's safetensors format (collective; rank 0 writes)."""
        import torch.distributed as dist

        from tiedlora.checkpoint import save_adapter
        from tiedlora.dist import is_rank0

        tensors = self.adapter_state_dict(model)
        if is_rank0():
            save_adapter(Path(path), tensors, self._cfg, model_info, extra)
        if dist.is_initialized():
            dist.barrier()
        return Path(path)

    def load_adapter(self, model: nn.Module, path) -> dict:
        """Load a tiedlora adapter file into a NeMo-transformed model; returns its metadata.

        Refuses a file saved under another preset, rank or targets.
        """
        from tiedlora.checkpoint import check_compatible, load_adapter

        tensors, saved, meta = load_adapter(Path(path))
        check_compatible(saved, self._cfg, where=str(path))
        self.load_adapter_state_dict(model, tensors)
        return meta


def model_config_from_nemo(config, vocab_size: int, name: str = "nemo"):
    """tiedlora's :class:`~tiedlora.models.gpt.ModelConfig` for a NeMo ``GPTConfig`` (LLaMA's too).

    ``vocab_size`` is the model's (NeMo takes it from the tokenizer, not the config). Only
    the architecture fields tiedlora's export and merge read; raises ``ValueError``
    naming the NeMo field when the model is one tiedlora cannot describe.
    """
    import torch.nn.functional as F

    from tiedlora.config import ModelConfig

    gated = bool(getattr(config, "gated_linear_unit", False))
    act = getattr(config, "activation_func", None)
    if gated and act is not F.silu:
        raise ValueError(f"GPTConfig.activation_func={act!r} with gated_linear_unit=True: tiedlora "
                         "describes SwiGLU (F.silu) only")
    if not gated and act is not F.gelu:
        raise ValueError(f"GPTConfig.activation_func={act!r}: tiedlora describes GELU or SwiGLU only")
    return ModelConfig(
        name=name, num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=getattr(config, "num_query_groups", None), kv_channels=config.kv_channels,
        vocab_size=int(vocab_size), seq_length=config.seq_length,
        normalization=config.normalization, activation="swiglu" if gated else "gelu",
        layernorm_zero_centered_gamma=bool(getattr(config, "layernorm_zero_centered_gamma", False)),
        layernorm_epsilon=config.layernorm_epsilon,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=getattr(config, "rotary_percent", 1.0),
        rotary_base=int(getattr(config, "rotary_base", 10000)),
        add_bias_linear=bool(config.add_bias_linear),
        untie_embeddings_and_output_weights=not config.share_embeddings_and_output_weights)


def export_peft(peft: "TiedLoRA", model: nn.Module, output, base_model_name_or_path: Optional[str] = None) -> Path:
    """Export the adapter of a NeMo model as a Hugging Face PEFT LoRA (tiedlora's exporter).

    ``model`` is the trained NeMo model (e.g. ``trainer.model``; collective over model
    parallel, rank 0 writes). Its megatron-core config gives the architecture; the base must
    be LLaMA-shaped for PEFT to load the result (see :mod:`tiedlora.export`).
    """
    import tempfile

    import torch.distributed as dist

    from tiedlora.dist import is_rank0
    from tiedlora.export import export_peft as _export

    chunk = mcore_chunks(model)[0]
    model_cfg = model_config_from_nemo(chunk.config, chunk.vocab_size)  # megatron GPTModel's vocab
    with tempfile.TemporaryDirectory() as tmp:
        adapter = peft.save_adapter(model, Path(tmp) / "adapter.safetensors")
        if is_rank0():
            _export(adapter, model_cfg, output, base_model_name_or_path)
        if dist.is_initialized():
            dist.barrier()
    return Path(output)


# ------------------------------------------------------------ pipeline parallelism
def _mark_tied_copies(chunks: List[nn.Module], pp_rank: int, pp_size: int, tied: bool) -> None:
    """Under pipeline parallelism (or with virtual chunks) every chunk holds a copy of each
    tied factor. The copy of stage 0's first chunk is the main one; the others are marked
    ``shared`` (megatron's gradient-norm and zero counting skip them, so the factor counts
    once) and their checkpoint entries are replicas. Every copy gets its own DDP bucket
    (``shared_embedding``, as megatron does for tied embeddings), so that under the
    distributed optimizer each data-parallel rank owns the same slice of the factor's
    gradient on every stage and the pipeline all-reduce after the reduce-scatter adds
    matching elements."""
    if pp_size == 1 and len(chunks) == 1:
        return
    for i, chunk in enumerate(chunks):
        main = pp_rank == 0 and i == 0
        owner = chunk.tied_adapters
        if tied and not list(owner.parameters()):
            raise ValueError(
                f"pipeline stage {pp_rank}, model chunk {i} holds no transformer layer, so no copy "
                "of the tied A/B: TiedLoRA needs at least one layer on every pipeline stage and "
                "virtual chunk (num_layers divisible by pipeline_model_parallel_size, times "
                "virtual_pipeline_model_parallel_size)")
        owner.main_copy = main
        for p in owner.parameters():
            p.shared_embedding = True
            p.shared = not main


def _grad_of(p: nn.Parameter) -> torch.Tensor:
    """The gradient megatron reduces: ``main_grad`` (DDP's buffer) when present, else ``grad``."""
    g = getattr(p, "main_grad", None)
    if g is None:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
    return g


@torch.no_grad()
def sum_tied_grads_over_pipeline(chunks: List[nn.Module], pp_group=None) -> None:
    """Give every copy of a trainable tied factor the sum of all copies' gradients.

    Each copy's gradient is the sum over the layers of its chunk; the factor's gradient is
    the sum over all layers. The copies of this rank's chunks are added, the sums are
    all-reduced over the pipeline group (one flat buffer) and written into every copy. Run
    after megatron's ``finalize_model_grads``: its data-parallel reduction and its scaling by
    the step's token count are linear, so the order does not change the result, and after
    it the copies are complete on every data-parallel rank (see :func:`_mark_tied_copies`
    for the distributed optimizer). Every stage holds every tied factor (each stage has at
    least one transformer layer), so all stages reduce the same list, in name order.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    copies: Dict[str, List[nn.Parameter]] = {}
    for chunk in chunks:
        for rec in iter_adapter_params(chunk):
            if rec.tied and rec.param.requires_grad:
                copies.setdefault(rec.name, []).append(rec.param)
    group = pp_group if pp_group is not None else ps.get_pipeline_model_parallel_group()
    if all(len(c) == 1 for c in copies.values()) and dist.get_world_size(group) == 1:
        return  # one copy of each (no tied factors, or PP=1 without virtual chunks)
    names = sorted(copies)
    grads = [[_grad_of(p) for p in copies[n]] for n in names]
    totals = [torch.stack(gs).sum(0) if len(gs) > 1 else gs[0].clone() for gs in grads]
    if dist.get_world_size(group) > 1:
        flat = torch.cat([t.reshape(-1).float() for t in totals])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in totals:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    for gs, total in zip(grads, totals):
        for g in gs:
            g.copy_(total)


def wrap_finalize_model_grads(config) -> None:
    """Make ``config.finalize_model_grads_func`` (set by NeMo's ``MegatronOptimizerModule``)
    also run :func:`sum_tied_grads_over_pipeline`; megatron's schedules call it once per
    step. Idempotent; a config without the function is left alone."""
    finalize = getattr(config, "finalize_model_grads_func", None)
    if finalize is None or getattr(finalize, "sums_tied_adapter_grads", False):
        return

    def finalize_then_sum_tied_grads(model, *args, **kwargs):
        out = finalize(model, *args, **kwargs)
        chunks = [c for m in (model if isinstance(model, (list, tuple)) else [model]) for c in mcore_chunks(m)]
        sum_tied_grads_over_pipeline(chunks)
        return out

    finalize_then_sum_tied_grads.sums_tied_adapter_grads = True
    config.finalize_model_grads_func = finalize_then_sum_tied_grads


def _keep_adapters_fp32_on_conversion(model: nn.Module) -> None:
    """Keep the adapters fp32 when NeMo's precision plugin wraps ``model`` in ``Float16Module``.

    ``MegatronMixedPrecision("bf16-mixed")`` (or fp16) converts each chunk after the PEFT
    transform (``MegatronParallel.init_model_parallel`` → ``convert_module_fn``), before
    megatron's DDP and optimizer are built; ``Float16Module`` casts every parameter. The
    conversion is wrapped so that the adapter tensors (tied and per layer, frozen ones
    too) get their fp32 values back right after it, so DDP gives them fp32 gradient
    buffers and megatron's optimizer steps them as fp32 parameters (no bf16 copy). The
    adapter then computes in fp32 (bf16 input cast up, result cast to the base output's
    dtype), as in tiedlora's own recipe. A model without ``convert_module_fn`` (a bare
    megatron-core module, or one converted before the transform) is left alone.
    """
    convert = getattr(model, "convert_module_fn", None)
    if convert is None or getattr(convert, "keeps_tiedlora_adapters_fp32", False):
        return

    def convert_keeping_adapters_fp32(module: nn.Module) -> nn.Module:
        from tiedlora.peft.model import ADAPTER_DTYPE

        saved = [(r.param, r.param.data) for chunk in mcore_chunks(module)
                 for r in iter_adapter_params(chunk)]
        module = convert(module)
        for param, data in saved:  # the very values (and storage) from before the cast
            if param.dtype != ADAPTER_DTYPE:
                param.data = data.to(ADAPTER_DTYPE)
        return module

    convert_keeping_adapters_fp32.keeps_tiedlora_adapters_fp32 = True
    model.convert_module_fn = convert_keeping_adapters_fp32


def _fitting(model: nn.Module) -> bool:
    """False only when a trainer is attached and is not fitting (validation, inference)."""
    from lightning.pytorch.trainer.states import TrainerFn

    try:
        trainer = model.trainer
    except (AttributeError, RuntimeError):  # Lightning raises RuntimeError when detached
        return True
    return trainer is None or trainer.state.fn == TrainerFn.FITTING
