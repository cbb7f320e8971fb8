"""Merge (adapters folded into the base, saved in the base's format) and PEFT export.

Oracles: the merged Hugging Face directory is loaded by ``transformers``, the merged
``.nemo`` by the plain-torch NeMo reference, the exported adapter by ``peft.PeftModel``;
each must reproduce our adapted model's logits. TP=2 merges: tests/test_convert_tp2.py.
"""

import dataclasses
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from convert_fixtures import (  # noqa: E402
    LLAMA,
    PREFIX,
    TOKENIZER_NAME,
    make_llama,
    megatron_logits,
    nemo_config,
    nemo_reference_logits,
    nemo_weights,
    read_nemo_weights,
    token_ids,
    train_tokenizer,
    write_nemo,
)
from helpers import ALL_TARGETS, perturb, preset, targets_override  # noqa: E402

from tiedlora.checkpoint import ADAPTER_FILE, STATE_FILE, commit_checkpoint, save_adapter  # noqa: E402
from tiedlora.convert import CheckpointFormatError, load_base_checkpoint, model_config_from_checkpoint  # noqa: E402
from tiedlora.convert.layout import gather_full  # noqa: E402
from tiedlora.export import ExportError, export_peft, peft_state_dict  # noqa: E402
from tiedlora.export import main as export_main  # noqa: E402
from tiedlora.merge import merge_adapters_, merge_checkpoint  # noqa: E402
from tiedlora.merge import main as merge_main  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402
from tiedlora.peft import AdaptedLinear, adapter_state_dict, apply_peft, iter_adapter_params  # noqa: E402
from numerics import Net, assert_close, forward_terms  # noqa: E402

# Adapters are perturbed to change the logits by O(1) (see the "has teeth" asserts), so
# merged-vs-adapted differences are fp32 rounding: the forward pass's sums, with an r-term
# sum more per adapted linear (x·ΔW or (W + ΔW) x). Bounds from tests/numerics.py.


def logits_terms(cfg, ids, rank: int = 8) -> int:
    return forward_terms(Net.of(cfg, seq=ids.shape[1], rank=rank))


VOCAB = LLAMA["vocab_size"]
PEFTS = {  # name -> preset overrides
    "tl6_all_targets": ("tl6", dict(target_modules=targets_override(ALL_TARGETS), alpha=16)),
    "lora_qkv": ("lora", dict(alpha=32)),
    "vera_qkv_fc1": ("vera", dict(target_modules="[linear_qkv,linear_fc1]")),
    "tl2_proj_fc2": ("tl2", dict(target_modules="[linear_proj,linear_fc2]")),
}


def adapted(cfg, peft_name, seed=5):
    """A model loaded from cfg.checkpoint with perturbed adapters, and its logits."""
    name, overrides = PEFTS[peft_name]
    peft_cfg = preset(name, **overrides)
    model = build_gpt_model(cfg)
    load_base_checkpoint([model], cfg, ParallelConfig())
    apply_peft(model, peft_cfg)
    perturb(model, seed=seed)
    return model, peft_cfg


def save(model, peft_cfg, cfg, path):
    return save_adapter(path, adapter_state_dict(model), peft_cfg, dataclasses.asdict(cfg))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "llama_gqa"
    make_llama(2, seed=3).save_pretrained(path)
    (path / "tokenizer.model").write_bytes(b"spm-bytes")  # copied through by the merge
    return path


@pytest.fixture(scope="module")
def nemo_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("nemo")
    tok = train_tokenizer(d / "tok.model")
    ycfg = nemo_config(tensor_model_parallel_size=1)
    return write_nemo(d / "gpt.nemo", ycfg, nemo_weights(ycfg, 128, seed=2), tok), ycfg


def _hf_logits(path, ids):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- merge
@pytest.mark.numerics
def test_merge_in_place_removes_adapters(mp1, hf_dir):
    cfg = model_config_from_checkpoint(hf_dir)
    model, _ = adapted(cfg, "tl6_all_targets")
    ids = token_ids(VOCAB)
    before = megatron_logits(model, ids, VOCAB)
    names = merge_adapters_(model)
    assert len(names) == 4 * cfg.num_layers and "decoder.layers.1.mlp.linear_fc1.weight" in names
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert list(iter_adapter_params(model)) == []
    assert not any(".base." in n for n, _ in model.named_parameters())
    assert_close(megatron_logits(model, ids, VOCAB), before, logits_terms(cfg, ids), "merged in place")


@pytest.mark.numerics
@pytest.mark.parametrize("peft_name", ["tl6_all_targets", "vera_qkv_fc1"])
def test_merge_hf_matches_adapted_model(mp1, hf_dir, tmp_path, peft_name):
    cfg = model_config_from_checkpoint(hf_dir)
    model, peft_cfg = adapted(cfg, peft_name)
    ids = token_ids(VOCAB)
    ours = megatron_logits(model, ids, VOCAB)
    base = _hf_logits(hf_dir, ids)
    assert (ours - base).abs().max() > 0.5, "adapters barely change the logits (test has no teeth)"
    out = merge_checkpoint(save(model, peft_cfg, cfg, tmp_path / "a.safetensors"), cfg, tmp_path / "merged")
    assert_close(_hf_logits(out, ids), ours, logits_terms(cfg, ids), f"{peft_name} merged HF logits")
    # untouched tensors are copied bit for bit; non-weight files come along
    src, got = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(src) == set(got)
    changed = {k for k in src if not torch.equal(src[k], got[k])}
    proj = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_fc1": ("gate_proj", "up_proj"),
            "linear_proj": ("o_proj",), "linear_fc2": ("down_proj",)}
    want = {k for k in src for t in peft_cfg.target_modules for p in proj[t] if f".{p}." in k}
    assert changed == want
    assert (out / "tokenizer.model").read_bytes() == b"spm-bytes"
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())


def test_hf_merged_output_sharding(hf_dir, tmp_path):
    """Above max_shard_bytes the merged weights are sharded with an index, as HF does."""
    from tiedlora.convert import hf_llama

    cfg = model_config_from_checkpoint(hf_dir)
    out = hf_llama.save_merged(hf_dir, tmp_path / "sharded", {}, cfg, max_shard_bytes=40_000)
    index = json.loads((out / hf_llama.ST_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    ids = token_ids(VOCAB)
    torch.testing.assert_close(_hf_logits(out, ids), _hf_logits(hf_dir, ids), atol=0, rtol=0)


@pytest.mark.numerics
def test_merge_nemo_matches_adapted_model(mp1, nemo_file, tmp_path):
    path, ycfg = nemo_file
    cfg = model_config_from_checkpoint(path)
    model, peft_cfg = adapted(cfg, "tl6_all_targets")
    vocab = cfg.vocab_size
    ids = token_ids(vocab)
    ours = megatron_logits(model, ids, vocab)
    out = merge_checkpoint(save(model, peft_cfg, cfg, tmp_path / "a.safetensors"), cfg, tmp_path / "merged.nemo")
    merged_sd = read_nemo_weights(out)
    with tarfile.open(out) as tar:
        names = {m.name for m in tar.getmembers()}
        tok = tar.extractfile(f"./{TOKENIZER_NAME}").read()
    assert names == {"./model_config.yaml", "./model_weights.ckpt", f"./{TOKENIZER_NAME}"}
    assert tok == Path(path.parent / "tok.model").read_bytes()
    # the NeMo-semantics oracle on the merged archive's own tensors
    ref = nemo_reference_logits(merged_sd, ycfg, ids)[..., :vocab]
    assert (ref - nemo_reference_logits(nemo_weights(ycfg, 128, seed=2), ycfg, ids)[..., :vocab]).abs().max() > 0.5
    assert_close(ref, ours, logits_terms(cfg, ids), "merged .nemo logits (NeMo reference)")
    # and our own loader on the merged archive (no adapters)
    merged_cfg = model_config_from_checkpoint(out)
    plain = build_gpt_model(merged_cfg)
    load_base_checkpoint([plain], merged_cfg, ParallelConfig())
    assert_close(megatron_logits(plain, ids, vocab), ours, logits_terms(cfg, ids), "merged .nemo logits (ours)")
    src = nemo_weights(ycfg, 128, seed=2)
    for k, t in src.items():
        same = torch.equal(merged_sd[k], t)
        assert same == (".mlp." not in k and ".self_attention." not in k), k


@pytest.mark.numerics
def test_merge_nemo_swiglu_halves(mp1, tmp_path):
    tok = train_tokenizer(tmp_path / "tok.model")
    ycfg = nemo_config(activation="swiglu", rotary_percentage=1.0)
    path = write_nemo(tmp_path / "g.nemo", ycfg, nemo_weights(ycfg, 128, seed=4), tok)
    cfg = model_config_from_checkpoint(path)
    model, peft_cfg = adapted(cfg, "tl6_all_targets")
    ids = token_ids(cfg.vocab_size)
    ours = megatron_logits(model, ids, cfg.vocab_size)
    out = merge_checkpoint(save(model, peft_cfg, cfg, tmp_path / "a.safetensors"), cfg, tmp_path / "m.nemo")
    sd = read_nemo_weights(out)
    assert PREFIX + "encoder.layers.0.mlp.dense_h_to_4h_2.weight" in sd
    assert_close(nemo_reference_logits(sd, ycfg, ids)[..., :cfg.vocab_size], ours, logits_terms(cfg, ids),
                 "merged swiglu .nemo logits")


def test_merge_refuses_other_base(mp1, hf_dir, nemo_file, tmp_path):
    hf_cfg = model_config_from_checkpoint(hf_dir)
    model, peft_cfg = adapted(hf_cfg, "lora_qkv")
    adapter = save(model, peft_cfg, hf_cfg, tmp_path / "a.safetensors")
    nemo_cfg = model_config_from_checkpoint(nemo_file[0])
    with pytest.raises(CheckpointFormatError, match=r"trained on another base model: .*vocab_size: adapter 200"):
        merge_checkpoint(adapter, nemo_cfg, tmp_path / "x.nemo")
    wrong = dataclasses.replace(hf_cfg, num_query_groups=None)
    with pytest.raises(CheckpointFormatError, match=r"model.num_query_groups: 4 \(checkpoint: 2\)"):
        merge_checkpoint(tmp_path / "a.safetensors", dataclasses.replace(wrong, name="w"), tmp_path / "y")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        merge_checkpoint(adapter, hf_cfg, tmp_path / "exists")


# --------------------------------------------------------------------------- export
@pytest.mark.numerics
@pytest.mark.parametrize("peft_name", list(PEFTS))
def test_export_peft_reproduces_adapted_model(mp1, hf_dir, tmp_path, peft_name):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    cfg = model_config_from_checkpoint(hf_dir)
    model, peft_cfg = adapted(cfg, peft_name)
    ids = token_ids(VOCAB)
    ours = megatron_logits(model, ids, VOCAB)
    out = export_peft(save(model, peft_cfg, cfg, tmp_path / "a.safetensors"), cfg, tmp_path / "peft")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == conf["lora_alpha"] == peft_cfg.rank and conf["peft_type"] == "LORA"
    base = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    lora = peft.PeftModel.from_pretrained(base, out).eval()
    n_lora = sum(1 for n, _ in lora.named_parameters() if "lora_" in n)
    assert n_lora == len(load_file(str(out / "adapter_model.safetensors")))  # every tensor was picked up
    with torch.no_grad():
        got = lora(ids).logits
        assert (got - _hf_logits(hf_dir, ids)).abs().max() > 0.5, "test has no teeth"
    assert_close(got, ours, logits_terms(cfg, ids), f"{peft_name} PEFT export logits")


@pytest.mark.numerics
def test_export_formula_per_layer(mp1, hf_dir):
    """q/k/v blocks of B_l, shared A_l = diag(u)A, B_l = s·diag(v)B: spelled out for one layer."""
    cfg = model_config_from_checkpoint(hf_dir)
    model, peft_cfg = adapted(cfg, "tl6_all_targets")
    sd = adapter_state_dict(model)
    out = peft_state_dict(sd, peft_cfg, cfg)
    A = sd["layers.1.linear_qkv.u"][:, None] * sd["tied.linear_qkv.A"]
    B = peft_cfg.scale * sd["layers.1.linear_qkv.v"][:, None] * sd["tied.linear_qkv.B"]
    p = "base_model.model.model.layers.1.self_attn."
    # GQA: 4 heads, 2 groups, head_dim 16 -> per group [q0 q1 k v] x 16 rows
    rows = B.view(2, 4, 16, -1)
    # elementwise products of 3 factors (s, v, B) or 2 (u, A): a few roundings each
    assert_close(out[p + "k_proj.lora_B.weight"], rows[:, 2].reshape(32, -1), 3, "k_proj B")
    assert_close(out[p + "q_proj.lora_B.weight"], rows[:, :2].reshape(64, -1), 3, "q_proj B")
    for m in ("q_proj", "k_proj", "v_proj"):
        assert_close(out[p + m + ".lora_A.weight"], A, 2, f"{m} A")


def test_export_refuses_nemo_base(mp1, nemo_file, tmp_path):
    cfg = model_config_from_checkpoint(nemo_file[0])
    model, peft_cfg = adapted(cfg, "lora_qkv")
    with pytest.raises(ExportError, match="has no Hugging Face counterpart"):
        export_peft(save(model, peft_cfg, cfg, tmp_path / "a.safetensors"), cfg, tmp_path / "peft")


# ----------------------------------------------------------------------------- CLIs
def test_cli_merge_and_export(mp1, hf_dir, nemo_file, tmp_path):
    pytest.importorskip("peft")
    hf_cfg = model_config_from_checkpoint(hf_dir)
    model, peft_cfg = adapted(hf_cfg, "tl6_all_targets")
    run = tmp_path / "run"  # a training run's output directory: its checkpoints/latest is used

    def write(d):
        save(model, peft_cfg, hf_cfg, d / ADAPTER_FILE)
        (d / STATE_FILE).write_bytes(b"")

    step_dir = commit_checkpoint(run, 10, write, keep_last=1)
    ids = token_ids(VOCAB)
    ours = megatron_logits(model, ids, VOCAB)
    # an HF base is a preset too: every architecture field is overridden on llama2_7b
    arch = [f"model.{k}={v}" for k, v in dataclasses.asdict(hf_cfg).items()
            if k not in ("name", "checkpoint", "tokenizer") and v is not None]
    out = merge_main(["--adapter", str(run), "--output", str(tmp_path / "merged"),
                      "model=llama2_7b", f"model.checkpoint={hf_dir}", *arch])
    assert_close(_hf_logits(out, ids), ours, logits_terms(hf_cfg, ids), "merge CLI logits")
    out = export_main(["--adapter", str(step_dir / ADAPTER_FILE), "--output", str(tmp_path / "peft"),
                       "model=llama2_7b", f"model.checkpoint={hf_dir}", *arch])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_dir)
    with pytest.raises(CheckpointFormatError, match=r"model.hidden_size=4096 \(checkpoint: 64\)"):
        merge_main(["--adapter", str(run), "--output", str(tmp_path / "m2"), "model=llama2_7b",
                    f"model.checkpoint={hf_dir}"])
    with pytest.raises(SystemExit):
        merge_main(["--adapter", str(run), "--output", str(tmp_path / "m3"), "model=llama2_7b"])


def test_gather_full_after_merge_matches_saved(mp1, nemo_file, tmp_path):
    """gather_full names are canonical (global layers, no .base)."""
    cfg = model_config_from_checkpoint(nemo_file[0])
    model, _ = adapted(cfg, "lora_qkv")
    names = merge_adapters_(model)
    full = gather_full([model], names)
    assert sorted(full) == [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(2)]
