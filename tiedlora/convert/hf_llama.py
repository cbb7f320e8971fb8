"""Hugging Face checkpoints of the LLaMA family: LLaMA-2/3.x, Mistral and Qwen2/2.5.

The three share one block (RMSNorm, RoPE, SwiGLU, optional grouped-query attention) and
differ in settings :func:`model_config` reads from ``config.json``: LLaMA-3.x's RoPE
scaling (``rope_type: llama3``), Qwen2's q/k/v biases, Mistral's sliding window (accepted
only where it never binds: the model's sequence length is capped at it), tied embeddings,
a ``head_dim`` other than hidden/heads. Every other field is known not to change the
computation or is refused by name (a field we do not understand is never ignored).

A model directory holds ``config.json``, the weights (``model.safetensors``, or shards
named by ``model.safetensors.index.json``; or ``pytorch_model*.bin`` likewise) and the
tokenizer (``tokenizer.model`` and/or ``tokenizer.json``). Keys and where they land
(:mod:`tiedlora.convert.layout` names, layer i)::

    model.embed_tokens.weight                  embedding.word_embeddings.weight
    model.layers.i.input_layernorm.weight      decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj      decoder.layers.i.self_attention.linear_qkv
        fused per query group g: [q heads of g (heads/groups of them); k_g; v_g]
        (weights, and Qwen2's biases likewise)
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


# model_type -> the transformers class it loads as; all three are the LLaMA block (RMSNorm,
# RoPE, SwiGLU, optional GQA) and differ only in the settings read below
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# config.json fields that do not change the model's computation (ids, bookkeeping, how
# transformers runs it); every other field is either read below or refused
_BENIGN = {"architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
           "transformers_version", "use_cache", "initializer_range", "_name_or_path", "_commit_hash", "output_attentions",
           "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "is_encoder_decoder",
           "chunk_size_feed_forward", "tie_word_embeddings",
           # pretraining_tp only changes how transformers splits LLaMA's matmuls, not the weights
           "pretraining_tp"}
_READ = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "vocab_size", "rope_theta",
         "rope_scaling", "rope_parameters", "attention_dropout", "attention_bias", "mlp_bias",
         "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "use_mrope"}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hcfg: dict, where: str) -> Tuple[float, dict]:
    """(rope_theta, ModelConfig's rope-scaling fields) of a config.json in either layout.

    transformers 5 writes ``rope_parameters`` (theta and type inside); checkpoints saved with
    transformers 4 carry top-level ``rope_theta`` and ``rope_scaling``.
    """
    params = hcfg.get("rope_parameters")
    if params is None:
        params = dict(hcfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", hcfg.get("rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    theta = float(params.pop("rope_theta", hcfg.get("rope_theta", 10000.0)))
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointFormatError(f"{where}: partial_rotary_factor={hcfg.get('partial_rotary_factor')!r} "
                                    "(rotating part of each head) is not supported for this family")
    if rope_type == "default":
        if params:
            raise CheckpointFormatError(f"{where}: RoPE fields {sorted(params)} with rope_type 'default' "
                                        "are not understood")
        return theta, {}
    if rope_type != "llama3":
        raise CheckpointFormatError(
            f"{where}: rope_type={rope_type!r}: only plain RoPE ('default') and LLaMA-3.x scaling ('llama3') "
            "are supported")
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    extra = sorted(set(params) - set(_LLAMA3_KEYS))
    if missing or extra:
        raise CheckpointFormatError(
            f"{where}: rope_type 'llama3' " + (f"without {missing}" if missing else f"with unknown fields {extra}"))
    return theta, {"rope_scaling": "llama3", "rope_scaling_factor": float(params["factor"]),
                   "rope_scaling_low_freq_factor": float(params["low_freq_factor"]),
                   "rope_scaling_high_freq_factor": float(params["high_freq_factor"]),
                   "rope_scaling_original_max_positions": int(params["original_max_position_embeddings"])}


def _window(hcfg: dict, family: str, layers: int) -> Optional[int]:
    """The sliding attention window any layer uses, or None (full causal attention everywhere)."""
    w = hcfg.get("sliding_window")
    if w is None:
        return None
    if family == "qwen2":  # Qwen2 windows only layers >= max_window_layers, and only when asked
        if not hcfg.get("use_sliding_window", False):
            return None
        types = hcfg.get("layer_types")
        sliding = ("sliding_attention" in types) if types else int(hcfg.get("max_window_layers", 0)) < layers
        if not sliding:
            return None
    if family == "llama":
        raise CheckpointFormatError(f"sliding_window={w!r}: LLaMA has no sliding-window attention")
    return int(w)


def model_config(hcfg: dict, name: str, where: str) -> ModelConfig:
    """ModelConfig of a Hugging Face ``config.json`` of the LLaMA family (LLaMA-2/3.x, Mistral, Qwen2/2.5).

    Every field is read, known not to change the computation, or refused by name.
    """
    family = hcfg.get("model_type")
    arch = hcfg.get("architectures") or []
    if family not in FAMILIES or (arch and FAMILIES[family] not in arch):
        raise CheckpointFormatError(
            f"{where}: model_type={family!r} (architectures {arch}): supported are "
            + ", ".join(f"{t!r} ({c})" for t, c in FAMILIES.items()))
    unknown = sorted(set(hcfg) - _BENIGN - _READ)
    if unknown:
        raise CheckpointFormatError(
            f"{where}: {CONFIG_FILE} field(s) " + ", ".join(f"{k}={hcfg[k]!r}" for k in unknown)
            + f" are not understood by the {family} converter and may change the model's computation; "
            "refusing rather than ignoring them")
    if hcfg.get("hidden_act", "silu") != "silu":
        raise CheckpointFormatError(f"{where}: hidden_act={hcfg.get('hidden_act')!r}: expected silu")
    for key in ("attention_bias", "mlp_bias"):  # LLaMA's optional biases (o_proj too: no megatron setting)
        if hcfg.get(key):
            raise CheckpointFormatError(f"{where}: {key}=true is not supported (LLaMA without biases only)")
    if hcfg.get("use_mrope"):
        raise CheckpointFormatError(f"{where}: use_mrope=true (Qwen2-VL's multimodal RoPE) is not supported")
    if float(hcfg.get("attention_dropout") or 0.0) != 0.0:
        raise CheckpointFormatError(f"{where}: attention_dropout={hcfg['attention_dropout']!r}: the base is "
                                    "fine-tuned with attention dropout off; expected 0.0")
    theta, scaling = _rope(hcfg, where)
    if theta != int(theta):
        raise CheckpointFormatError(f"{where}: rope_theta={theta!r}: must be an integer")
    heads = int(hcfg["num_attention_heads"])
    hidden = int(hcfg["hidden_size"])
    layers = int(hcfg["num_hidden_layers"])
    kv = hcfg.get("num_key_value_heads")
    head_dim = hcfg.get("head_dim")
    dtype = hcfg.get("dtype") or hcfg.get("torch_dtype") or "float32"
    try:
        window = _window(hcfg, family, layers)
        seq = int(hcfg.get("max_position_embeddings", 4096))
        return ModelConfig(
            name=name,
            num_layers=layers,
            hidden_size=hidden,
            ffn_hidden_size=int(hcfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=None if kv in (None, heads) else int(kv),
            kv_channels=None if head_dim in (None, hidden // heads) else int(head_dim),
            vocab_size=int(hcfg["vocab_size"]),
            # a window at least this long never binds, so attention within it is exact
            seq_length=seq if window is None else min(seq, window),
            normalization="RMSNorm",
            layernorm_epsilon=float(hcfg.get("rms_norm_eps", 1e-6)),
            activation="swiglu",
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=int(theta),
            **scaling,
            add_bias_linear=False,
            add_qkv_bias=family == "qwen2",  # Qwen2 always has q/k/v biases (no config field)
            sliding_window=window,
            untie_embeddings_and_output_weights=not bool(hcfg.get("tie_word_embeddings", False)),
            params_dtype=_DTYPES.get(str(dtype).replace("torch.", ""), "float32"),
        )
    except KeyError as e:
        raise CheckpointFormatError(f"{where}: {CONFIG_FILE} has no {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
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
_FUSED = re.compile("^" + _L + r"(self_attn\.([qkv])_proj|mlp\.(gate|up)_proj)\.(weight|bias)$")
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
            i, which, what = m.group(1), m.group(3) or m.group(4), m.group(5)
            kind = "qkv" if which in "qkv" else "fc1"
            parts.setdefault((i, kind, what), {})[which] = key
    if unknown:
        raise CheckpointFormatError(f"{where}: unknown key(s) {_short(sorted(unknown, key=_natural))}")
    if len(prefixes) > 1:
        raise CheckpointFormatError(f"{where}: mixed key prefixes {sorted(prefixes)}")
    for (i, kind, what), keys in parts.items():
        need = ("q", "k", "v") if kind == "qkv" else ("gate", "up")
        missing = [n for n in need if n not in keys]
        if missing:
            raise CheckpointFormatError(
                f"{where}: layer {i}: {', '.join(keys.values())} without its "
                f"{'/'.join(m + '_proj.' + what for m in missing)}")
        if kind == "qkv":
            q, k, v = (keys[n] for n in need)
            name = f"decoder.layers.{i}.self_attention.linear_qkv.{what}"
            source[name] = LazyTensor(f"{q} + k_proj + v_proj", _fused_qkv(files, q, k, v, cfg, where))
        else:
            g, u = keys["gate"], keys["up"]
            name = f"decoder.layers.{i}.mlp.linear_fc1.{what}"
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
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", name)
    if m:
        i, mod, what = m.groups()
        p = f"{prefix}layers.{i}."
        if mod == "self_attention.linear_qkv":
            q, k, v = split_qkv(t, cfg)
            return {p + f"self_attn.q_proj.{what}": q, p + f"self_attn.k_proj.{what}": k,
                    p + f"self_attn.v_proj.{what}": v}
        if mod == "mlp.linear_fc1":
            gate, up = split_fc1(t)
            return {p + f"mlp.gate_proj.{what}": gate, p + f"mlp.up_proj.{what}": up}
        table = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm",
                 "self_attention.linear_proj": "self_attn.o_proj", "mlp.linear_fc2": "mlp.down_proj"}
        return {p + table[mod] + f".{what}": t}
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
