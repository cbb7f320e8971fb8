"""Adapter checkpoint format: round trip, compatibility checks, atomic publication."""

import pytest
import torch

from tiedlora import checkpoint as ck
from tiedlora.peft import FactorConfig, PeftConfig


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"tied.linear_qkv.A": torch.randn(4, 8, generator=g), "layers.0.linear_qkv.v": torch.randn(24, generator=g)}


def test_round_trip(tmp_path):
    cfg = PeftConfig(name="tl6", rank=4, alpha=8.0, target_modules=["linear_qkv", "linear_fc2"])
    ck.save_adapter(tmp_path / "a.safetensors", _tensors(), cfg, {"name": "tiny"}, {"step": 7})
    t, c, meta = ck.load_adapter(tmp_path / "a.safetensors")
    assert c == cfg and meta["step"] == "7"
    for k, v in _tensors().items():
        assert torch.equal(t[k], v)


def test_incompatible_preset_and_rank_are_named(tmp_path):
    saved = PeftConfig(name="tl6", rank=8)
    with pytest.raises(ck.CheckpointError, match="preset 'tl6' and cannot be loaded into preset 'lora'"):
        ck.check_compatible(saved, PeftConfig(name="lora", A=FactorConfig(tied=False), B=FactorConfig(tied=False),
                                              u=FactorConfig(trainable=False), v=FactorConfig(trainable=False)))
    with pytest.raises(ck.CheckpointError, match="rank 8 != 16"):
        ck.check_compatible(saved, PeftConfig(name="tl6", rank=16))


def test_not_an_adapter_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="not a readable safetensors file"):
        ck.load_adapter(tmp_path / "x.safetensors")
    with pytest.raises(ck.CheckpointError, match="no such adapter file"):
        ck.load_adapter(tmp_path / "missing.safetensors")


def test_crash_mid_write_keeps_previous_latest(tmp_path):
    cfg = PeftConfig()

    def good(d):
        ck.save_adapter(d / ck.ADAPTER_FILE, _tensors(), cfg)
        (d / ck.STATE_FILE).write_bytes(b"state")

    ck.commit_checkpoint(tmp_path, 1, good, keep_last=2)

    def crash(d):
        ck.save_adapter(d / ck.ADAPTER_FILE, _tensors(), cfg)
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        ck.commit_checkpoint(tmp_path, 2, crash, keep_last=2)
    assert ck.latest_checkpoint(tmp_path).name == "step_0000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def test_keep_last(tmp_path):
    for step in range(1, 5):
        ck.commit_checkpoint(tmp_path, step, lambda d: (d / ck.ADAPTER_FILE).write_bytes(b"a") or
                             (d / ck.STATE_FILE).write_bytes(b"s"), keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000003", "step_0000004"]
