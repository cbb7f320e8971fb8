"""Builders shared by the converter tests and their torchrun worker.

* a tiny SentencePiece tokenizer (trained here, deterministic);
* a synthetic GPT-2B-001-style ``.nemo`` archive in NeMo's documented layout
  (model_config.yaml, model_weights.ckpt or mp_rank_XX/ shards with NeMo's pre-mcore key
  names, the tokenizer referenced as ``nemo:<file>``);
* :func:`nemo_reference_logits`: a plain-torch forward pass written from NeMo's legacy GPT
  semantics (fused per-head [q, k, v], layernorm1p, partial RoPE, fast-swiglu chunk order),
  independent of megatron-core and of tiedlora's converter: the oracle for the ``.nemo`` path;
* tiny random Hugging Face LLaMA models (``transformers`` is the oracle there).
"""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
import yaml

PREFIX = "model.language_model."
TOKENIZER_NAME = "a1b2c3_tokenizer.model"
WORDS = ("the a of to and in is was for on with as by at from his her they which this that "
         "model weight layer tensor rank adapter merge export tokenizer archive shard "
         "alpha beta gamma delta epsilon zeta theta lambda sigma omega").split()


def train_tokenizer(path: Path, vocab_size: int = 120) -> Path:
    """A deterministic tiny SentencePiece model (fewer than 128 pieces: exercises padding)."""
    import sentencepiece as spm

    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g))
             for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, num_threads=1, minloglevel=2, input_sentence_size=0,
        shuffle_input_sentence=False)
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path


def nemo_config(**kw) -> dict:
    """A scaled-down GPT-2B-001 model_config.yaml (same kinds of settings)."""
    cfg = dict(
        precision=32, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        encoder_seq_length=64, max_position_embeddings=64, num_layers=2, hidden_size=64,
        ffn_hidden_size=96, num_attention_heads=4, init_method_std=0.014, kv_channels=None,
        apply_query_key_layer_scaling=True, layernorm_epsilon=1e-5, make_vocab_size_divisible_by=128,
        pre_process=True, post_process=True, persist_layer_norm=True, bias=False,
        activation="fast-swiglu", headscale=False, transformer_block_type="pre_ln",
        normalize_attention_scores=True, position_embedding_type="rope", rotary_percentage=0.5,
        attention_type="multihead", share_embeddings_and_output_weights=False,
        normalization="layernorm1p", mcore_gpt=False,
        tokenizer=dict(library="sentencepiece", type=None, model=f"nemo:{TOKENIZER_NAME}",
                       vocab_file=None, merge_file=None, delimiter=None, sentencepiece_legacy=False),
    )
    cfg.update(kw)
    return cfg


def nemo_weights(cfg: dict, rows: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights under NeMo's key names (TP=1). ``rows``: padded vocabulary rows."""
    g = torch.Generator().manual_seed(seed)
    h, f, L = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_layers"]
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_query_groups") or heads
    d = h // heads
    bias = cfg["bias"]
    act = cfg["activation"]

    def r(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    sd = {PREFIX + "embedding.word_embeddings.weight": r(rows, h, std=0.5)}
    if cfg["position_embedding_type"] == "learned_absolute":
        sd[PREFIX + "embedding.position_embeddings.weight"] = r(cfg["max_position_embeddings"], h, std=0.1)
    for i in range(L):
        p = f"{PREFIX}encoder.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            sd[p + ln + ".weight"] = r(h, std=0.2)  # layernorm1p: gamma around 0
            sd[p + ln + ".bias"] = r(h, std=0.1)
        lin = {"self_attention.query_key_value": ((heads + 2 * groups) * d, h),
               "self_attention.dense": (h, heads * d), "mlp.dense_4h_to_h": (h, f)}
        if act == "fast-swiglu":
            lin["mlp.dense_h_to_4h"] = (2 * f, h)
        elif act == "swiglu":
            lin["mlp.dense_h_to_4h"] = (f, h)
            lin["mlp.dense_h_to_4h_2"] = (f, h)
        else:
            lin["mlp.dense_h_to_4h"] = (f, h)
        for name, shape in lin.items():
            sd[p + name + ".weight"] = r(*shape, std=1 / math.sqrt(shape[1]))
            if bias:
                sd[p + name + ".bias"] = r(shape[0], std=0.05)
    sd[PREFIX + "encoder.final_layernorm.weight"] = r(h, std=0.2)
    sd[PREFIX + "encoder.final_layernorm.bias"] = r(h, std=0.1)
    if not cfg["share_embeddings_and_output_weights"]:
        sd[PREFIX + "output_layer.weight"] = r(rows, h, std=1 / math.sqrt(h))
    if cfg["position_embedding_type"] == "rope":
        dim = int(d * cfg["rotary_percentage"])
        sd[PREFIX + "rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    return sd


def nemo_tp_shards(sd: Dict[str, torch.Tensor], cfg: dict, tp: int) -> list:
    """Split a TP=1 NeMo state dict the way NeMo's TP=tp model holds it (mp_rank_XX).

    Column-parallel weights split on rows, row-parallel on columns; fast-swiglu's fused
    dense_h_to_4h is chunked locally into (gate, up), so rank r holds [gate_r; up_r]; the
    vocabulary is padded to a multiple of 128·tp.
    """
    shards = [dict() for _ in range(tp)]
    mult = cfg["make_vocab_size_divisible_by"] * tp
    for k, t in sd.items():
        if k.endswith(("word_embeddings.weight", "output_layer.weight")):
            rows = -(-t.shape[0] // mult) * mult
            t = torch.cat([t, torch.zeros(rows - t.shape[0], t.shape[1])])
            parts = t.chunk(tp, 0)
        elif k.endswith("dense_h_to_4h.weight") and cfg["activation"] == "fast-swiglu":
            gate, up = t.chunk(2, 0)
            parts = [torch.cat([a, b]) for a, b in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]
        elif k.endswith(("query_key_value.weight", "dense_h_to_4h.weight", "dense_h_to_4h_2.weight")):
            parts = t.chunk(tp, 0)
        elif k.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            parts = t.chunk(tp, 1)
        else:
            parts = [t] * tp
        for r in range(tp):
            shards[r][k] = parts[r].clone()
    return shards


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _ckpt_bytes(sd) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def write_nemo(path: Path, cfg: dict, weights, tokenizer: Optional[Path],
               folder: bool = False, extra: Optional[Dict[str, bytes]] = None,
               skip: tuple = ()) -> Path:
    """Write a ``.nemo`` tar (or folder). ``weights``: a state dict or a list of TP shards."""
    members: Dict[str, bytes] = {"./model_config.yaml": yaml.safe_dump(cfg, sort_keys=False).encode()}
    if isinstance(weights, list):
        for r, sd in enumerate(weights):
            members[f"./mp_rank_{r:02d}/model_weights.ckpt"] = _ckpt_bytes(sd)
    else:
        members["./model_weights.ckpt"] = _ckpt_bytes(weights)
    if tokenizer is not None:
        members[f"./{TOKENIZER_NAME}"] = Path(tokenizer).read_bytes()
    members.update(extra or {})
    members = {k: v for k, v in members.items() if k.lstrip("./") not in skip}
    path = Path(path)
    if folder:
        for name, data in members.items():
            f = path / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
        return path
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            _tar_add(tar, name, data)
    return path


# ------------------------------------------------------------------------ NeMo oracle
def read_nemo_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The state dict of a TP=1 ``.nemo`` tar (what ``tiedlora.merge`` writes)."""
    with tarfile.open(path) as tar:
        return torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def nemo_reference_logits(sd: Dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, rows] of NeMo's legacy GPT for a TP=1 state dict (plain torch, fp32)."""
    p = PREFIX
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    groups = cfg.get("num_query_groups") or heads
    d = h // heads
    eps = cfg["layernorm_epsilon"]
    one_p = cfg["normalization"] == "layernorm1p"
    b, s = ids.shape

    def ln(x, name):
        w = sd[name + ".weight"] + (1.0 if one_p else 0.0)
        return F.layer_norm(x, (h,), w, sd[name + ".bias"], eps)

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    x = sd[p + "embedding.word_embeddings.weight"][ids]
    if cfg["position_embedding_type"] == "learned_absolute":
        x = x + sd[p + "embedding.position_embeddings.weight"][:s]
    rot = int(d * cfg["rotary_percentage"])
    inv = 1.0 / (cfg.get("rotary_base", 10000) ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(s).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, rot]
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]

    def rope(t):  # [b, s, n, d]: first rot channels rotated (rotate-half), rest passed through
        if cfg["position_embedding_type"] != "rope":
            return t
        r, rest = t[..., :rot], t[..., rot:]
        return torch.cat([r * cos + _rotate_half(r) * sin, rest], dim=-1)

    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    for i in range(cfg["num_layers"]):
        e = f"{p}encoder.layers.{i}."
        a = ln(x, e + "input_layernorm")
        qkv = lin(a, e + "self_attention.query_key_value").view(b, s, groups, (heads // groups + 2) * d)
        q = qkv[..., : heads // groups * d].reshape(b, s, heads, d)
        k = qkv[..., heads // groups * d: (heads // groups + 1) * d]
        v = qkv[..., (heads // groups + 1) * d:]
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(heads // groups, dim=2)
        v = v.repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        ctx = torch.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, heads * d)
        x = x + lin(ctx, e + "self_attention.dense")
        m = ln(x, e + "post_attention_layernorm")
        if cfg["activation"] == "fast-swiglu":
            gate, up = lin(m, e + "mlp.dense_h_to_4h").chunk(2, dim=-1)
            y = F.silu(gate) * up
        elif cfg["activation"] == "swiglu":
            y = F.silu(lin(m, e + "mlp.dense_h_to_4h")) * lin(m, e + "mlp.dense_h_to_4h_2")
        else:
            y = F.gelu(lin(m, e + "mlp.dense_h_to_4h"))
        x = x + lin(y, e + "mlp.dense_4h_to_h")
    x = ln(x, p + "encoder.final_layernorm")
    out = sd[p + "output_layer.weight"] if not cfg["share_embeddings_and_output_weights"] \
        else sd[p + "embedding.word_embeddings.weight"]
    return x @ out.T


# --------------------------------------------------------------------- HF LLaMA oracle
LLAMA = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
# Small configs that keep every feature of the real families (docs/models.md): LLaMA-3.1's
# RoPE scaling with an original context (16) shorter than the test's 24 tokens; LLaMA-3.2's
# tied embeddings and larger scaling factor; Qwen2.5's q/k/v biases, GQA, tied embeddings and
# theta 1e6; Mistral's GQA with a head_dim other than hidden/heads (Mistral-Nemo's kind) and a
# sliding window (v0.1's kind) too long to bind at the model's sequence length.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama31": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama32": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True, head_dim=16,
                              rope_parameters={**LLAMA3_ROPE, "factor": 32.0})),
    "qwen25": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral": ("mistral", dict(num_key_value_heads=2, head_dim=24, sliding_window=64,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}


def make_hf(model_type: str = "llama", seed: int = 0, **kw):
    """A random ``*ForCausalLM`` of the LLaMA family (fp32, eager attention) with non-trivial
    norms and biases. ``model_type``: llama | qwen2 | mistral; ``kw`` override :data:`LLAMA`."""
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
    kw = {**LLAMA, **kw}
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    cfg = getattr(transformers, f"{name}Config")(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def make_family(family: str, seed: int = 0):
    """A random model of one of :data:`FAMILIES`."""
    model_type, kw = FAMILIES[family]
    return make_hf(model_type, seed=seed, **kw)


def make_llama(num_key_value_heads: int = 4, seed: int = 0, **kw):
    """A random ``LlamaForCausalLM`` (fp32, eager attention) with non-trivial norms."""
    return make_hf("llama", seed=seed, num_key_value_heads=num_key_value_heads, **kw)


def token_ids(vocab: int, b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def megatron_logits(chunks, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] of a (PP=1) megatron model at any TP size."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    model = chunks[0] if isinstance(chunks, list) else chunks
    model.eval()
    ids = ids.to(next(model.parameters()).device)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        out = model(ids, pos, None)
        if ps.get_tensor_model_parallel_world_size() > 1:
            out = gather_from_tensor_model_parallel_region(out)
    return out[..., :vocab].float().cpu()
