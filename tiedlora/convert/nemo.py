"""NeMo ``.nemo`` GPT checkpoints (pre-megatron-core key names; GPT-2B-001 family).

A ``.nemo`` file is a tar archive (or the folder it was extracted to)::

    model_config.yaml                 the model section of the training config
    model_weights.ckpt                TP=1: one torch state dict
    mp_rank_00/model_weights.ckpt     TP>1: one state dict per tensor-parallel rank
    <hash>_<name>.model               SentencePiece tokenizer (config: tokenizer.model: nemo:...)

Keys (prefix ``model.language_model.``; NeMo's own nemo->mcore converter is the source of
this table) and where they land (:mod:`tiedlora.convert.layout` names, layer i)::

    embedding.word_embeddings.weight                 embedding.word_embeddings.weight
    embedding.position_embeddings.weight             embedding.position_embeddings.weight
    encoder.layers.i.input_layernorm.*               decoder.layers.i.input_layernorm.*
    encoder.layers.i.self_attention.query_key_value  ...self_attention.linear_qkv  (same layout)
    encoder.layers.i.self_attention.dense            ...self_attention.linear_proj
    encoder.layers.i.post_attention_layernorm.*      decoder.layers.i.pre_mlp_layernorm.*
    encoder.layers.i.mlp.dense_h_to_4h               ...mlp.linear_fc1  fast-swiglu: [gate; up]
                                                     swiglu: gate half ...
    encoder.layers.i.mlp.dense_h_to_4h_2             ... and up half (linear_fc1 = [gate; up])
    encoder.layers.i.mlp.dense_4h_to_h               ...mlp.linear_fc2
    encoder.final_layernorm.*                        decoder.final_layernorm.*
    output_layer.weight                              output_layer.weight (untied only)
    rotary_pos_emb.inv_freq                          (checked against the config, not loaded)

``normalization: layernorm1p`` stores γ with the weight applied as (1 + γ); our
:class:`tiedlora.models.norm.Norm` computes exactly that with
``layernorm_zero_centered_gamma``, so γ is copied unchanged.

Safety (docs/design.md, 'Safety of what we load and launch'): member names that are
absolute or contain ``..`` are refused before anything is read; weights are read with
``torch.load(weights_only=True)``; YAML with ``yaml.safe_load``; members are only read as
regular files (links are refused), and the tokenizer is extracted with tarfile's
``"data"`` filter.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import yaml

from tiedlora.convert.layout import (
    CheckpointFormatError,
    LazyTensor,
    Source,
    _natural,
    _short,
    split_fc1,
)
from tiedlora.files import staged
from tiedlora.config import ModelConfig, cache_root

CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
_SHARD = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?/" + re.escape(WEIGHTS_FILE) + "$")


# ----------------------------------------------------------------------------- archive
def _safe_name(name: str, where: str) -> str:
    """``./a/b`` -> ``a/b``; refuses absolute and ``..`` names."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise CheckpointFormatError(f"{where}: unsafe member name {name!r} (absolute path); "
                                    "refusing to read this archive")
    if "\\" in name:
        raise CheckpointFormatError(f"{where}: unsafe member name {name!r} (backslash); "
                                    "refusing to read this archive")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise CheckpointFormatError(f"{where}: unsafe member name {name!r} (contains '..'); "
                                    "refusing to read this archive")
    return "/".join(parts)


class NemoArchive:
    """Read-only view of a ``.nemo`` tar file or of the folder it was extracted to."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._tar: Optional[tarfile.TarFile] = None
        self._members: Dict[str, tarfile.TarInfo] = {}
        if self.path.is_dir():
            self.files = sorted(
                str(p.relative_to(self.path).as_posix())
                for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())
        elif self.path.is_file():
            try:
                self._tar = tarfile.open(self.path, "r:*")
            except tarfile.TarError as e:
                raise CheckpointFormatError(f"{self.path}: not a .nemo (tar) archive ({e})") from None
            for m in self._tar.getmembers():
                name = _safe_name(m.name, str(self.path))
                if m.isdir() or not name:
                    continue
                if not m.isfile():
                    kind = "link" if (m.issym() or m.islnk()) else "special file"
                    raise CheckpointFormatError(
                        f"{self.path}: member {m.name!r} is a {kind}; a .nemo archive holds "
                        "only regular files, refusing to read it")
                self._members[name] = m
            self.files = sorted(self._members)
        else:
            raise CheckpointFormatError(f"{self.path}: no such .nemo file or folder")
        self.compressed = self._tar is not None and _is_compressed(self.path)

    @property
    def is_tar(self) -> bool:
        return self._tar is not None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def has(self, name: str) -> bool:
        return name in self.files

    def require(self, name: str, what: str) -> None:
        if not self.has(name):
            raise CheckpointFormatError(
                f"{self.path}: no {name!r} ({what}); the archive holds {_short(self.files)}")

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[io.BufferedIOBase]:
        if self._tar is None:
            with open(self.path / name, "rb") as f:
                yield f
            return
        f = self._tar.extractfile(self._members[name])
        try:
            yield f
        finally:
            f.close()

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def extract(self, name: str, dest: Path) -> Path:
        """Copy one member to ``dest`` (a folder) atomically; returns the file's path."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        final = dest / PurePosixPath(name).name
        tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=dest))
        try:
            if self._tar is None:
                shutil.copyfile(self.path / name, tmp / final.name)
                out = tmp / final.name
            else:
                self._tar.extract(self._members[name], path=tmp, filter="data")
                out = tmp / name
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def load_tensors(self, name: str) -> Dict[str, torch.Tensor]:
        """A torch state dict member, unpickling nothing but tensors and plain containers."""
        try:
            if self._tar is None:
                sd = _load_file(self.path / name)
            elif not self.compressed:
                with self.open(name) as f:  # uncompressed tar: the member is seekable in place
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            else:  # compressed: seeking would re-decompress; extract to a temporary folder
                with tempfile.TemporaryDirectory() as tmp:
                    sd = _load_file(self.extract(name, Path(tmp)), mmap=False)
        except Exception as e:
            raise CheckpointFormatError(
                f"{self.path}: cannot read {name} as a plain tensor state dict "
                f"(torch.load weights_only=True: {type(e).__name__}: {e})") from None
        if isinstance(sd, dict) and set(sd) == {"state_dict"}:
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointFormatError(f"{self.path}: {name} holds a {type(sd).__name__}, not a state dict")
        return sd


def _load_file(path: Path, mmap: bool = True):
    if mmap:
        try:  # zip-format checkpoints map into memory instead of being read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


# ------------------------------------------------------------------------------ config
def read_config(archive: NemoArchive) -> dict:
    """``model_config.yaml`` as a plain dict (safe YAML; OmegaConf resolves ``${...}``)."""
    from omegaconf import OmegaConf

    archive.require(CONFIG_FILE, "the model config")
    try:
        raw = yaml.safe_load(archive.read_bytes(CONFIG_FILE).decode("utf-8"))
    except yaml.YAMLError as e:
        raise CheckpointFormatError(f"{archive.path}: {CONFIG_FILE} is not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{archive.path}: {CONFIG_FILE} is not a mapping")
    try:
        return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as e:  # unresolvable interpolation
        raise CheckpointFormatError(f"{archive.path}: {CONFIG_FILE}: {e}") from None


_NORMS = {"layernorm": ("LayerNorm", False), "layernorm1p": ("LayerNorm", True),
          "rmsnorm": ("RMSNorm", False)}
_ACTS = {"fast-swiglu": "swiglu", "swiglu": "swiglu", "gelu": "gelu"}
_DTYPES = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", 16: "float16", "16": "float16",
           "16-mixed": "float16", 32: "float32", "32": "float32"}


def _refuse(cfg: dict, where: str) -> None:
    """Settings that change the math in ways our GPTModel does not implement."""
    checks = [
        ("mcore_gpt", lambda v: bool(v),
         "megatron-core .nemo checkpoints (mcore_gpt: true) are not supported; only NeMo's "
         "pre-mcore GPT layout (model.language_model.*) is"),
        ("transformer_block_type", lambda v: v not in (None, "pre_ln"), "only pre_ln is supported"),
        ("headscale", lambda v: bool(v), "headscale is not supported"),
        ("normalize_attention_scores", lambda v: v is False, "unnormalised attention is not supported"),
        ("seq_len_interpolation_factor", lambda v: v not in (None, 1, 1.0),
         "RoPE sequence-length interpolation is not supported"),
        ("attention_type", lambda v: v not in (None, "multihead"), "only multihead attention is supported"),
        ("num_moe_experts", lambda v: v not in (None, 0, 1), "mixture-of-experts is not supported"),
        ("pipeline_model_parallel_size", lambda v: v not in (None, 1),
         "pipeline-parallel .nemo checkpoints are not supported (reshard to PP=1 with NeMo first)"),
    ]
    for key, bad, why in checks:
        if key in cfg and bad(cfg[key]):
            raise CheckpointFormatError(f"{where}: {CONFIG_FILE}: {key}={cfg[key]!r}: {why}")


def model_config(ycfg: dict, name: str, vocab_size: int, where: str) -> ModelConfig:
    """ModelConfig of a NeMo GPT config (``vocab_size`` from the tokenizer)."""
    _refuse(ycfg, where)

    def get(key, default=None, required=False):
        if key not in ycfg or ycfg[key] is None:
            if required:
                raise CheckpointFormatError(f"{where}: {CONFIG_FILE} has no {key!r}")
            return default
        return ycfg[key]

    norm = str(get("normalization", "layernorm")).lower()
    if norm not in _NORMS:
        raise CheckpointFormatError(f"{where}: normalization={norm!r}: expected one of {sorted(_NORMS)}")
    act = str(get("activation", "gelu")).lower()
    if act not in _ACTS:
        raise CheckpointFormatError(f"{where}: activation={act!r}: expected one of {sorted(_ACTS)}")
    pos = str(get("position_embedding_type", "learned_absolute"))
    if pos not in ("rope", "learned_absolute"):
        raise CheckpointFormatError(f"{where}: position_embedding_type={pos!r}: expected rope or learned_absolute")
    precision = get("precision", 32)
    rotary_base = get("rotary_base", 10000)
    if float(rotary_base) != int(rotary_base):
        raise CheckpointFormatError(f"{where}: rotary_base={rotary_base!r}: must be an integer")
    try:
        return ModelConfig(
            name=name,
            num_layers=int(get("num_layers", required=True)),
            hidden_size=int(get("hidden_size", required=True)),
            ffn_hidden_size=int(get("ffn_hidden_size", required=True)),
            num_attention_heads=int(get("num_attention_heads", required=True)),
            num_query_groups=get("num_query_groups"),
            kv_channels=get("kv_channels"),
            vocab_size=int(vocab_size),
            make_vocab_size_divisible_by=int(get("make_vocab_size_divisible_by", 128)),
            seq_length=int(get("encoder_seq_length", get("max_position_embeddings", required=True))),
            normalization=_NORMS[norm][0],
            layernorm_zero_centered_gamma=_NORMS[norm][1],
            layernorm_epsilon=float(get("layernorm_epsilon", 1e-5)),
            activation=_ACTS[act],
            position_embedding_type=pos,
            rotary_percent=float(get("rotary_percentage", 1.0)),
            rotary_base=int(rotary_base),
            add_bias_linear=bool(get("bias", True)),
            untie_embeddings_and_output_weights=not bool(get("share_embeddings_and_output_weights", True)),
            params_dtype=_DTYPES.get(precision, "float32"),
        )
    except ValueError as e:
        raise CheckpointFormatError(f"{where}: {CONFIG_FILE}: {e}") from None


# ---------------------------------------------------------------------------- tokenizer
def tokenizer_member(archive: NemoArchive, ycfg: dict) -> str:
    """The archive member holding the SentencePiece model named by ``tokenizer.model``."""
    tok = ycfg.get("tokenizer") or {}
    library = str(tok.get("library", "sentencepiece")).lower()
    if library != "sentencepiece":
        raise CheckpointFormatError(
            f"{archive.path}: tokenizer.library={library!r}: only SentencePiece tokenizers are "
            "read from .nemo archives; set model.tokenizer to the tokenizer's path")
    ref = str(tok.get("model") or "")
    base = PurePosixPath(ref.split("nemo:", 1)[-1]).name if ref else ""
    named = [f for f in archive.files if base and PurePosixPath(f).name == base]
    if len(named) == 1:
        return named[0]
    models = [f for f in archive.files if f.endswith(".model")]
    if not base and len(models) == 1:
        return models[0]
    raise CheckpointFormatError(
        f"{archive.path}: cannot find the tokenizer (tokenizer.model={ref!r}) in the archive; "
        f".model files present: {models}; set model.tokenizer=/path/to/tokenizer.model")


def _spm_vocab_size(data: bytes, where: str) -> int:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_proto=data).get_piece_size()
    except Exception as e:
        raise CheckpointFormatError(f"{where}: not a readable SentencePiece model ({e})") from None


def tokenizer_path(path: os.PathLike | str, extract_to: Optional[os.PathLike | str] = None) -> Path:
    """Path of the SentencePiece model of a ``.nemo`` file or folder.

    From a folder the file is used in place. From a tar it is extracted (``"data"`` filter)
    into ``extract_to``, by default ``$TIEDLORA_CACHE/nemo_tokenizers/<key>/`` (key: the
    archive's path, size and mtime), so every process of a run finds the same file.
    """
    with NemoArchive(path) as archive:
        member = tokenizer_member(archive, read_config(archive))
        if not archive.is_tar:
            return archive.path / member
        if extract_to is None:
            st = archive.path.stat()
            key = hashlib.sha1(f"{archive.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
            extract_to = cache_root() / "nemo_tokenizers" / key
        out = Path(extract_to) / PurePosixPath(member).name
        if out.is_file():
            return out
        return archive.extract(member, Path(extract_to))


# ------------------------------------------------------------------------------ weights
_PREFIX = re.compile(r"^(model\.(?:module\.)?language_model\.)(.*)$")
_L = r"encoder\.layers\.(\d+)\."
_RULES: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"^embedding\.word_embeddings\.weight$"), "embedding.word_embeddings.weight"),
    (re.compile(r"^embedding\.position_embeddings\.weight$"), "embedding.position_embeddings.weight"),
    (re.compile(r"^output_layer\.weight$"), "output_layer.weight"),
    (re.compile(r"^encoder\.final_layernorm\.(weight|bias)$"), r"decoder.final_layernorm.\1"),
    (re.compile(_L + r"input_layernorm\.(weight|bias)$"), r"decoder.layers.\1.input_layernorm.\2"),
    (re.compile(_L + r"post_attention_layernorm\.(weight|bias)$"), r"decoder.layers.\1.pre_mlp_layernorm.\2"),
    (re.compile(_L + r"self_attention\.query_key_value\.(weight|bias)$"),
     r"decoder.layers.\1.self_attention.linear_qkv.\2"),
    (re.compile(_L + r"self_attention\.dense\.(weight|bias)$"), r"decoder.layers.\1.self_attention.linear_proj.\2"),
    (re.compile(_L + r"mlp\.dense_h_to_4h\.(weight|bias)$"), r"decoder.layers.\1.mlp.linear_fc1.\2"),
    (re.compile(_L + r"mlp\.dense_h_to_4h_2\.(weight|bias)$"), r"decoder.layers.\1.mlp.linear_fc1.\2#up"),
    (re.compile(_L + r"mlp\.dense_4h_to_h\.(weight|bias)$"), r"decoder.layers.\1.mlp.linear_fc2.\2"),
]
_IGNORED = (re.compile(r"^rotary_pos_emb\.inv_freq$"), re.compile(r"_extra_state$"))

# Tensor-parallel split of each NeMo key (dim, or None: replicated) for mp_rank_XX shards.
_TP_DIM = [
    (re.compile(r"(word_embeddings|output_layer)\.weight$"), 0),
    (re.compile(r"query_key_value\.(weight|bias)$"), 0),
    (re.compile(r"dense_h_to_4h(_2)?\.(weight|bias)$"), 0),
    (re.compile(r"(self_attention\.dense|dense_4h_to_h)\.weight$"), 1),
]


def _tp_dim(rest: str) -> Optional[int]:
    for pat, dim in _TP_DIM:
        if pat.search(rest):
            return dim
    return None


def read_weights(archive: NemoArchive, ycfg: dict) -> Dict[str, torch.Tensor]:
    """The NeMo state dict at TP=1 (``mp_rank_XX`` shards are joined)."""
    from tiedlora.sharding import unshard

    if archive.has(WEIGHTS_FILE):
        return archive.load_tensors(WEIGHTS_FILE)
    shards = {}
    for f in archive.files:
        m = _SHARD.match(f)
        if m:
            if m.group(2) is not None:
                raise CheckpointFormatError(
                    f"{archive.path}: {f}: pipeline-parallel shards are not supported "
                    "(reshard the checkpoint to PP=1 with NeMo first)")
            shards[int(m.group(1))] = f
    if not shards:
        raise CheckpointFormatError(
            f"{archive.path}: no {WEIGHTS_FILE} and no mp_rank_XX/{WEIGHTS_FILE}; the archive "
            f"holds {_short(archive.files)}")
    tp = len(shards)
    if sorted(shards) != list(range(tp)):
        raise CheckpointFormatError(f"{archive.path}: tensor-parallel shards {sorted(shards)} are not 0..{tp - 1}")
    declared = ycfg.get("tensor_model_parallel_size")
    if declared not in (None, tp):
        raise CheckpointFormatError(
            f"{archive.path}: {CONFIG_FILE} says tensor_model_parallel_size={declared}, the archive "
            f"has {tp} mp_rank shards")
    parts = [archive.load_tensors(shards[r]) for r in range(tp)]
    keys = set(parts[0])
    for r, p in enumerate(parts[1:], 1):
        if set(p) != keys:
            diff = sorted(set(p) ^ keys, key=_natural)
            raise CheckpointFormatError(f"{archive.path}: shard {shards[r]} has different keys: {_short(diff)}")
    fast = str(ycfg.get("activation", "")).lower().startswith("fast-")
    out = {}
    for key in parts[0]:
        if not isinstance(parts[0][key], torch.Tensor):
            out[key] = parts[0][key]
            continue
        m = _PREFIX.match(key)
        dim = _tp_dim(m.group(2)) if m else None
        if dim is None:
            out[key] = parts[0][key]
            continue
        stride = 2 if (fast and re.search(r"dense_h_to_4h\.(weight|bias)$", key)) else 1
        try:
            out[key] = unshard([p[key] for p in parts], dim, stride)
        except RuntimeError as e:
            raise CheckpointFormatError(f"{archive.path}: cannot join the shards of {key}: {e}") from None
    return out


def split_glu(ycfg: dict) -> bool:
    """``activation: swiglu`` stores fc1 as two halves; ``fast-swiglu`` as one fused tensor."""
    return str(ycfg.get("activation", "")).lower() == "swiglu"


def to_canonical(sd: Dict[str, torch.Tensor], where: str, halves_glu: bool) -> Tuple[Source, str]:
    """(canonical source, key prefix) of a TP=1 NeMo state dict; unknown keys fail by name.

    ``halves_glu``: fc1 is stored as ``dense_h_to_4h`` (gate) + ``dense_h_to_4h_2`` (up).
    """
    source: Source = {}
    halves: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    unknown, prefixes = [], set()
    for key, t in sd.items():
        m = _PREFIX.match(key)
        rest = m.group(2) if m else None
        if rest is not None and any(p.search(rest) for p in _IGNORED):
            continue
        if rest is None or not isinstance(t, torch.Tensor):
            unknown.append(key)
            continue
        for pat, repl in _RULES:
            if pat.match(rest):
                name = pat.sub(repl, rest)
                break
        else:
            unknown.append(key)
            continue
        if name.endswith("#up") and not halves_glu:
            unknown.append(key)
            continue
        prefixes.add(m.group(1))
        if name.endswith("#up") or (halves_glu and ".linear_fc1." in name):
            base = name.removesuffix("#up")
            halves.setdefault(base, {})["up" if name.endswith("#up") else "gate"] = (key, t)
            continue
        source[name] = LazyTensor(key, lambda t=t: t)
    if unknown:
        raise CheckpointFormatError(f"{where}: unknown key(s) {_short(sorted(unknown, key=_natural))}")
    for name, parts in halves.items():
        if set(parts) != {"gate", "up"}:
            have = next(iter(parts.values()))[0]
            raise CheckpointFormatError(f"{where}: {have} has no matching "
                                        f"{'dense_h_to_4h_2' if 'gate' in parts else 'dense_h_to_4h'} half")
        (gk, g), (uk, u) = parts["gate"], parts["up"]
        source[name] = LazyTensor(f"{gk} + {uk}", lambda g=g, u=u: torch.cat([g, u], dim=0))
    if len(prefixes) > 1:
        raise CheckpointFormatError(f"{where}: mixed key prefixes {sorted(prefixes)}")
    return source, (prefixes.pop() if prefixes else "model.language_model.")


def from_canonical(name: str, t: torch.Tensor, halves_glu: bool, prefix: str) -> Dict[str, torch.Tensor]:
    """Inverse of the key table for one canonical tensor (``halves_glu``: swiglu's two halves)."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    if m:
        i, rest = m.groups()
        table = {
            "input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm",
            "self_attention.linear_qkv": "self_attention.query_key_value",
            "self_attention.linear_proj": "self_attention.dense",
            "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h",
        }
        mod, what = rest.rsplit(".", 1)
        nemo = f"{prefix}encoder.layers.{i}.{table[mod]}.{what}"
        if mod == "mlp.linear_fc1" and halves_glu:
            gate, up = split_fc1(t)
            return {nemo: gate, nemo.replace("dense_h_to_4h.", "dense_h_to_4h_2."): up}
        return {nemo: t}
    if name.startswith("decoder.final_layernorm."):
        return {prefix + "encoder.final_layernorm." + name.rsplit(".", 1)[1]: t}
    return {prefix + name: t}


def check_inv_freq(sd: dict, cfg: ModelConfig, where: str) -> None:
    """A stored ``rotary_pos_emb.inv_freq`` must match the frequencies our model computes."""
    for key, t in sd.items():
        if key.endswith("rotary_pos_emb.inv_freq") and isinstance(t, torch.Tensor):
            dim = int(cfg.head_dim * cfg.rotary_percent) if cfg.rotary_percent < 1.0 else cfg.head_dim
            want = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            if t.shape != want.shape or not torch.allclose(t.float(), want, rtol=1e-3, atol=1e-6):
                raise CheckpointFormatError(
                    f"{where}: {key} (shape {tuple(t.shape)}) does not match rotary_percentage="
                    f"{cfg.rotary_percent} and rotary_base={cfg.rotary_base} of the config")


# ---------------------------------------------------------------------------- public API
def model_config_from_checkpoint(path: os.PathLike | str) -> ModelConfig:
    """ModelConfig of a ``.nemo`` file/folder; vocab_size from its SentencePiece model."""
    with NemoArchive(path) as archive:
        ycfg = read_config(archive)
        where = str(archive.path)
        try:
            member = tokenizer_member(archive, ycfg)
            vocab = _spm_vocab_size(archive.read_bytes(member), f"{where}:{member}")
        except CheckpointFormatError:
            if (ycfg.get("tokenizer") or {}).get("library", "sentencepiece") == "sentencepiece":
                raise
            sd = read_weights(archive, ycfg)  # no SentencePiece model: the embedding's rows
            key = next((k for k in sd if k.endswith("word_embeddings.weight")), None)
            if key is None:
                raise CheckpointFormatError(f"{where}: no word embeddings in the weights") from None
            vocab = sd[key].shape[0]
        name = archive.path.name.removesuffix(".nemo")
        cfg = model_config(ycfg, name, vocab, where)
        cfg.checkpoint = str(path)
        return cfg


def read_source(path: os.PathLike | str, cfg: ModelConfig) -> Source:
    """The canonical source of a ``.nemo`` file/folder, checked against ``cfg``."""
    from tiedlora.convert.layout import check_names

    with NemoArchive(path) as archive:
        ycfg = read_config(archive)
        sd = read_weights(archive, ycfg)
    where = str(path)
    check_inv_freq(sd, cfg, where)
    source, _ = to_canonical(sd, where, split_glu(ycfg))
    check_names(source, cfg, where)
    return source


def save_merged(src: os.PathLike | str, out: os.PathLike | str, replaced: Dict[str, torch.Tensor],
                cfg: ModelConfig) -> Path:
    """Write ``src`` with the canonical tensors in ``replaced`` swapped in, as a TP=1 ``.nemo``.

    Every other tensor is copied bit for bit; other archive members (tokenizer, ...) are
    copied; ``model_config.yaml`` gets ``tensor_model_parallel_size: 1``. ``out`` is a tar
    file, written to a temporary name and renamed.
    """
    out = Path(out)
    with NemoArchive(src) as archive:
        ycfg_text = archive.read_bytes(CONFIG_FILE).decode("utf-8")
        ycfg = read_config(archive)
        sd = read_weights(archive, ycfg)
        split = split_glu(ycfg)
        _, prefix = to_canonical(sd, str(src), split)
        new = dict(sd)
        for name, t in replaced.items():
            for key, value in from_canonical(name, t, split, prefix).items():
                if key not in sd:
                    raise CheckpointFormatError(f"{src}: merged tensor {name} maps to {key}, which the source lacks")
                if tuple(value.shape) != tuple(sd[key].shape):
                    raise CheckpointFormatError(
                        f"{src}: merged {name} has shape {tuple(value.shape)}, {key} has {tuple(sd[key].shape)}")
                new[key] = value.to(sd[key].dtype).contiguous()
        raw = yaml.safe_load(ycfg_text)
        if raw.get("tensor_model_parallel_size", 1) != 1:
            raw["tensor_model_parallel_size"] = 1
            ycfg_text = yaml.safe_dump(raw, sort_keys=False)
        keep = [f for f in archive.files if f != CONFIG_FILE and f != WEIGHTS_FILE and not _SHARD.match(f)]
        with staged(out) as tmp:
            weights = tmp.with_name(tmp.name + ".weights")
            try:
                torch.save(new, weights)
                del new
                with tarfile.open(tmp, "w:") as tar:
                    _add_bytes(tar, CONFIG_FILE, ycfg_text.encode("utf-8"))
                    info = tarfile.TarInfo("./" + WEIGHTS_FILE)
                    info.size, info.mode = weights.stat().st_size, 0o644
                    with open(weights, "rb") as f:
                        tar.addfile(info, f)
                    for f in keep:
                        _add_bytes(tar, f, archive.read_bytes(f))
            finally:
                weights.unlink(missing_ok=True)
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo("./" + name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
