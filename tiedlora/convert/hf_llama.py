"""Hugging Face LLaMA checkpoints (LLaMA-2 and LLaMA-architecture models, incl. GQA).

A model directory holds ``config.json``, the weights (``model.safetensors``, or shards
named by ``model.safetensors.index.json``; or ``pytorch_model*.bin`` likewise) and the
tokenizer (``tokenizer.model`` and/or ``tokenizer.json``). Keys and where they land
(:mod:`tiedlora.convert.layout` names, layer i)::

    model.embed_tokens.weight                  embedding.word_embeddings.weight
    model.layers.i.input_layernorm.weight      decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj      decoder.layers.i.self_attention.linear_qkv
        fused per query group g: [q heads of g (heads/groups of them); k_g; v_g]
    model.layers.i.self_attn.o_proj            decoder.layers.i.self_attention.linear_proj
    model.layers.i.post_attention_layernorm    decoder.layers.i.pre_mlp_layernorm
    model.layers.i.mlp.{gate,up}_proj          decoder.layers.i.mlp.linear_fc1 = [gate; up]
        (megatron's SwiGLU computes silu(first half) * second half)
    model.layers.i.mlp.down_proj               decoder.layers.i.mlp.linear_fc2
    model.norm.weight                          decoder.final_layernorm.weight
    lm_head.weight                             output_layer.weight (untied only)

Hugging Face stores q and k already in the rotate-half RoPE layout that megatron-core uses
(``rotary_interleaved=False``), so rows are not permuted. ``.bin`` shards are read with
``torch.load(weights_only=True)``; safetensors are read one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from tiedlora.convert.layout import (
    CheckpointFormatError,
    LazyTensor,
    Source,
    _natural,
    _short,
    fuse_qkv,
    split_fc1,
    split_qkv,
)
from tiedlora.files import staged_dir, to_json
from tiedlora.config import ModelConfig

CONFIG_FILE = "config.json"
ST_INDEX, ST_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
_WEIGHT_FILE = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin)$|\.index\.json$")
_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default max_shard_size


# ------------------------------------------------------------------------------ config
def read_config(path: Path) -> dict:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointFormatError(f"{path}: no {CONFIG_FILE}; not a Hugging Face model directory")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{f}: not valid JSON ({e})") from None


def _rope(hcfg: dict, where: str) -> float:
    params = hcfg.get("rope_parameters")
    if params is None:  # transformers 4.x: rope_theta and rope_scaling at the top level
        params = dict(hcfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", hcfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise CheckpointFormatError(
            f"{where}: rope_type={rope_type!r}: only plain RoPE (rope_type 'default') is supported")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointFormatError(f"{where}: partial_rotary_factor is not supported for LLaMA")
    return float(params.get("rope_theta", 10000.0))


def model_config(hcfg: dict, name: str, where: str) -> ModelConfig:
    """ModelConfig of a Hugging Face LLaMA ``config.json``."""
    arch = hcfg.get("architectures") or []
    if hcfg.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise CheckpointFormatError(
            f"{where}: model_type={hcfg.get('model_type')!r} (architectures {arch}): only LLaMA "
            "(model_type 'llama') checkpoints are supported")
    if hcfg.get("hidden_act", "silu") != "silu":
        raise CheckpointFormatError(f"{where}: hidden_act={hcfg.get('hidden_act')!r}: expected silu")
    for key in ("attention_bias", "mlp_bias"):
        if hcfg.get(key):
            raise CheckpointFormatError(f"{where}: {key}=true is not supported (LLaMA has no biases)")
    # pretraining_tp only changes how transformers splits the matmuls, not the weights.
    theta = _rope(hcfg, where)
    if theta != int(theta):
        raise CheckpointFormatError(f"{where}: rope_theta={theta!r}: must be an integer")
    heads = int(hcfg["num_attention_heads"])
    hidden = int(hcfg["hidden_size"])
    kv = hcfg.get("num_key_value_heads")
    head_dim = hcfg.get("head_dim")
    dtype = hcfg.get("dtype") or hcfg.get("torch_dtype") or "float32"
    try:
        return ModelConfig(
            name=name,
            num_layers=int(hcfg["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(hcfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=None if kv in (None, heads) else int(kv),
            kv_channels=None if head_dim in (None, hidden // heads) else int(head_dim),
            vocab_size=int(hcfg["vocab_size"]),
            seq_length=int(hcfg.get("max_position_embeddings", 4096)),
            normalization="RMSNorm",
            layernorm_epsilon=float(hcfg.get("rms_norm_eps", 1e-6)),
            activation="swiglu",
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=int(theta),
            add_bias_linear=False,
            untie_embeddings_and_output_weights=not bool(hcfg.get("tie_word_embeddings", False)),
            params_dtype=_DTYPES.get(str(dtype).replace("torch.", ""), "float32"),
        )
    except KeyError as e:
        raise CheckpointFormatError(f"{where}: {CONFIG_FILE} has no {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointFormatError(f"{where}: {CONFIG_FILE}: {e}") from None


def model_config_from_checkpoint(path: os.PathLike | str) -> ModelConfig:
    path = Path(path)
    cfg = model_config(read_config(path), path.name, str(path))
    cfg.checkpoint = str(path)
    return cfg


def tokenizer_path(path: os.PathLike | str, extract_to: Optional[os.PathLike | str] = None) -> Path:
    """``tokenizer.model`` (SentencePiece) if present, else the directory (``tokenizer.json``).

    ``extract_to`` is unused: a model directory's tokenizer is read in place.
    """
    path = Path(path)
    if (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    if (path / "tokenizer.json").is_file():
        return path
    raise CheckpointFormatError(
        f"{path}: no tokenizer.model or tokenizer.json in this Hugging Face folder; set "
        "model.tokenizer=/path/to/tokenizer.model (SentencePiece) or model.tokenizer=/path/to/folder "
        "(one holding tokenizer.json)")


# ------------------------------------------------------------------------------ weights
class WeightFiles:
    """Lazy, read-only access to the tensors of a model directory, by Hugging Face key."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files: Dict[str, str] = {}  # key -> file name
        self.kind = ""
        self._bin_cache: Dict[str, dict] = {}
        p = self.path
        if (p / ST_INDEX).is_file():
            self.kind, self.files = "safetensors", self._index(ST_INDEX)
        elif (p / ST_SINGLE).is_file():
            self.kind, self.files = "safetensors", {k: ST_SINGLE for k in self._st_keys(ST_SINGLE)}
        elif (p / BIN_INDEX).is_file():
            self.kind, self.files = "bin", self._index(BIN_INDEX)
        elif (p / BIN_SINGLE).is_file():
            self.kind, self.files = "bin", {k: BIN_SINGLE for k in self._bin(BIN_SINGLE)}
        else:
            raise CheckpointFormatError(
                f"{p}: no weights ({ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")

    def _index(self, name: str) -> Dict[str, str]:
        try:
            wmap = json.loads((self.path / name).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(f"{self.path / name}: not a weight index ({e})") from None
        for f in sorted(set(wmap.values())):
            if "/" in f or "\\" in f or f.startswith(".") or not (self.path / f).is_file():
                raise CheckpointFormatError(f"{self.path / name} names {f!r}, which is not a file of this directory")
        return dict(wmap)

    def _st_keys(self, name: str):
        from safetensors import safe_open

        try:
            with safe_open(str(self.path / name), framework="pt") as f:
                return list(f.keys())
        except Exception as e:
            raise CheckpointFormatError(f"{self.path / name}: not a readable safetensors file ({e})") from None

    def _bin(self, name: str) -> dict:
        if name not in self._bin_cache:
            f = self.path / name
            try:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointFormatError(
                    f"{f}: cannot read as a plain tensor state dict (torch.load weights_only=True: "
                    f"{type(e).__name__}: {e})") from None
            self._bin_cache[name] = sd
        return self._bin_cache[name]

    def read(self, key: str) -> torch.Tensor:
        name = self.files[key]
        if self.kind == "bin":
            return self._bin(name)[key]
        from safetensors import safe_open

        try:
            with safe_open(str(self.path / name), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - safetensors' own errors name no file
            raise CheckpointFormatError(f"{self.path / name}: not a readable safetensors file ({e}); "
                                        f"expected the shard holding {key!r}") from None

    def lazy(self, key: str) -> Callable[[], torch.Tensor]:
        return lambda: self.read(key)


_L = r"layers\.(\d+)\."
_DIRECT = [
    (re.compile(r"^embed_tokens\.weight$"), "embedding.word_embeddings.weight"),
    (re.compile(r"^norm\.weight$"), "decoder.final_layernorm.weight"),
    (re.compile("^" + _L + r"input_layernorm\.weight$"), r"decoder.layers.\1.input_layernorm.weight"),
    (re.compile("^" + _L + r"post_attention_layernorm\.weight$"), r"decoder.layers.\1.pre_mlp_layernorm.weight"),
    (re.compile("^" + _L + r"self_attn\.o_proj\.weight$"), r"decoder.layers.\1.self_attention.linear_proj.weight"),
    (re.compile("^" + _L + r"mlp\.down_proj\.weight$"), r"decoder.layers.\1.mlp.linear_fc2.weight"),
]
_FUSED = re.compile("^" + _L + r"(self_attn\.([qkv])_proj|mlp\.(gate|up)_proj)\.weight$")
_IGNORED = re.compile("^" + _L + r"self_attn\.rotary_emb\.inv_freq$")


def to_canonical(files: WeightFiles, cfg: ModelConfig, where: str) -> Tuple[Source, str]:
    """(canonical source, key prefix ``model.`` or empty) of a model directory's tensors."""
    source: Source = {}
    parts: Dict[Tuple[str, str], Dict[str, str]] = {}
    unknown, prefixes = [], set()
    for key in files.files:
        if key == "lm_head.weight":
            if cfg.untie_embeddings_and_output_weights:
                source["output_layer.weight"] = LazyTensor(key, files.lazy(key))
            continue  # tied: a copy of the embeddings
        prefix = "model." if key.startswith("model.") else ""
        rest = key[len(prefix):]
        if _IGNORED.match(rest):
            continue
        prefixes.add(prefix)
        for pat, repl in _DIRECT:
            if pat.match(rest):
                source[pat.sub(repl, rest)] = LazyTensor(key, files.lazy(key))
                break
        else:
            m = _FUSED.match(rest)
            if not m:
                unknown.append(key)
                continue
            i, which = m.group(1), m.group(3) or m.group(4)
            kind = "qkv" if which in "qkv" else "fc1"
            parts.setdefault((i, kind), {})[which] = key
    if unknown:
        raise CheckpointFormatError(f"{where}: unknown key(s) {_short(sorted(unknown, key=_natural))}")
    if len(prefixes) > 1:
        raise CheckpointFormatError(f"{where}: mixed key prefixes {sorted(prefixes)}")
    for (i, kind), keys in parts.items():
        need = ("q", "k", "v") if kind == "qkv" else ("gate", "up")
        missing = [n for n in need if n not in keys]
        if missing:
            raise CheckpointFormatError(
                f"{where}: layer {i}: {', '.join(keys.values())} without its "
                f"{'/'.join(m + '_proj' for m in missing)}")
        if kind == "qkv":
            q, k, v = (keys[n] for n in need)
            name = f"decoder.layers.{i}.self_attention.linear_qkv.weight"
            source[name] = LazyTensor(f"{q} + k_proj + v_proj", _fused_qkv(files, q, k, v, cfg, where))
        else:
            g, u = keys["gate"], keys["up"]
            name = f"decoder.layers.{i}.mlp.linear_fc1.weight"
            source[name] = LazyTensor(f"{g} + up_proj", lambda g=g, u=u: torch.cat([files.read(g), files.read(u)], 0))
    return source, (prefixes.pop() if prefixes else "model.")


def _fused_qkv(files: WeightFiles, q: str, k: str, v: str, cfg: ModelConfig, where: str):
    def read():
        tq, tk, tv = files.read(q), files.read(k), files.read(v)
        heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads, cfg.head_dim
        for key, t, rows in ((q, tq, heads * d), (k, tk, groups * d), (v, tv, groups * d)):
            if t.shape[0] != rows:
                raise CheckpointFormatError(
                    f"{where}: {key} has shape {tuple(t.shape)}; expected {rows} rows "
                    f"(heads={heads}, groups={groups}, head_dim={d})")
        return fuse_qkv(tq, tk, tv, cfg)

    return read


def from_canonical(name: str, t: torch.Tensor, cfg: ModelConfig, prefix: str) -> Dict[str, torch.Tensor]:
    """Inverse of the key table for one canonical tensor."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)\.weight$", name)
    if m:
        i, mod = m.groups()
        p = f"{prefix}layers.{i}."
        if mod == "self_attention.linear_qkv":
            q, k, v = split_qkv(t, cfg)
            return {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v}
        if mod == "mlp.linear_fc1":
            gate, up = split_fc1(t)
            return {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
        table = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm",
                 "self_attention.linear_proj": "self_attn.o_proj", "mlp.linear_fc2": "mlp.down_proj"}
        return {p + table[mod] + ".weight": t}
    table = {"embedding.word_embeddings.weight": prefix + "embed_tokens.weight",
             "decoder.final_layernorm.weight": prefix + "norm.weight",
             "output_layer.weight": "lm_head.weight"}
    return {table[name]: t}


# ---------------------------------------------------------------------------- public API
def read_source(path: os.PathLike | str, cfg: ModelConfig) -> Source:
    from tiedlora.convert.layout import check_names

    where = str(path)
    source, _ = to_canonical(WeightFiles(Path(path)), cfg, where)
    check_names(source, cfg, where)
    return source


def save_merged(src: os.PathLike | str, out: os.PathLike | str, replaced: Dict[str, torch.Tensor],
                cfg: ModelConfig, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the model directory ``src`` with the canonical tensors in ``replaced`` swapped in.

    Weights go to safetensors (sharded with an index above ``max_shard_bytes``) in each
    tensor's original dtype; every other tensor is copied bit for bit and every non-weight
    file (config, tokenizer, generation config) is copied. The directory is built under a
    temporary name and renamed into place; ``out`` must not exist yet.
    """
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output directory")
    files = WeightFiles(src)
    _, prefix = to_canonical(files, cfg, str(src))
    updates: Dict[str, torch.Tensor] = {}
    for name, t in replaced.items():
        updates.update(from_canonical(name, t, cfg, prefix))
    missing = sorted(set(updates) - set(files.files))
    if missing:
        raise CheckpointFormatError(f"{src}: merged tensors map to keys the source lacks: {_short(missing)}")
    with staged_dir(out) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and not _WEIGHT_FILE.search(f.name):
                shutil.copyfile(f, tmp / f.name)
        parts: List[Path] = []  # one shard in memory at a time; named once the count is known
        current: Dict[str, torch.Tensor] = {}
        wmap: Dict[str, int] = {}
        size = total = 0

        def flush():
            parts.append(tmp / f".part{len(parts)}")
            save_file(current, str(parts[-1]), metadata={"format": "pt"})
            current.clear()

        for key in sorted(files.files, key=_natural):
            orig = files.read(key)
            t = updates[key].to(orig.dtype) if key in updates else orig
            if tuple(t.shape) != tuple(orig.shape):
                raise CheckpointFormatError(
                    f"{src}: merged {key} has shape {tuple(t.shape)}, the source {tuple(orig.shape)}")
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            current[key] = t.contiguous()
            wmap[key] = len(parts)
            size += nbytes
            total += nbytes
        flush()
        if len(parts) == 1:
            os.replace(parts[0], tmp / ST_SINGLE)
        else:
            names = [f"model-{n:05d}-of-{len(parts):05d}.safetensors" for n in range(1, len(parts) + 1)]
            for part, name in zip(parts, names):
                os.replace(part, tmp / name)
            (tmp / ST_INDEX).write_text(to_json(
                {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in wmap.items()}},
                indent=2))
    return out
