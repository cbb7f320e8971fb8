"""Canonical (layout-independent) base-weight names, and loading them into any TP/PP layout.

Every converter maps its source format onto *canonical* names: megatron-core GPTModel
parameter names (local layer spec) with the *global* 0-based layer index and without the
``.base`` that :class:`tiedlora.peft.AdaptedLinear` inserts; tensors are full (unsharded,
TP=1 layout)::

    embedding.word_embeddings.weight                  [V, h]      (V: the source's rows)
    embedding.position_embeddings.weight              [S, h]      (learned_absolute only)
    decoder.layers.{i}.input_layernorm.{weight,bias}  [h]         (bias: LayerNorm only)
    decoder.layers.{i}.self_attention.linear_qkv.weight   [qkv, h]    per query group g:
                                                                      [q heads of g; k_g; v_g]
    decoder.layers.{i}.self_attention.linear_proj.weight  [h, heads*d]
    decoder.layers.{i}.pre_mlp_layernorm.{weight,bias}    [h]
    decoder.layers.{i}.mlp.linear_fc1.weight          [2·ffn, h]  SwiGLU: [gate; up]
    decoder.layers.{i}.mlp.linear_fc2.weight          [h, ffn]
    decoder.final_layernorm.{weight,bias}             [h]
    output_layer.weight                               [V, h]      (untied embeddings only)

(plus ``.bias`` of the four linears when ``add_bias_linear``, of ``linear_qkv`` alone when
``add_qkv_bias``, fused like its weight). A source is a
:class:`Source`: a dict canonical name -> :class:`LazyTensor` (the tensor is read only when
this rank needs it, so a rank holds one full tensor at a time, never the whole model),
checked against :func:`expected_names` so that every unknown or missing key is reported by
name before anything is loaded.

:func:`load_source` slices each full tensor to this rank's shard with the parameter's own
tensor-parallel attributes (``partition_dim``, ``partition_stride``: 2 for SwiGLU's fc1,
whose shard r is [gate_r; up_r]), so one source loads into any TP size; under pipeline
parallelism each chunk maps its local layers through ``TransformerLayer.layer_number``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from tiedlora.config import ModelConfig
from tiedlora.sharding import gather_full as _gather, shard, shard_spec

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
VOCAB_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")
LINEARS = {  # adapter target -> canonical submodule path inside a layer
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}


class CheckpointFormatError(ValueError):
    """A base checkpoint that cannot be read or does not fit the model (names the culprit)."""


@dataclass
class LazyTensor:
    """A full canonical tensor, read on demand. ``origin`` names the source key(s)."""

    origin: str
    read: Callable[[], torch.Tensor]


Source = Dict[str, LazyTensor]


# ------------------------------------------------------------------------------ names
def layer_name(i: int, target: str, what: str = "weight") -> str:
    return f"decoder.layers.{i}.{LINEARS[target]}.{what}"


def expected_names(cfg: ModelConfig) -> List[str]:
    """Every canonical tensor a GPTModel built from ``cfg`` holds (at PP=1)."""
    ln = ["weight", "bias"] if cfg.normalization == "LayerNorm" else ["weight"]
    names = ["embedding.word_embeddings.weight"]
    if cfg.position_embedding_type == "learned_absolute":
        names.append("embedding.position_embeddings.weight")
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm." + w for w in ln]
        names += [p + "pre_mlp_layernorm." + w for w in ln]
        for target in LINEARS:
            names.append(layer_name(i, target))
            if cfg.add_bias_linear or (cfg.add_qkv_bias and target == "linear_qkv"):
                names.append(layer_name(i, target, "bias"))
    names += ["decoder.final_layernorm." + w for w in ln]
    if cfg.untie_embeddings_and_output_weights:
        names.append("output_layer.weight")
    return names


def check_names(source: Source, cfg: ModelConfig, where: str) -> None:
    """Refuse a source whose canonical tensors differ from what ``cfg`` builds, by name."""
    want, have = set(expected_names(cfg)), set(source)
    missing = sorted(want - have, key=_natural)
    extra = sorted(have - want, key=_natural)
    msgs = []
    if missing:
        msgs.append(f"missing tensor(s) {_short(missing)}")
    if extra:
        msgs.append("tensor(s) this model has no place for: "
                    + _short([f"{source[n].origin} (-> {n})" for n in extra]))
    if msgs:
        raise CheckpointFormatError(f"{where}: " + "; ".join(msgs))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _short(items: List[str], n: int = 8) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


# ------------------------------------------------------------------- fused QKV / SwiGLU
def _groups(cfg: ModelConfig) -> Tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    return heads, groups, cfg.head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """q [heads·d, ...], k, v [groups·d, ...] -> megatron's [groups, (heads/groups + 2)·d, ...]."""
    heads, groups, d = _groups(cfg)
    rest = tuple(q.shape[1:])
    q = q.reshape(groups, heads // groups * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: (q, k, v) with rows in head order."""
    heads, groups, d = _groups(cfg)
    rest = tuple(qkv.shape[1:])
    if qkv.shape[0] != (heads + 2 * groups) * d:
        raise CheckpointFormatError(
            f"fused QKV has {qkv.shape[0]} rows; expected (heads + 2·groups)·head_dim = "
            f"{(heads + 2 * groups) * d}")
    t = qkv.reshape(groups, (heads // groups + 2) * d, *rest)
    hq = heads // groups * d
    q = t[:, :hq].reshape(heads * d, *rest)
    k = t[:, hq:hq + d].reshape(groups * d, *rest)
    v = t[:, hq + d:].reshape(groups * d, *rest)
    return q, k, v


def split_fc1(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU's fused fc1 [gate; up] -> (gate, up)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


# ----------------------------------------------------------------- model <-> canonical
def _layer_offsets(chunk: nn.Module) -> Dict[int, int]:
    layers = getattr(getattr(chunk, "decoder", None), "layers", None) or []
    return {j: layer.layer_number - 1 for j, layer in enumerate(layers)}


# transformer-engine's layer spec fuses each pre-norm into the linear after it and names its
# weights there (model.attention_backend=te); the canonical names are the local spec's
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_name(name: str, offsets: Dict[int, int]) -> str:
    """A chunk's parameter name -> canonical name (global layer, no ``.base``, TE's fused
    norms under the local spec's names)."""
    name = name.replace(".base.", ".")
    for te, local in _TE_NORMS.items():
        if name.endswith("." + te):
            name = name[: -len(te)] + local
    m = _LAYER.match(name)
    if m:
        name = f"decoder.layers.{offsets[int(m.group(1))]}." + name[m.end():]
    return name


def base_parameters(chunk: nn.Module) -> Iterable[Tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of every base parameter of a chunk (adapters skipped)."""
    offsets = _layer_offsets(chunk)
    for name, p in chunk.named_parameters():
        if ".adapter." in name or name.startswith("tied_adapters."):
            continue
        yield canonical_name(name, offsets), p


def _fit_vocab(full: torch.Tensor, rows: int, cfg: ModelConfig, name: str, origin: str) -> torch.Tensor:
    """Pad (zeros) or trim the vocabulary padding to this TP size's padded vocabulary."""
    have = full.shape[0]
    if have == rows:
        return full
    if have < cfg.vocab_size:
        raise CheckpointFormatError(
            f"{origin}: {have} vocabulary rows, fewer than model.vocab_size={cfg.vocab_size}")
    if have > rows:  # rows beyond the model's padded vocabulary: padding of another TP size
        return full[:rows]
    pad = torch.zeros((rows - have,) + tuple(full.shape[1:]), dtype=full.dtype)
    return torch.cat([full, pad], dim=0)


@torch.no_grad()
def load_source(chunks: List[nn.Module], source: Source, cfg: ModelConfig, where: str) -> None:
    """Copy ``source`` into this rank's parameters (any TP/PP layout; every rank calls it)."""
    from tiedlora.dist import process_groups

    check_names(source, cfg, where)
    groups = process_groups()
    rank, tp = groups.rank(groups.tp), groups.size(groups.tp)
    for chunk in chunks:
        for name, p in base_parameters(chunk):
            key = name
            if key == "output_layer.weight" and not cfg.untie_embeddings_and_output_weights:
                key = "embedding.word_embeddings.weight"  # tied copy on the last PP stage
            if key not in source:
                raise CheckpointFormatError(f"{where}: no tensor for model parameter {name!r}")
            lazy = source[key]
            full = lazy.read()
            dim, stride = shard_spec(p)
            want = list(p.shape)
            if dim is not None:
                want[dim] *= tp
            if key in VOCAB_NAMES:
                full = _fit_vocab(full, want[0], cfg, name, lazy.origin)
            if list(full.shape) != want:
                raise CheckpointFormatError(
                    f"{where}: {lazy.origin} has shape {tuple(full.shape)}, but {name} needs "
                    f"{tuple(want)} (model.* settings vs the checkpoint?)")
            t = shard(full, dim, rank, tp, stride) if dim is not None else full
            p.copy_(t.to(p.device, p.dtype))


def gather_full(chunks: List[nn.Module], names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Full canonical tensors (CPU) of the named base parameters (all if None).

    Collective over the tensor- and pipeline-parallel groups: every rank calls it and every
    rank gets the result.
    """
    from tiedlora.dist import process_groups

    wanted = None if names is None else set(names)
    groups = process_groups()
    items = ((name, p, *shard_spec(p)) for chunk in chunks for name, p in base_parameters(chunk)
             if wanted is None or name in wanted)
    out = _gather(items, groups.tp, groups.pp)
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


# ------------------------------------------------------------------------ shared checks
ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "normalization", "layernorm_zero_centered_gamma", "activation",
               "position_embedding_type", "add_bias_linear", "add_qkv_bias",
               "untie_embeddings_and_output_weights", "vocab_size", "sliding_window")
ROPE_SCALING_FIELDS = ("rope_scaling", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                       "rope_scaling_high_freq_factor", "rope_scaling_original_max_positions")


def check_model_matches(cfg: ModelConfig, ckpt: ModelConfig, where: str) -> None:
    """Refuse a model preset whose architecture differs from the checkpoint's, naming fields."""
    diffs = []
    for f in ARCH_FIELDS:
        if getattr(cfg, f) != getattr(ckpt, f):
            diffs.append(f"model.{f}={getattr(cfg, f)!r} (checkpoint: {getattr(ckpt, f)!r})")
    derived = {
        "num_query_groups": (cfg.num_query_groups or cfg.num_attention_heads,
                             ckpt.num_query_groups or ckpt.num_attention_heads),
        "kv_channels": (cfg.head_dim, ckpt.head_dim),
    }
    if cfg.position_embedding_type == "rope":
        derived["rotary_percent"] = (cfg.rotary_percent, ckpt.rotary_percent)
        derived["rotary_base"] = (cfg.rotary_base, ckpt.rotary_base)
        derived["rope_scaling"] = (cfg.rope_scaling, ckpt.rope_scaling)
        if cfg.rope_scaling is not None:
            derived.update({f: (getattr(cfg, f), getattr(ckpt, f)) for f in ROPE_SCALING_FIELDS[1:]})
    for f, (a, b) in derived.items():
        if a != b:
            diffs.append(f"model.{f}: {a!r} (checkpoint: {b!r})")
    if abs(cfg.layernorm_epsilon - ckpt.layernorm_epsilon) > 1e-12:
        diffs.append(f"model.layernorm_epsilon={cfg.layernorm_epsilon!r} "
                     f"(checkpoint: {ckpt.layernorm_epsilon!r})")
    if diffs:
        raise CheckpointFormatError(f"{where}: the model config does not match the checkpoint: "
                                    + "; ".join(diffs))
