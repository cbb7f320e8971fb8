"""Hugging Face LLaMA import: ``transformers`` is the oracle.

A small random ``LlamaForCausalLM`` (multi-head and grouped-query attention) is saved in
each of Hugging Face's weight layouts, converted into our megatron GPTModel at TP=1, and
must give the same logits. TP=2 is covered by tests/test_convert_tp2.py.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from convert_fixtures import LLAMA, make_llama, megatron_logits, token_ids  # noqa: E402

from tiedlora.convert import (  # noqa: E402
    CheckpointFormatError,
    load_base_checkpoint,
    model_config_from_checkpoint,
    tokenizer_path,
)
from tiedlora.convert import hf_llama  # noqa: E402
from tiedlora.convert.layout import check_model_matches, fuse_qkv, split_qkv  # noqa: E402
from tiedlora.config import ModelConfig, ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402
from numerics import Net, assert_close, forward_terms  # noqa: E402

VOCAB = LLAMA["vocab_size"]

VARIANTS = {
    "mha_safetensors": dict(kv=4, save={}),
    "gqa_safetensors": dict(kv=2, save={}),
    "gqa_sharded_safetensors": dict(kv=2, save={"max_shard_size": "60KB"}),
    "mqa_tied": dict(kv=1, save={}, model={"tie_word_embeddings": True}),
    "gqa_bin_shards": dict(kv=2, bin=True),
}


def _save_bin_shards(model, path: Path) -> None:
    """pytorch_model-0000X-of-00002.bin + index (the pre-safetensors layout)."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    wmap = {}
    for n, part in enumerate(halves, 1):
        name = f"pytorch_model-{n:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, path / name)
        wmap.update({k: name for k in part})
    (path / hf_llama.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, spec in VARIANTS.items():
        model = make_llama(spec["kv"], seed=len(out), **spec.get("model", {}))
        path = root / name
        if spec.get("bin"):
            _save_bin_shards(model, path)
        else:
            model.save_pretrained(path, **spec["save"])
        out[name] = (path, model)
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(mp1, checkpoints, variant):
    path, hf = checkpoints[variant]
    if variant == "gqa_sharded_safetensors":
        assert (path / hf_llama.ST_INDEX).is_file()
    cfg = model_config_from_checkpoint(path)
    model = build_gpt_model(cfg)
    load_base_checkpoint([model], cfg, ParallelConfig())
    ids = token_ids(VOCAB)
    with torch.no_grad():
        ref = hf(ids).logits
    assert ref.abs().max() > 1.0
    assert_close(megatron_logits(model, ids, VOCAB), ref, forward_terms(Net.of(cfg, seq=ids.shape[1])),
                 f"{variant} logits")


@pytest.mark.numerics
def test_load_after_apply_peft(mp1, checkpoints):
    """Adapted linears hold their weight as .base.weight: still found, adapters untouched."""
    from tiedlora.peft import PeftConfig, adapter_state_dict, apply_peft

    path, hf = checkpoints["gqa_safetensors"]
    cfg = model_config_from_checkpoint(path)
    model = apply_peft(build_gpt_model(cfg), PeftConfig(target_modules=["linear_qkv", "linear_fc1"]))
    before = adapter_state_dict(model)
    load_base_checkpoint([model], cfg, ParallelConfig())
    ids = token_ids(VOCAB)
    with torch.no_grad():
        ref = hf(ids).logits
    assert_close(megatron_logits(model, ids, VOCAB), ref,  # v = 0: ΔW = 0
                 forward_terms(Net.of(cfg, seq=ids.shape[1], rank=8)), "logits after apply_peft")
    after = adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_config_mapping(checkpoints):
    cfg = model_config_from_checkpoint(checkpoints["gqa_safetensors"][0])
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 96)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim) == (4, 2, 16)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert cfg.activation == "swiglu" and cfg.rotary_base == 10000 and cfg.rotary_percent == 1.0
    assert cfg.vocab_size == VOCAB and cfg.untie_embeddings_and_output_weights
    assert not model_config_from_checkpoint(checkpoints["mqa_tied"][0]).untie_embeddings_and_output_weights


LLAMA2_7B_CONFIG = {  # meta-llama/Llama-2-7b-hf config.json (transformers 4.x layout)
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_llama2_7b_preset_matches_its_config():
    from tiedlora.config import compose, to_object

    got = hf_llama.model_config(LLAMA2_7B_CONFIG, "Llama-2-7b-hf", "Llama-2-7b-hf")
    preset = to_object(compose("params", ["model=llama2_7b"])).model
    check_model_matches(preset, got, "Llama-2-7b-hf")
    assert got.params_dtype == "float16" and got.rotary_base == 10000
    gqa = {**LLAMA2_7B_CONFIG, "num_key_value_heads": 8, "rope_theta": 500000.0}
    got = hf_llama.model_config(gqa, "x", "x")
    assert got.num_query_groups == 8 and got.rotary_base == 500000
    with pytest.raises(CheckpointFormatError, match=r"model.num_query_groups: 32 \(checkpoint: 8\)"):
        check_model_matches(preset, got, "x")


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def _load(path):
    cfg = model_config_from_checkpoint(path)
    load_base_checkpoint([build_gpt_model(cfg)], cfg, ParallelConfig())


def test_unknown_key_is_named(mp1, checkpoints, tmp_path):
    path = _edited_copy(checkpoints["gqa_safetensors"][0], tmp_path / "m",
                        lambda sd: sd.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(16)))
    with pytest.raises(CheckpointFormatError, match=r"unknown key\(s\) \[model\.layers\.0\.self_attn\.q_norm\.weight\]"):
        _load(path)


def test_missing_projection_is_named(mp1, checkpoints, tmp_path):
    path = _edited_copy(checkpoints["gqa_safetensors"][0], tmp_path / "m",
                        lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointFormatError, match=r"layer 1: .*q_proj\.weight.* without its k_proj"):
        _load(path)


def test_missing_tensor_is_named(mp1, checkpoints, tmp_path):
    path = _edited_copy(checkpoints["gqa_safetensors"][0], tmp_path / "m", lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(CheckpointFormatError, match=r"missing tensor\(s\) \[decoder\.final_layernorm\.weight\]"):
        _load(path)


def test_wrong_shape_is_named(mp1, checkpoints, tmp_path):
    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    path = _edited_copy(checkpoints["gqa_safetensors"][0], tmp_path / "m", edit)
    with pytest.raises(CheckpointFormatError, match=r"k_proj\.weight has shape \(16, 64\); expected 32 rows"):
        _load(path)


def test_no_weights(tmp_path, checkpoints):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((checkpoints["mha_safetensors"][0] / "config.json").read_text())
    cfg = model_config_from_checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointFormatError, match=r"no weights \(model\.safetensors"):
        hf_llama.read_source(tmp_path / "m", cfg)


def test_qkv_fusion_layout():
    """Megatron's per-group layout, spelled out: group g = [q heads of g; k_g; v_g]."""
    cfg = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=1,
                      num_layers=1, ffn_hidden_size=8)
    q, k, v = torch.tensor([0., 1, 2, 3]), torch.tensor([10., 11]), torch.tensor([20., 21])
    fused = fuse_qkv(q[:, None], k[:, None], v[:, None], cfg)[:, 0]
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert [t.tolist() for t in split_qkv(fused, cfg)] == [q.tolist(), k.tolist(), v.tolist()]


def test_tokenizer_path(tmp_path, checkpoints):
    src = checkpoints["mha_safetensors"][0]
    with pytest.raises(CheckpointFormatError, match="no tokenizer.model or tokenizer.json"):
        tokenizer_path(src)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_path(tmp_path) == tmp_path
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert tokenizer_path(tmp_path) == tmp_path / "tokenizer.model"
