"""Converters and merge under tensor (TP=2) and pipeline (PP=2) parallelism.

One torchrun launch (2 processes, gloo; worker tests/dist/convert_check.py) loads every
checkpoint built here at TP=2 and at PP=2 and merges adapters at both layouts; this file
compares against the oracles (``transformers``; the NeMo reference forward) and against
the TP=1 results computed in this process.
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from convert_fixtures import (  # noqa: E402
    FAMILIES,
    make_family,
    make_llama,
    megatron_logits,
    nemo_config,
    nemo_reference_logits,
    nemo_tp_shards,
    nemo_weights,
    read_nemo_weights,
    token_ids,
    train_tokenizer,
    write_nemo,
)
from helpers import ALL_TARGETS, perturb, preset, run_torchrun, targets_override  # noqa: E402

from tiedlora.checkpoint import save_adapter  # noqa: E402
from tiedlora.convert import load_base_checkpoint, model_config_from_checkpoint, read_source  # noqa: E402
from tiedlora.generate import greedy_generate  # noqa: E402
from tiedlora.merge import merge_checkpoint  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402
from tiedlora.peft import adapter_state_dict, apply_peft  # noqa: E402
from numerics import Net, assert_close, forward_terms  # noqa: E402

pytestmark = pytest.mark.numerics  # tests/numerics.py; run under other CPU kernels by .ci/numerics-tests

# Tolerances: fp32 rounding bounds (tests/numerics.py). Logits: the forward pass's sums (plus
# the adapter's r-term sums, merged or not). A merged weight W + s·diag(v)·B·diag(u)·A: an
# r-term sum of 4-factor products, plus the add.
RANK = 8  # the tl6 preset's rank
MERGED_WEIGHT_TERMS = RANK + 5
VOCAB = 120  # SentencePiece pieces of the .nemo tokenizer (the HF models have 200 ids)
PROMPT_LENGTHS = (5, 24, 11, 17)  # mixed-length prompts decoded in one batch at TP=2
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mp1):
    d = tmp_path_factory.mktemp("tp2")
    tok = train_tokenizer(d / "tok.model", vocab_size=VOCAB)
    ids = token_ids(VOCAB)  # valid for both vocabularies (120 < 200)
    refs, logits = {}, {}
    for name, kv in (("hf_mha", 4), ("hf_gqa", 2)):
        hf = make_llama(kv, seed=kv)
        hf.save_pretrained(d / name)
        with torch.no_grad():
            refs[name] = hf(ids).logits
        logits[name] = str(d / name)
    for n, family in enumerate(FAMILIES):  # LLaMA-3.1/3.2, Qwen2.5, Mistral (every feature kept)
        hf = make_family(family, seed=30 + n)
        hf.save_pretrained(d / family)
        with torch.no_grad():
            refs[family] = hf(ids).logits
        logits[family] = str(d / family)
    ycfg = nemo_config()
    sd = nemo_weights(ycfg, 128, seed=7)
    logits["nemo_gpt2b"] = str(write_nemo(d / "gpt2b.nemo", ycfg, sd, tok))
    logits["nemo_tp2_shards"] = str(write_nemo(
        d / "gpt2b_tp2.nemo", nemo_config(tensor_model_parallel_size=2), nemo_tp_shards(sd, ycfg, 2), tok))
    refs["nemo_gpt2b"] = refs["nemo_tp2_shards"] = nemo_reference_logits(sd, ycfg, ids)[..., :VOCAB]
    ycfg_g = nemo_config(activation="swiglu", num_query_groups=2, bias=True, rotary_percentage=1.0)
    sd_g = nemo_weights(ycfg_g, 128, seed=8)
    logits["nemo_swiglu_gqa"] = str(write_nemo(d / "swiglu.nemo", ycfg_g, sd_g, tok))
    refs["nemo_swiglu_gqa"] = nemo_reference_logits(sd_g, ycfg_g, ids)[..., :VOCAB]

    # adapters trained "at TP=1": perturbed tl6 on all four targets (fc1 has stride 2)
    merges, adapted, merged_tp1, alone = {}, {}, {}, {}
    prompts = [ids[0, :n].tolist() for n in PROMPT_LENGTHS]
    for job, ckpt in (("hf_gqa", logits["hf_gqa"]), ("nemo_gpt2b", logits["nemo_gpt2b"])):
        cfg = model_config_from_checkpoint(ckpt)
        peft_cfg = preset("tl6", target_modules=targets_override(ALL_TARGETS), alpha=16)
        model = build_gpt_model(cfg)
        load_base_checkpoint([model], cfg, ParallelConfig())
        apply_peft(model, peft_cfg)
        perturb(model, seed=13)
        adapted[job] = megatron_logits(model, ids, cfg.vocab_size)
        alone[job] = [greedy_generate(model, [p], NEW_TOKENS, eos_id=-1, vocab_size=cfg.vocab_size)[0]
                      for p in prompts]
        adapter = save_adapter(d / f"{job}.safetensors", adapter_state_dict(model), peft_cfg,
                               dataclasses.asdict(cfg))
        suffix = ".nemo" if job.startswith("nemo") else ""
        merged_tp1[job] = merge_checkpoint(adapter, cfg, d / f"{job}_merged_tp1{suffix}")
        merges[job] = {"adapter": str(adapter), "checkpoint": ckpt,
                       "out_tp2": str(d / f"{job}_merged_tp2{suffix}"),
                       "out_pp2": str(d / f"{job}_merged_pp2{suffix}")}
    manifest = d / "manifest.json"
    manifest.write_text(json.dumps({"ids": ids.tolist(), "logits": logits, "merges": merges,
                                    "prompts": prompts, "new_tokens": NEW_TOKENS}))
    got = run_torchrun("convert_check.py", 2, d / "out.pt", str(manifest))
    return dict(got=got, refs=refs, logits=logits, merges=merges, adapted=adapted, merged_tp1=merged_tp1,
                alone=alone)


@pytest.mark.dist
@pytest.mark.parametrize("name", ["hf_mha", "hf_gqa", *FAMILIES, "nemo_gpt2b", "nemo_tp2_shards", "nemo_swiglu_gqa"])
def test_tp2_logits_match_oracle(runs, name):
    got, ref = runs["got"][f"logits/{name}"], runs["refs"][name]
    assert ref.abs().max() > 1.0
    net = Net.of(model_config_from_checkpoint(runs["logits"][name]), seq=ref.shape[1])
    assert_close(got, ref, forward_terms(net), f"{name} TP=2 logits")


@pytest.mark.dist
@pytest.mark.parametrize("name", ["hf_gqa", "llama32", "qwen25", "nemo_gpt2b", "nemo_swiglu_gqa"])
def test_pp2_load_places_every_layer(runs, mp1, name):
    """Each stage maps its local layers by global layer_number; gathered = the source. With tied
    embeddings (llama32, qwen25) the last stage's copy of the output layer equals the embedding."""
    cfg = model_config_from_checkpoint(runs["logits"][name])
    _, source = read_source(cfg)
    full = dict(runs["got"][f"pp2_full/{name}"])
    if not cfg.untie_embeddings_and_output_weights:
        assert torch.equal(full.pop("output_layer.weight"), full["embedding.word_embeddings.weight"])
    assert sorted(full) == sorted(source)
    for key, lazy in source.items():
        want = lazy.read()
        got = full[key]
        if key.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert got[want.shape[0]:].abs().sum() == 0  # vocabulary padding rows
            got = got[: want.shape[0]]
        assert torch.equal(got, want), key


@pytest.mark.dist
@pytest.mark.parametrize("job", ["hf_gqa", "nemo_gpt2b"])
def test_tp2_adapted_and_merged_logits(runs, job):
    ref = runs["adapted"][job]
    terms = forward_terms(Net.of(model_config_from_checkpoint(runs["merges"][job]["checkpoint"]),
                                 seq=ref.shape[1], rank=RANK))
    assert_close(runs["got"][f"adapted/{job}"], ref, terms, f"{job} adapted TP=2 logits")
    assert_close(runs["got"][f"merged_inplace/{job}"], ref, terms, f"{job} merged TP=2 logits")


@pytest.mark.dist
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("job", ["hf_gqa", "nemo_gpt2b"])
def test_tp2_mixed_length_batch_decodes_like_each_prompt_alone(runs, job, sp):
    """Left-padded batch decoding at TP=2, with and without sequence parallelism (GQA LLaMA;
    GPT-2B-001-style with half the head dimension rotated), gives each prompt the tokens it
    gets alone at TP=1; sequence parallelism is back on afterwards."""
    got, ref = runs["got"][f"generate{'_sp' if sp else ''}/{job}"], runs["alone"][job]
    assert got == ref and all(len(t) == NEW_TOKENS for t in got)
    if sp:
        assert runs["got"][f"sp_after/{job}"] is True


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["out_tp2", "out_pp2"])
@pytest.mark.parametrize("job", ["hf_gqa", "nemo_gpt2b"])
def test_merged_checkpoint_is_layout_independent(runs, job, layout):
    tp1, other = Path(runs["merged_tp1"][job]), Path(runs["merges"][job][layout])
    if job.startswith("nemo"):
        a, b = read_nemo_weights(tp1), read_nemo_weights(other)
    else:
        a, b = load_file(str(tp1 / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert_close(b[k], a[k], MERGED_WEIGHT_TERMS, f"{job} {layout} merged {k}")
