"""Apply a :class:`PeftConfig` to a megatron-core GPTModel.

``apply_peft(model, cfg)`` freezes the base, wraps every target linear of every
transformer layer in an :class:`AdaptedLinear`, creates the factors (tied ones once, on
``model.tied_adapters``) and sets ``requires_grad`` from the config flags alone
(:func:`declare_trainable`).

Every factor is generated on the CPU from ``cfg.seed`` as the *full* (unsharded) tensor
and then sliced to this rank's shard with the base weight's partition stride, so values
are identical at every TP size and on every pipeline stage (per-layer factors are keyed
by the *global* layer number).

Adapter tensors have layout-independent names, used by checkpoints:
``tied.{target}.{A|B}`` and ``layers.{i}.{target}.{A|B|u|v}`` (i: 0-based global layer).
"""

from __future__ import annotations

import zlib
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from tiedlora.config import FACTORS, PeftConfig
from tiedlora.peft.layer import AdaptedLinear, TiedFactors, TiedLoRAAdapter
from tiedlora.sharding import gather_full, shard, shard_spec

ADAPTER_DTYPE = torch.float32  # adapters stay fp32 even when the base is bf16


# ----------------------------------------------------------------------------- init
def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))


def init_full(shape: Tuple[int, ...], init, seed: int, key: str) -> torch.Tensor:
    """A full fp32 tensor on the CPU, reproducible from (seed, key) alone."""
    t = torch.empty(shape, dtype=ADAPTER_DTYPE)
    if init == "zeros":
        return t.zero_()
    if init == "ones":
        return t.fill_(1.0)
    if isinstance(init, float):
        return t.fill_(init)
    g = _generator(seed, key)
    if init == "normal":
        return t.normal_(0.0, 0.02, generator=g)
    if init == "kaiming_uniform":  # torch's Linear default (a = sqrt(5)): U(±1/sqrt(fan_in))
        bound = 1.0 / (shape[-1] ** 0.5) if len(shape) == 2 else 1.0
        return t.uniform_(-bound, bound, generator=g)
    raise ValueError(f"unknown init {init!r}")


def _set_tp_attrs(p: nn.Parameter, dim: int, stride: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(p, is_parallel=True, dim=dim, stride=stride)


# ------------------------------------------------------------------------ placement
def _base_mode(base: nn.Module) -> str:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(base, ColumnParallelLinear):
        return "column"
    if isinstance(base, RowParallelLinear):
        return "row"
    # transformer-engine linears (model.attention_backend=te) name their mode; a fused
    # layernorm-linear hands the adapter its normalised input (AdaptedLinear)
    if getattr(base, "parallel_mode", None) in ("column", "row") and hasattr(base, "in_features"):
        return base.parallel_mode
    raise TypeError(
        f"cannot adapt {type(base).__name__}: tiedlora adapts megatron-core's "
        "ColumnParallelLinear/RowParallelLinear and transformer-engine's parallel linears")


class FactorSpec:
    """Where a factor lives on this rank: full shape, shard dim (or None), stride."""

    def __init__(self, full_shape, shard_dim: Optional[int], stride: int = 1):
        self.full_shape, self.shard_dim, self.stride = tuple(full_shape), shard_dim, stride


def factor_specs(mode: str, d_in: int, d_out: int, r: int, stride: int) -> Dict[str, FactorSpec]:
    if mode == "column":
        return {"A": FactorSpec((r, d_in), None), "B": FactorSpec((d_out, r), 0, stride),
                "u": FactorSpec((r,), None), "v": FactorSpec((d_out,), 0, stride)}
    return {"A": FactorSpec((r, d_in), 1), "B": FactorSpec((d_out, r), None),
            "u": FactorSpec((r,), None), "v": FactorSpec((d_out,), None)}


def _make_param(spec: FactorSpec, init, seed: int, key: str, tp_rank: int, tp_size: int,
                device: torch.device) -> nn.Parameter:
    if device.type == "meta":
        shape = list(spec.full_shape)
        if spec.shard_dim is not None:
            shape[spec.shard_dim] //= tp_size
        p = nn.Parameter(torch.empty(shape, dtype=ADAPTER_DTYPE, device="meta"))
    else:
        full = init_full(spec.full_shape, init, seed, key)
        if spec.shard_dim is not None:
            full = shard(full, spec.shard_dim, tp_rank, tp_size, spec.stride)
        p = nn.Parameter(full.contiguous().to(device))
    if spec.shard_dim is not None:
        _set_tp_attrs(p, spec.shard_dim, spec.stride)
    return p


def _transformer_layers(model: nn.Module):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return [m for m in model.modules() if isinstance(m, TransformerLayer)]


def _find_target(layer: nn.Module, target: str) -> Tuple[nn.Module, str, nn.Module]:
    for name, mod in layer.named_modules():
        if name.split(".")[-1] == target:
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            return parent, target, mod
    raise ValueError(
        f"peft.target_modules: {target!r} is not present in transformer layer "
        f"{layer.layer_number} of this model")


def apply_peft(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Freeze ``model`` and add the adapters described by ``cfg`` (in place; returns model)."""
    layers = _transformer_layers(model)
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("model already has adapters; build a fresh base model")
    for p in model.parameters():
        p.requires_grad_(False)
    model.peft_config = cfg
    if not layers:
        # A pipeline stage with no transformer layers still needs the owner for symmetry.
        model.tied_adapters = TiedFactors()
        return model

    owner = TiedFactors()
    model.tied_adapters = owner
    sp = bool(getattr(model.config, "sequence_parallel", False))
    for layer in layers:
        for target in cfg.target_modules:
            parent, attr, base = _find_target(layer, target)
            adapter = make_adapter(base, target, layer.layer_number, cfg, owner, sp)
            setattr(parent, attr, AdaptedLinear(base, adapter))
    declare_trainable(model, cfg)
    return model


def make_adapter(base: nn.Module, target: str, layer_number: int, cfg: PeftConfig,
                 owner: TiedFactors, sequence_parallel: bool) -> TiedLoRAAdapter:
    """The adapter for one megatron-core parallel linear ``base`` (not yet wrapped).

    ``layer_number`` is megatron's global 1-based layer number. Per-layer factors are
    registered on the returned adapter; tied A/B are created on ``owner`` the first time a
    target kind is seen and only referenced afterwards. Used by :func:`apply_peft` and by
    the NeMo integration (``tiedlora.integrations.nemo``), so both build identical factors.
    """
    idx = layer_number - 1  # global 0-based
    mode = _base_mode(base)
    group = base.tp_group
    tp_rank, tp_size = group.rank(), group.size()
    d_in = getattr(base, "input_size", None) or base.in_features  # full (unsharded) sizes
    d_out = getattr(base, "output_size", None) or base.out_features
    stride = getattr(base.weight, "partition_stride", 1) if mode == "column" else 1
    device = base.weight.device
    specs = factor_specs(mode, d_in, d_out, cfg.rank, stride)
    adapter = TiedLoRAAdapter(mode, target, layer_number, cfg.scale, cfg.dropout,
                              group, sequence_parallel, owner, cfg.dropout_position)
    for name in FACTORS:
        fcfg = getattr(cfg, name)
        if cfg.is_identity(name):
            continue
        init = cfg.resolved_init(name)
        if name in ("A", "B") and fcfg.tied:
            if owner.get(target, name) is None:
                owner.put(target, name, _make_param(
                    specs[name], init, cfg.seed, f"{target}/{name}/tied",
                    tp_rank, tp_size, device))
            continue
        setattr(adapter, name, _make_param(
            specs[name], init, cfg.seed, f"{target}/{name}/layer{idx}",
            tp_rank, tp_size, device))
    if adapter.sequence_parallel:
        _mark_sequence_parallel(adapter, owner, mode, target)
    return adapter


def _mark_sequence_parallel(adapter: TiedLoRAAdapter, owner: TiedFactors, mode: str, target: str):
    """Replicated factors that see only a sequence chunk: A, u (column); u, B, v (row)."""
    names = ("A", "u") if mode == "column" else ("u", "B", "v")
    for name in names:
        p = adapter.factor(name)
        if p is not None:
            p.sequence_parallel = True


def declare_trainable(model: nn.Module, cfg: PeftConfig) -> None:
    """``requires_grad`` from the config flags alone: the base and frozen factors get none."""
    for p in model.parameters():
        p.requires_grad_(False)
    for rec in iter_adapter_params(model):
        rec.param.requires_grad_(bool(getattr(cfg, rec.factor).trainable))


def adapter_modules(model: nn.Module) -> List[TiedLoRAAdapter]:
    return [m for m in model.modules() if isinstance(m, TiedLoRAAdapter)]


class AdapterParam(NamedTuple):
    """One adapter tensor of a model chunk, as the optimizer, gradient synchronisation,
    clipping and checkpoints see it (they read these fields, never the name's spelling)."""

    name: str  # layout-independent: tied.{target}.{A|B} or layers.{i}.{target}.{A|B|u|v}
    param: nn.Parameter
    factor: str  # A | B | u | v
    tied: bool  # one tensor for every layer of its target kind (a copy per chunk/stage)
    shard_dim: Optional[int]  # dimension sharded over tensor parallel; None: replicated
    stride: int  # megatron's partition stride of that dimension
    adapter: Optional[TiedLoRAAdapter]  # the layer's adapter; None for a tied factor


def iter_adapter_params(model: nn.Module) -> Iterable[AdapterParam]:
    """Every adapter tensor of ``model`` (one chunk) as an :class:`AdapterParam`; tied
    factors are yielded once."""
    owner = getattr(model, "tied_adapters", None)
    if owner is not None:
        for pname, p in owner.named_parameters(recurse=False):
            target, factor = pname.rsplit("_", 1)
            yield AdapterParam(f"tied.{target}.{factor}", p, factor, True, *shard_spec(p), None)
    for ad in adapter_modules(model):
        for factor in FACTORS:
            p = getattr(ad, factor)
            if p is not None:
                yield AdapterParam(f"layers.{ad.layer_number - 1}.{ad.target}.{factor}", p, factor,
                                   False, *shard_spec(p), ad)


def trainable_params(chunks: List[nn.Module]) -> List[AdapterParam]:
    """The trainable adapter tensors of this rank's chunks; a tied factor appears once (the
    first chunk's copy: the one the optimizer steps)."""
    seen, out = set(), []
    for chunk in chunks:
        for rec in iter_adapter_params(chunk):
            if rec.param.requires_grad and rec.name not in seen:
                seen.add(rec.name)
                out.append(rec)
    return out


def adapter_parameters(model: nn.Module, trainable_only: bool = True) -> Dict[str, nn.Parameter]:
    """The adapter tensors by layout-independent name (what the optimizer and checkpoints see)."""
    return {r.name: r.param for r in iter_adapter_params(model) if r.param.requires_grad or not trainable_only}


def _as_list(chunks) -> List[nn.Module]:
    return chunks if isinstance(chunks, list) else [chunks]


def adapter_state_dict(chunks: List[nn.Module] | nn.Module, grads: bool = False, groups=None
                       ) -> Dict[str, torch.Tensor]:
    """Full (unsharded) adapter tensors of the whole model, on the CPU, sorted by name.

    Collective: every rank of the model-parallel group must call it. Gathers tensor-parallel
    shards (with their partition stride) and the layers of every pipeline stage, so the
    result does not depend on the TP/PP layout. ``grads=True`` gathers the gradients of
    the trainable tensors instead (for tests and diagnostics). ``groups``: this rank's
    :class:`tiedlora.dist.ProcessGroups` (default: read from megatron's parallel state).
    """
    from tiedlora.dist import process_groups

    groups = groups or process_groups()
    items = ((r.name, r.param.grad if grads else r.param, r.shard_dim, r.stride)
             for chunk in _as_list(chunks) for r in iter_adapter_params(chunk)
             if not (grads and r.param.grad is None))
    full = gather_full(items, groups.tp, groups.pp)
    return {k: v.to(ADAPTER_DTYPE) for k, v in sorted(full.items())}


def load_adapter_state_dict(chunks: List[nn.Module] | nn.Module, state: Dict[str, torch.Tensor],
                            strict: bool = True, groups=None) -> None:
    """Copy full adapter tensors into this rank's shards (any TP/PP layout)."""
    from tiedlora.dist import process_groups

    groups = groups or process_groups()
    tp_rank, tp = groups.rank(groups.tp), groups.size(groups.tp)
    seen = set()
    for chunk in _as_list(chunks):
        for rec in iter_adapter_params(chunk):
            if rec.name not in state:
                raise KeyError(f"adapter checkpoint has no tensor {rec.name!r}")
            full = state[rec.name]
            t = shard(full, rec.shard_dim, tp_rank, tp, rec.stride) if rec.shard_dim is not None else full
            if tuple(t.shape) != tuple(rec.param.shape):
                raise ValueError(
                    f"adapter tensor {rec.name!r}: checkpoint shape {tuple(full.shape)} does not fit "
                    f"this model's {tuple(rec.param.shape)} (shard of TP={tp})")
            with torch.no_grad():
                rec.param.copy_(t.to(rec.param.device, rec.param.dtype))
            seen.add(rec.name)
    if strict and groups.size(groups.pp) == 1:
        extra = sorted(set(state) - seen)
        if extra:
            raise KeyError(f"adapter checkpoint has tensors this model lacks: {extra[:5]}")
