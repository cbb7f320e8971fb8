""".nemo import: a synthetic GPT-2B-001-style archive round-trips to the oracle's logits.

The oracle is ``nemo_reference_logits`` (tests/dist/convert_fixtures.py): NeMo's legacy GPT
forward pass written in plain torch from NeMo's semantics, fed the very tensors written into
the archive. TP=2 is covered by tests/test_convert_tp2.py.
"""

import io
import sys
import tarfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from convert_fixtures import (  # noqa: E402
    PREFIX,
    TOKENIZER_NAME,
    megatron_logits,
    nemo_config,
    nemo_reference_logits,
    nemo_tp_shards,
    nemo_weights,
    token_ids,
    train_tokenizer,
    write_nemo,
)

from tiedlora.convert import (  # noqa: E402
    CheckpointFormatError,
    load_base_checkpoint,
    model_config_from_checkpoint,
    tokenizer_path,
)
from tiedlora.convert import nemo as nemo_mod  # noqa: E402
from tiedlora.convert.layout import check_model_matches  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_gpt_model  # noqa: E402
from numerics import Net, assert_close, forward_terms  # noqa: E402

ROWS = 128  # NeMo pads the vocabulary to a multiple of 128 at TP=1


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")


@pytest.fixture(scope="module")
def vocab(tok):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()


VARIANTS = {
    # GPT-2B-001's settings: fast-swiglu, layernorm1p, rope 0.5, no bias, untied
    "gpt2b_tar": dict(cfg={}, layout="tar"),
    "gpt2b_folder": dict(cfg={}, layout="folder"),
    "gpt2b_tp2_shards": dict(cfg={"tensor_model_parallel_size": 2}, layout="shards"),
    # LLaMA-style NeMo conversion: separate gate/up halves, GQA, biases
    "swiglu_halves_gqa_bias": dict(cfg={"activation": "swiglu", "num_query_groups": 2, "bias": True,
                                        "rotary_percentage": 1.0}, layout="tar"),
    # classic GPT: gelu, learned positions, plain LayerNorm, tied embeddings
    "gelu_learned_tied": dict(cfg={"activation": "gelu", "position_embedding_type": "learned_absolute",
                                   "normalization": "layernorm", "share_embeddings_and_output_weights": True,
                                   "bias": True}, layout="tar"),
}


def build_archive(tmp_path, tok, variant):
    spec = VARIANTS[variant]
    ycfg = nemo_config(**spec["cfg"])
    sd = nemo_weights(ycfg, ROWS, seed=1)
    if spec["layout"] == "shards":
        path = write_nemo(tmp_path / "m.nemo", ycfg, nemo_tp_shards(sd, ycfg, 2), tok)
    elif spec["layout"] == "folder":
        path = write_nemo(tmp_path / "m_extracted", ycfg, sd, tok, folder=True)
    else:
        path = write_nemo(tmp_path / "m.nemo", ycfg, sd, tok)
    return path, ycfg, sd


@pytest.mark.numerics
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_roundtrip_logits(mp1, tmp_path, tok, vocab, variant):
    path, ycfg, sd = build_archive(tmp_path, tok, variant)
    cfg = model_config_from_checkpoint(path)
    model = build_gpt_model(cfg)
    load_base_checkpoint([model], cfg, ParallelConfig())
    ids = token_ids(vocab)
    ref = nemo_reference_logits(sd, ycfg, ids)[..., :vocab]
    got = megatron_logits(model, ids, vocab)
    assert ref.abs().max() > 1.0
    assert_close(got, ref, forward_terms(Net.of(cfg, seq=ids.shape[1])), f"{variant} logits")


def test_model_config_from_archive(tmp_path, tok, vocab):
    path, _, _ = build_archive(tmp_path, tok, "gpt2b_tar")
    cfg = model_config_from_checkpoint(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads) == (2, 64, 96, 4)
    assert cfg.normalization == "LayerNorm" and cfg.layernorm_zero_centered_gamma
    assert cfg.activation == "swiglu" and cfg.rotary_percent == 0.5 and cfg.rotary_base == 10000
    assert cfg.untie_embeddings_and_output_weights and not cfg.add_bias_linear
    assert cfg.vocab_size == vocab and cfg.seq_length == 64 and cfg.params_dtype == "float32"
    assert cfg.checkpoint == str(path)


def test_gpt2b_001_preset_matches_its_nemo_config():
    """conf/model/gpt2b_001.yaml agrees with GPT-2B-001's model_config.yaml settings."""
    from tiedlora.config import compose, to_object

    ycfg = nemo_config(num_layers=24, hidden_size=2048, ffn_hidden_size=5440, num_attention_heads=16,
                       encoder_seq_length=4096, max_position_embeddings=4096, precision="bf16")
    got = nemo_mod.model_config(ycfg, "GPT-2B-001", 256000, "GPT-2B-001.nemo")
    preset = to_object(compose("params", ["model=gpt2b_001"])).model
    check_model_matches(preset, got, "GPT-2B-001.nemo")
    assert got.params_dtype == preset.params_dtype == "bfloat16"
    with pytest.raises(CheckpointFormatError, match=r"model.ffn_hidden_size=5440 \(checkpoint: 4096\)"):
        check_model_matches(preset, nemo_mod.model_config({**ycfg, "ffn_hidden_size": 4096}, "x", 256000, "x"), "x")


def test_tokenizer_is_located_and_extracted(tmp_path, tok):
    path, _, _ = build_archive(tmp_path, tok, "gpt2b_tar")
    out = tokenizer_path(path, tmp_path / "tok_out")
    assert out == tmp_path / "tok_out" / TOKENIZER_NAME
    assert out.read_bytes() == tok.read_bytes()
    assert tokenizer_path(path, tmp_path / "tok_out") == out  # reused, not re-extracted
    folder, _, _ = build_archive(tmp_path, tok, "gpt2b_folder")
    assert tokenizer_path(folder) == folder / TOKENIZER_NAME


def test_tokenizer_default_cache(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("TIEDLORA_CACHE", str(tmp_path / "cache"))
    path, _, _ = build_archive(tmp_path, tok, "gpt2b_tar")
    out = tokenizer_path(path)
    assert out.is_relative_to(tmp_path / "cache") and out.read_bytes() == tok.read_bytes()


# ------------------------------------------------------------------------ bad archives
class NotATensor:  # an arbitrary pickled object: must never be unpickled
    pass


def _tar_with(tmp_path, members: dict, links: dict = None) -> Path:
    path = tmp_path / "bad.nemo"
    with tarfile.open(path, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def _good_members(tok):
    import yaml

    ycfg = nemo_config()
    buf = io.BytesIO()
    torch.save(nemo_weights(ycfg, ROWS), buf)
    return {"./model_config.yaml": yaml.safe_dump(ycfg).encode(), "./model_weights.ckpt": buf.getvalue(),
            f"./{TOKENIZER_NAME}": tok.read_bytes()}


def _load(path):
    cfg = model_config_from_checkpoint(path)
    load_base_checkpoint([build_gpt_model(cfg)], cfg, ParallelConfig())


@pytest.mark.parametrize("name,error", [
    ("../evil.txt", r"unsafe member name '\.\./evil\.txt' \(contains '\.\.'\)"),
    ("./sub/../../evil.txt", r"contains '\.\.'"),
    ("/etc/evil.txt", r"unsafe member name '/etc/evil\.txt' \(absolute path\)"),
])
def test_unsafe_member_names_are_refused(tmp_path, tok, name, error):
    path = _tar_with(tmp_path, {**_good_members(tok), name: b"x"})
    with pytest.raises(CheckpointFormatError, match=error):
        model_config_from_checkpoint(path)
    with pytest.raises(CheckpointFormatError, match=error):
        tokenizer_path(path, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


def test_link_members_are_refused(tmp_path, tok):
    path = _tar_with(tmp_path, _good_members(tok), links={"./escape.model": "/etc/passwd"})
    with pytest.raises(CheckpointFormatError, match=r"member '\./escape\.model' is a link"):
        model_config_from_checkpoint(path)


@pytest.mark.parametrize("drop,error", [
    ("./model_weights.ckpt", r"no model_weights\.ckpt and no mp_rank_XX/model_weights\.ckpt"),
    ("./model_config.yaml", r"no 'model_config\.yaml' \(the model config\)"),
    (f"./{TOKENIZER_NAME}", r"cannot find the tokenizer \(tokenizer\.model='nemo:a1b2c3_tokenizer\.model'\)"),
])
def test_missing_member(mp1, tmp_path, tok, drop, error):
    members = _good_members(tok)
    del members[drop]
    with pytest.raises(CheckpointFormatError, match=error):
        _load(_tar_with(tmp_path, members))


def _with_weights(tmp_path, tok, edit) -> Path:
    ycfg = nemo_config()
    sd = nemo_weights(ycfg, ROWS)
    edit(sd)
    return write_nemo(tmp_path / "m.nemo", ycfg, sd, tok)


def test_wrong_shape_names_the_key(mp1, tmp_path, tok):
    key = PREFIX + "encoder.layers.1.self_attention.query_key_value.weight"
    path = _with_weights(tmp_path, tok, lambda sd: sd.__setitem__(key, torch.zeros(190, 64)))
    with pytest.raises(CheckpointFormatError, match=rf"{key} has shape \(190, 64\), but "
                       r"decoder\.layers\.1\.self_attention\.linear_qkv\.weight needs \(192, 64\)"):
        _load(path)


def test_unknown_key_is_named(mp1, tmp_path, tok):
    key = PREFIX + "encoder.layers.0.self_attention.adapter_layer.lora.weight"
    path = _with_weights(tmp_path, tok, lambda sd: sd.__setitem__(key, torch.zeros(4)))
    with pytest.raises(CheckpointFormatError, match=rf"unknown key\(s\) \[{key}\]"):
        _load(path)


def test_missing_key_is_named(mp1, tmp_path, tok):
    path = _with_weights(tmp_path, tok, lambda sd: sd.pop(PREFIX + "encoder.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(CheckpointFormatError, match=r"missing tensor\(s\) \[decoder\.layers\.1\.mlp\.linear_fc2\.weight\]"):
        _load(path)


def test_layer_beyond_config_is_named(mp1, tmp_path, tok):
    extra = PREFIX + "encoder.layers.2.input_layernorm.weight"
    path = _with_weights(tmp_path, tok, lambda sd: sd.__setitem__(extra, torch.zeros(64)))
    with pytest.raises(CheckpointFormatError, match=rf"no place for: \[{extra} \(-> decoder\.layers\.2"):
        _load(path)


def test_rotary_mismatch_is_refused(mp1, tmp_path, tok):
    key = PREFIX + "rotary_pos_emb.inv_freq"
    path = _with_weights(tmp_path, tok, lambda sd: sd.__setitem__(key, torch.ones(8)))
    with pytest.raises(CheckpointFormatError, match="does not match rotary_percentage=0.5"):
        _load(path)


def test_arbitrary_pickles_are_not_loaded(mp1, tmp_path, tok):
    members = _good_members(tok)
    buf = io.BytesIO()
    torch.save(OrderedDict(payload=NotATensor()), buf)
    members["./model_weights.ckpt"] = buf.getvalue()
    with pytest.raises(CheckpointFormatError, match=r"weights_only=True"):
        _load(_tar_with(tmp_path, members))


@pytest.mark.parametrize("key,value,error", [
    ("mcore_gpt", True, "megatron-core .nemo checkpoints"),
    ("activation", "geglu", r"activation='geglu'"),
    ("position_embedding_type", "alibi", r"position_embedding_type='alibi'"),
    ("transformer_block_type", "post_ln", "only pre_ln"),
])
def test_unsupported_settings_are_refused(tmp_path, tok, key, value, error):
    ycfg = nemo_config(**{key: value})
    path = write_nemo(tmp_path / "m.nemo", ycfg, nemo_weights(nemo_config(), ROWS), tok)
    with pytest.raises(CheckpointFormatError, match=error):
        model_config_from_checkpoint(path)


def test_swiglu_half_without_partner(mp1, tmp_path, tok):
    ycfg = nemo_config(activation="swiglu")
    sd = nemo_weights(ycfg, ROWS)
    del sd[PREFIX + "encoder.layers.0.mlp.dense_h_to_4h_2.weight"]
    with pytest.raises(CheckpointFormatError, match=r"dense_h_to_4h\.weight has no matching dense_h_to_4h_2"):
        _load(write_nemo(tmp_path / "m.nemo", ycfg, sd, tok))
