"""The LLaMA family as people fine-tune it today: LLaMA-3.1/3.2, Qwen2.5, Mistral.

``transformers`` is the oracle: a small random model of each family, keeping every feature
of the real one (tests/dist/convert_fixtures.FAMILIES: RoPE scaling used past its original
context, q/k/v biases, tied embeddings, GQA, a head_dim other than hidden/heads, a sliding
window), converted to our megatron GPTModel, gives the same logits within the fp32 bound; a
merged directory loads in ``transformers`` with the adapted model's logits, and the exported
adapter loaded with ``peft.PeftModel`` reproduces them. Each feature's test also checks that
breaking the feature moves the logits far beyond the bound. TP=2: tests/test_convert_tp2.py.
The shipped presets are checked against the real checkpoints' config.json.
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from convert_fixtures import FAMILIES, LLAMA, make_family, megatron_logits, token_ids  # noqa: E402
from helpers import ALL_TARGETS, perturb, preset, targets_override  # noqa: E402

from tiedlora.checkpoint import save_adapter  # noqa: E402
from tiedlora.config import ModelConfig, ParallelConfig, compose, to_object  # noqa: E402
from tiedlora.convert import (  # noqa: E402
    CheckpointFormatError,
    load_base_checkpoint,
    model_config_from_checkpoint,
)
from tiedlora.convert import hf_llama  # noqa: E402
from tiedlora.convert.layout import check_model_matches  # noqa: E402
from tiedlora.export import export_peft  # noqa: E402
from tiedlora.merge import merge_checkpoint  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402
from tiedlora.peft import adapter_state_dict, apply_peft  # noqa: E402
from numerics import Net, assert_close, bound, error, forward_terms  # noqa: E402

VOCAB = LLAMA["vocab_size"]
TEETH = 100  # a broken feature must move the logits by this many times the rounding bound


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for n, family in enumerate(FAMILIES):
        model = make_family(family, seed=10 + n)
        model.save_pretrained(root / family)
        out[family] = (root / family, model)
    return out


def _ours(cfg: ModelConfig, edit=None, built_as: ModelConfig = None):
    """Our model of ``cfg``'s checkpoint; ``built_as``: build from another config (a broken feature)."""
    model = build_gpt_model(built_as or cfg)
    load_base_checkpoint([model], cfg, ParallelConfig())
    if edit:
        edit(model)
    return model


def _terms(cfg, ids, rank=0):
    return forward_terms(Net.of(cfg, seq=ids.shape[1], rank=rank))


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _zero_qkv_bias(model):
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attention.linear_qkv.bias.zero_()


# family -> (what the feature is, a ModelConfig edit or model edit that breaks it)
BREAKS = {
    "llama31": ("RoPE scaling off", dict(rope_scaling=None)),
    "llama32": ("RoPE scaling factor of LLaMA-3.1", dict(rope_scaling_factor=8.0)),
    "qwen25": ("q/k/v biases dropped", _zero_qkv_bias),
    "mistral": ("head_dim taken as hidden/heads", None),  # cannot even be built: checked below
}


@pytest.mark.numerics
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(mp1, checkpoints, family):
    path, hf = checkpoints[family]
    cfg = model_config_from_checkpoint(path)
    ids = token_ids(VOCAB)  # 24 tokens: past LLaMA-3's original context of 16 in these configs
    with torch.no_grad():
        ref = hf(ids).logits
    assert ref.abs().max() > 1.0
    terms = _terms(cfg, ids)
    assert_close(megatron_logits(_ours(cfg), ids, VOCAB), ref, terms, f"{family} logits")
    what, brk = BREAKS[family]
    if isinstance(brk, dict):
        broken = _ours(cfg, built_as=dataclasses.replace(cfg, **brk))
    elif brk is not None:
        broken = _ours(cfg, brk)
    else:
        # heads of 16 (hidden / heads) instead of 24: o_proj's 4 x 24 input columns no longer fit
        with pytest.raises(CheckpointFormatError, match=r"o_proj.weight has shape \(64, 96\), but .* needs \(64, 64\)"):
            _ours(cfg, built_as=dataclasses.replace(cfg, kv_channels=None))
        return
    off = error(megatron_logits(broken, ids, VOCAB), ref) / bound(ref, terms)
    assert off > TEETH, f"{family}: {what} moves the logits by only {off:.3g} x the bound"


def test_config_mapping(checkpoints):
    got = {f: model_config_from_checkpoint(checkpoints[f][0]) for f in FAMILIES}
    l31, l32, qwen, mistral = got["llama31"], got["llama32"], got["qwen25"], got["mistral"]
    assert (l31.rope_scaling, l31.rope_scaling_factor, l31.rope_scaling_low_freq_factor,
            l31.rope_scaling_high_freq_factor, l31.rope_scaling_original_max_positions) == ("llama3", 8.0, 1.0, 4.0, 16)
    assert l31.rotary_base == 500000 and l31.num_query_groups == 2 and l31.untie_embeddings_and_output_weights
    assert l32.rope_scaling_factor == 32.0 and not l32.untie_embeddings_and_output_weights
    assert qwen.add_qkv_bias and not qwen.add_bias_linear and qwen.rotary_base == 1000000
    assert not qwen.untie_embeddings_and_output_weights and qwen.rope_scaling is None and qwen.sliding_window is None
    assert mistral.kv_channels == 24 and mistral.head_dim == 24 and mistral.qkv_width == 24 * (4 + 2 * 2)
    assert mistral.sliding_window == 64 and mistral.seq_length == 64
    assert not any(c.add_qkv_bias for c in (l31, l32, mistral))


# ------------------------------------------------------------------ the real checkpoints' configs
# config.json of the Hub releases (transformers 4 layout: top-level rope_theta / rope_scaling)
REAL = {
    "llama3_8b": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
    "llama32_1b": {  # meta-llama/Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "qwen25_7b": {  # Qwen/Qwen2.5-7B
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 152064},
    "mistral_7b": {  # mistralai/Mistral-7B-v0.3
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 32768},
}


@pytest.mark.parametrize("name", list(REAL))
def test_presets_match_the_real_configs(name):
    got = hf_llama.model_config(REAL[name], name, name)
    shipped = to_object(compose("params", [f"model={name}"])).model
    check_model_matches(shipped, got, name)
    assert shipped.params_dtype == got.params_dtype == "bfloat16"
    assert shipped.seq_length <= got.seq_length


def test_presets_are_refused_against_another_family():
    shipped = to_object(compose("params", ["model=llama3_8b"])).model
    with pytest.raises(CheckpointFormatError, match=r"model.rope_scaling_factor: 8.0 \(checkpoint: 32.0\)"):
        check_model_matches(shipped, dataclasses.replace(
            hf_llama.model_config(REAL["llama3_8b"], "x", "x"), rope_scaling_factor=32.0), "x")
    qwen = to_object(compose("params", ["model=qwen25_7b"])).model
    no_bias = dataclasses.replace(hf_llama.model_config(REAL["qwen25_7b"], "x", "x"), add_qkv_bias=False)
    with pytest.raises(CheckpointFormatError, match=r"model.add_qkv_bias=True \(checkpoint: False\)"):
        check_model_matches(qwen, no_bias, "x")


def _edit(name, **kw):
    cfg = dict(REAL[name])
    for k, v in kw.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    return cfg


_DROP = object()


@pytest.mark.parametrize("cfg,error", [
    (_edit("llama3_8b", model_type="gemma2", architectures=["Gemma2ForCausalLM"]), r"model_type='gemma2'"),
    (_edit("llama3_8b", rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_type='yarn'"),
    (_edit("llama3_8b", rope_scaling={"type": "linear", "factor": 2.0}), r"rope_type='linear'"),
    (_edit("llama3_8b", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type='dynamic'"),
    (_edit("llama3_8b", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     r"rope_type 'llama3' without \['low_freq_factor'"),
    (_edit("llama3_8b", rope_scaling={**REAL["llama3_8b"]["rope_scaling"], "attention_factor": 2.0}),
     r"unknown fields \['attention_factor'\]"),
    (_edit("llama3_8b", attention_bias=True), r"attention_bias=true"),
    (_edit("llama3_8b", mlp_bias=True), r"mlp_bias=true"),
    (_edit("llama3_8b", hidden_act="gelu"), r"hidden_act='gelu'"),
    (_edit("llama3_8b", attention_dropout=0.1), r"attention_dropout=0.1"),
    (_edit("llama3_8b", partial_rotary_factor=0.5), r"partial_rotary_factor"),
    (_edit("llama3_8b", quantization_config={"quant_method": "awq"}), r"quantization_config=.* not understood"),
    (_edit("llama3_8b", sliding_window=4096), r"LLaMA has no sliding-window attention"),
    (_edit("qwen25_7b", use_mrope=True), r"use_mrope=true"),
    (_edit("mistral_7b", rope_theta=1e6 + 0.5), r"rope_theta=1000000.5"),
])
def test_unsupported_configs_are_refused(cfg, error):
    with pytest.raises(CheckpointFormatError, match=error):
        hf_llama.model_config(cfg, "x", "x")


def test_sliding_window_is_accepted_only_where_it_never_binds():
    # Mistral-7B-v0.1: window 4096, 32k positions -> the model's sequence length is capped at the window
    v01 = hf_llama.model_config(_edit("mistral_7b", sliding_window=4096, vocab_size=32000), "v0.1", "v0.1")
    assert v01.sliding_window == 4096 and v01.seq_length == 4096
    with pytest.raises(ValueError, match=r"model.seq_length=8192 is longer than model.sliding_window=4096"):
        dataclasses.replace(v01, seq_length=8192)
    with pytest.raises(ValueError, match=r"task.max_length=8192 is longer than model.sliding_window=4096"):
        to_object(compose("finetune", ["model=mistral_7b", "model.sliding_window=4096", "model.seq_length=4096",
                                       "task=squad", "task.max_length=8192"]))
    # Qwen2: the window applies only when use_sliding_window, and only to layers >= max_window_layers
    assert hf_llama.model_config(_edit("qwen25_7b", sliding_window=4096), "q", "q").sliding_window is None
    assert hf_llama.model_config(_edit("qwen25_7b", use_sliding_window=True, sliding_window=4096),
                                 "q", "q").sliding_window is None  # max_window_layers = 28 = all layers
    on = hf_llama.model_config(_edit("qwen25_7b", use_sliding_window=True, sliding_window=4096,
                                     max_window_layers=20), "q", "q")
    assert on.sliding_window == 4096 and on.seq_length == 4096


# ------------------------------------------------------------------------ merge and export
@pytest.mark.numerics
@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_and_export_round_trip(mp1, checkpoints, tmp_path, family):
    peft = pytest.importorskip("peft")
    path, _ = checkpoints[family]
    cfg = model_config_from_checkpoint(path)
    peft_cfg = preset("tl6", target_modules=targets_override(ALL_TARGETS), alpha=16)
    model = apply_peft(_ours(cfg), peft_cfg)
    perturb(model, seed=21)
    ids = token_ids(VOCAB)
    ours = megatron_logits(model, ids, VOCAB)
    base = _hf_logits(path, ids)
    assert (ours - base).abs().max() > 0.5, "adapters barely change the logits (test has no teeth)"
    terms = _terms(cfg, ids, rank=peft_cfg.rank)
    adapter = save_adapter(tmp_path / "a.safetensors", adapter_state_dict(model), peft_cfg, dataclasses.asdict(cfg))

    merged = merge_checkpoint(adapter, cfg, tmp_path / "merged")
    assert_close(_hf_logits(merged, ids), ours, terms, f"{family} merged logits (transformers)")
    assert json.loads((merged / "config.json").read_text()) == json.loads((path / "config.json").read_text())

    out = export_peft(adapter, cfg, tmp_path / "peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    lora = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        assert_close(lora(ids).logits, ours, terms, f"{family} PEFT export logits")


# ---------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name,lora,tl6,base", [
    # QKV only, r = 8: LoRA L·r·(d_in + d_out), TL6 r·(d_in + d_out) + L·(r + d_out), d_out = (heads + 2·groups)·head_dim;
    # base: the parameter count of the released checkpoint (tied embeddings counted once, Qwen's biases included)
    ("llama3_8b", 32 * 8 * (4096 + 6144), 8 * (4096 + 6144) + 32 * (8 + 6144), 8_030_261_248),
    ("llama32_1b", 16 * 8 * (2048 + 3072), 8 * (2048 + 3072) + 16 * (8 + 3072), 1_235_814_400),
    ("qwen25_7b", 28 * 8 * (3584 + 4608), 8 * (3584 + 4608) + 28 * (8 + 4608), 7_615_616_512),
    ("mistral_7b", 32 * 8 * (4096 + 6144), 8 * (4096 + 6144) + 32 * (8 + 6144), 7_248_023_552),
])
def test_parameter_report_counts(mp1, name, lora, tl6, base):
    """What ``python -m tiedlora.params model=<name> peft=tl6`` reports (the model built on the meta device)."""
    from tiedlora.params import count

    cfg = to_object(compose("params", [f"model={name}", "peft=tl6", "peft.rank=8"]))
    got = count(cfg.model, cfg.peft)
    assert (got["trainable"], got["formula"], got["lora_trainable"], got["frozen_params"]) == (tl6, tl6, lora, base), got
