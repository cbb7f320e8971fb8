"""TiedLoRA on NeMo's own LLaMA-3.1 and Qwen2 configs, on CPU (worker: families_worker.py).

Run with ``.ci/nemo-tests`` (marker ``nemo``). Three processes:

* ``compare``: the model NeMo's ``Llama31Config`` / ``Qwen2Config`` build (NeMo's own llama3
  RoPE scaling, q/k/v biases, tied embeddings; local layer spec) with ``TiedLoRA("tl6")`` on all
  four targets, against tiedlora's own model of that architecture with the same weights and
  adapter values: logits, loss and every adapter gradient within the fp32 bound (the two use
  different attention cores and norms, so not bit for bit). Teeth: NeMo's logits with its
  RoPE scaling undone are far outside the bound.
* ``finetune`` per family: ``llm.finetune(model=LlamaModel|Qwen2Model(config), peft=TiedLoRA("tl6"))``
  trains every TL6 factor, with finite losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from numerics import Net, assert_close, bound, error, forward_terms, gradient_terms

WORKER = Path(__file__).resolve().parent / "families_worker.py"
TIMEOUT = 900  # s; ~1 min each on an idle machine, mostly NeMo's import
FAMILIES = ("llama31", "qwen2")
NET = dict(layers=2, hidden=64, ffn=176, heads=4, rank=8)
TOKENS = 2 * 24


def _worker(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    if res.returncode != 0:
        raise AssertionError(f"families_worker.py {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed")
    d = tmp_path_factory.mktemp("families")
    _worker("compare", str(d))
    return torch.load(d / "compare.pt", weights_only=False)


@pytest.mark.nemo
@pytest.mark.parametrize("family", FAMILIES)
def test_nemo_config_with_tiedlora_equals_our_model(compared, family):
    r = compared[family]
    ours, nemo = r["ours"], r["nemo"]
    net = Net(**NET, seq=24, vocab=ours["logits"].shape[-1])
    assert_close(nemo["logits"], ours["logits"], forward_terms(net), f"{family} logits")
    assert_close(nemo["loss"], ours["loss"], forward_terms(net) + net.vocab + TOKENS, f"{family} loss")
    assert set(nemo["grads"]) == set(ours["grads"]) and ours["grads"]
    assert {k.split(".")[0] for k in ours["grads"]} == {"tied", "layers"}
    for key, g in ours["grads"].items():
        assert g.abs().max() > 0, key
        assert_close(nemo["grads"][key], g, gradient_terms(net, TOKENS), f"{family} grad {key}")
    if family == "qwen2":  # the biases are there, under TiedLoRA's wrapper
        assert len(r["qkv_bias"]) == 2, r["qkv_bias"]
    else:  # teeth: without NeMo's RoPE scaling the logits are far from ours
        ref = ours["logits"]
        assert error(r["unscaled_nemo_logits"], ref) > 100 * bound(ref, forward_terms(net))


@pytest.mark.nemo
@pytest.mark.parametrize("family", FAMILIES)
def test_llm_finetune_trains_every_tl6_factor(tmp_path, family):
    pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed")
    from tiedlora.checkpoint import load_adapter

    _worker("finetune", family, str(tmp_path))
    steps = 3
    losses = json.loads((tmp_path / "result.json").read_text())["losses"]
    assert sorted(map(int, losses)) == list(range(1, steps + 1)) and all(map(torch.isfinite, map(torch.tensor, losses.values())))
    start, _, _ = load_adapter(tmp_path / "adapter_start_0.safetensors")
    end, cfg, _ = load_adapter(tmp_path / f"adapter_end_{steps}.safetensors")
    assert cfg.name == "tl6" and set(start) == set(end)
    assert set(start) == {"tied.linear_qkv.A", "tied.linear_qkv.B", "layers.0.linear_qkv.u", "layers.0.linear_qkv.v",
                          "layers.1.linear_qkv.u", "layers.1.linear_qkv.v"}
    for key in start:
        assert not torch.equal(start[key], end[key]), f"{key} did not change in {steps} steps"
