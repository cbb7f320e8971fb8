"""The embedded mini base: shipped files, their recorded checksums and generator fingerprint,
the default config resolving to them without any cache or training, and the generator
itself (tiny settings) still producing a base that learns."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tiedlora import mini_base
from tiedlora.config import compose, to_object

MAX_ASSET_BYTES = 10 * 1024 * 1024  # the shipped folder stays a few MB
HELD_OUT_SEED = 1  # corpus seed never used for pretraining (it used seed 0)
HELD_OUT_LINES = 64
LOSS_MARGIN = 0.5  # held-out loss of the shipped base vs its recorded final training loss


def _mini_cfg(*overrides):
    return to_object(compose("finetune", ["model=mini", *overrides])).model


def test_shipped_files_match_their_recorded_sha256_and_info():
    info = mini_base.verify()  # raises if a file is missing or its sha256 differs
    total = sum(p.stat().st_size for p in mini_base.ASSETS.iterdir() if p.is_file())
    assert total < MAX_ASSET_BYTES, total
    assert sorted(p.name for p in mini_base.ASSETS.iterdir()) == sorted(
        [mini_base.WEIGHTS, mini_base.TOKENIZER, mini_base.INFO])
    assert info["version"] == mini_base.VERSION
    assert info["arch"] == mini_base._arch(_mini_cfg())  # conf/model/mini.yaml describes it
    assert info["pretrain"] == mini_base.dataclasses.asdict(mini_base.SETTINGS)
    from safetensors import safe_open

    with safe_open(str(mini_base.ASSETS / mini_base.WEIGHTS), framework="pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert json.loads(f.metadata()["model"])["hidden_size"] == info["arch"]["hidden_size"]
    assert numel == info["parameters"]
    assert dtypes == {"F32"}
    assert info["final_loss"] < 0.5 * math.log(mini_base.SETTINGS.vocab_size), info["final_loss"]


def test_a_changed_shipped_file_is_refused_with_its_name(tmp_path):
    d = tmp_path / "mini_base"
    shutil.copytree(mini_base.ASSETS, d)
    data = bytearray((d / mini_base.WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (d / mini_base.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(mini_base.MiniBaseError, match=r"base\.safetensors: sha256"):
        mini_base.shipped(_mini_cfg(), d)
    (d / mini_base.TOKENIZER).unlink()
    shutil.copy(mini_base.ASSETS / mini_base.WEIGHTS, d / mini_base.WEIGHTS)
    with pytest.raises(mini_base.MiniBaseError, match=r"tokenizer\.model: missing"):
        mini_base.shipped(_mini_cfg(), d)


def test_generator_still_produces_the_corpus_the_shipped_base_was_trained_on():
    info = mini_base.check()  # raises MiniBaseError when the fingerprint drifted
    assert info["generator"]["corpus_sha256"] == mini_base.corpus_fingerprint(mini_base.SETTINGS)
    # and the fingerprint does see a change of the corpus
    other = mini_base.PretrainSettings(corpus_seed=mini_base.SETTINGS.corpus_seed + 1)
    assert mini_base.corpus_fingerprint(other) != info["generator"]["corpus_sha256"]


def test_default_config_resolves_to_the_shipped_base_without_touching_the_cache(tmp_path, monkeypatch):
    from tiedlora.build import load_tokenizer, resolve_base

    cache = tmp_path / "cache"
    monkeypatch.setenv("TIEDLORA_CACHE", str(cache))

    def no_build(*a, **k):
        raise AssertionError("the default config must not pretrain a base")

    monkeypatch.setattr(mini_base, "build", no_build)
    cfg = to_object(compose("finetune", [])).model  # what `make demo` composes
    assert cfg.checkpoint == mini_base.BUILTIN
    weights, tok = resolve_base(cfg)
    assert weights == mini_base.ASSETS / mini_base.WEIGHTS
    assert tok == mini_base.ASSETS / mini_base.TOKENIZER
    assert load_tokenizer(tok, cfg).vocab_size == mini_base.SETTINGS.vocab_size
    assert not cache.exists()


def test_another_architecture_under_builtin_mini_is_refused():
    with pytest.raises(mini_base.MiniBaseError, match=r"model\.num_layers=2.*num_layers=4"):
        mini_base.shipped(_mini_cfg("model.num_layers=2"))


def test_shipped_base_predicts_held_out_corpus_text(mp1):
    """Weights, tokenizer and loader agree: unseen corpus text scores near the final training loss."""
    from tiedlora.data.mini_tasks import pretraining_corpus
    from tiedlora.build import load_tokenizer
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.convert.base_file import load_base

    cfg = _mini_cfg()
    weights, tok_path = mini_base.shipped(cfg)
    tok = load_tokenizer(tok_path, cfg)
    model = build_gpt_model(cfg)
    load_base([model], weights, cfg)
    model.eval()
    ids = []
    for line in pretraining_corpus(HELD_OUT_LINES, HELD_OUT_SEED):
        ids.extend(tok.encode(line) + [tok.eos_id])
    seq = mini_base.SETTINGS.seq_length
    n = (len(ids) - 1) // seq
    t = torch.tensor(ids[: n * seq + 1])
    x = torch.stack([t[i * seq:(i + 1) * seq] for i in range(n)])
    y = torch.stack([t[i * seq + 1:(i + 1) * seq + 1] for i in range(n)])
    pos = torch.arange(seq).unsqueeze(0).expand(n, -1)
    with torch.no_grad():
        loss = model(x, pos, None, labels=y).mean().item()
    assert loss < mini_base.read_info()["final_loss"] + LOSS_MARGIN, loss


def test_generator_with_tiny_settings_builds_a_base_that_learns(tiny_base):
    """The builder (tests/helpers.py TINY_PRETRAIN: 120 steps) writes verifiable files and learns."""
    from pathlib import Path

    d = Path(tiny_base["base"]).parent
    info = mini_base.check(d)  # files match their sha256; the corpus fingerprint is recorded
    assert info["pretrain"]["steps"] == 120
    assert info["final_loss"] < 0.65 * math.log(info["pretrain"]["vocab_size"]), info["final_loss"]
    assert sorted(p.name for p in d.iterdir()) == sorted([mini_base.WEIGHTS, mini_base.TOKENIZER, mini_base.INFO])
