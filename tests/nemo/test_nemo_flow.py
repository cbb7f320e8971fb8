"""The flow a NeMo 2 user runs, for real, on CPU: ``llm.finetune(..., peft=TiedLoRA("tl6"))``.

Run with ``.ci/nemo-tests`` (marker ``nemo``). One process per stage (worker: flow_worker.py):

1. a tiny base checkpoint (``llm.train``, one step of the full model);
2. ``llm.finetune`` with TL6 for 4 steps from that base (NeMo adapter checkpoints every 2);
3. the same for 2 steps, then again with ``max_steps=4`` on the same directory: NeMo's
   AutoResume continues from the *final* checkpoint of step 2 (adapters, optimizer state
   and the data sampler's position).

Steps 3-4 of the resumed run must repeat the uninterrupted run's losses and end with the
same adapter, bit for bit (same CPU, same op order). The final adapter is also exported as
a Hugging Face PEFT LoRA, checked against ΔW computed here from the tiedlora file.

4. beside stage 3 (merge_worker.py): the final checkpoint of stage 2 merged into a full NeMo 2
   checkpoint (``tiedlora.integrations.nemo_merge``), restored by NeMo as a plain model and
   compared with the adapted model; bad inputs to the merge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from numerics import Net, assert_close, bound, error, forward_terms

WORKER = Path(__file__).resolve().parent / "flow_worker.py"
STEPS, HALF = 4, 2
STAGE_TIMEOUT = 900  # s; ~1 min each on an idle machine, mostly NeMo's import
EXACT = dict(atol=0.0, rtol=0.0)


def _stage(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                         timeout=STAGE_TIMEOUT)
    if res.returncode != 0:
        raise AssertionError(f"flow_worker.py {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}")
    return json.loads((Path(args[-2] if args[0] == "finetune" else args[-1]) / "result.json").read_text())


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed")
    d = tmp_path_factory.mktemp("flow")
    base = _stage("base", str(d / "base"))
    base_ckpt = [c for c in base["checkpoints"] if c.endswith("-last")]
    assert len(base_ckpt) == 1, base["checkpoints"]
    whole = _stage("finetune", base_ckpt[0], str(d / "whole"), str(STEPS))
    merge = _start_merge(d, base_ckpt[0], whole)  # runs beside the two resumed stages
    try:
        _stage("finetune", base_ckpt[0], str(d / "resumed"), str(HALF))
        resumed = _stage("finetune", base_ckpt[0], str(d / "resumed"), str(STEPS))
    except BaseException:
        merge["proc"].kill()
        raise
    return {"dir": d, "whole": whole, "resumed": resumed, "merge": merge}


def _adapter(path: Path) -> dict:
    from tiedlora.checkpoint import load_adapter

    tensors, _, _ = load_adapter(path)
    return tensors


@pytest.mark.nemo
def test_finetune_trains_every_tl6_factor(flow):
    d = flow["dir"] / "whole"
    start, end = _adapter(d / "adapter_start_0.safetensors"), _adapter(d / f"adapter_end_{STEPS}.safetensors")
    assert set(start) == set(end) and start
    assert set(start) == {"tied.linear_qkv.A", "tied.linear_qkv.B", "layers.0.linear_qkv.u",
                          "layers.0.linear_qkv.v", "layers.1.linear_qkv.u", "layers.1.linear_qkv.v"}
    for key in start:
        assert not torch.equal(start[key], end[key]), f"{key} did not change in {STEPS} steps"
    losses = flow["whole"]["losses"]
    assert sorted(map(int, losses)) == list(range(1, STEPS + 1))


@pytest.mark.nemo
def test_finetune_writes_adapter_only_checkpoints(flow):
    ckpts = flow["whole"]["checkpoints"]
    assert any(c.endswith("-last") for c in ckpts), ckpts
    for c in ckpts:
        weights = Path(c) / "weights"
        assert weights.is_dir(), c
        size = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file())
        assert size < 400_000, f"{c}: {size} bytes; an adapter checkpoint holds the adapters only"


@pytest.mark.nemo
def test_resume_from_final_checkpoint_repeats_the_uninterrupted_losses(flow):
    whole, resumed = flow["whole"]["losses"], flow["resumed"]["losses"]
    assert sorted(map(int, resumed)) == list(range(1, STEPS + 1)), resumed
    for step in map(str, range(1, STEPS + 1)):
        assert resumed[step] == whole[step], f"step {step}: resumed {resumed[step]} vs uninterrupted {whole[step]}"
    d = flow["dir"]
    a = _adapter(d / "whole" / f"adapter_end_{STEPS}.safetensors")
    b = _adapter(d / "resumed" / f"adapter_end_{STEPS}.safetensors")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], **EXACT, msg=lambda m: f"{key}: {m}")


@pytest.mark.nemo
def test_resume_starts_from_the_saved_adapter(flow):
    d = flow["dir"] / "resumed"
    saved, restored = _adapter(d / f"adapter_end_{HALF}.safetensors"), _adapter(d / f"adapter_start_{HALF}.safetensors")
    for key in saved:
        torch.testing.assert_close(restored[key], saved[key], **EXACT, msg=lambda m: f"{key}: {m}")


@pytest.mark.nemo
def test_export_to_hf_peft_equals_tiedlora_delta(flow):
    """PEFT's ΔW of q/k/v (lora_B @ lora_A) equals s · diag(v) B diag(u) A, split per module."""
    from safetensors.torch import load_file

    from tiedlora.checkpoint import load_adapter
    from tiedlora.convert.layout import split_qkv
    from tiedlora.config import ModelConfig

    d = flow["dir"] / "whole"
    tensors, cfg, _ = load_adapter(d / f"adapter_end_{STEPS}.safetensors")
    out = d / f"hf_peft_{STEPS}"
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == cfg.rank == 4
    assert conf["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    state = load_file(str(out / "adapter_model.safetensors"))
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4)
    A, B = tensors["tied.linear_qkv.A"], tensors["tied.linear_qkv.B"]  # (r, hidden), (3·hidden, r)
    for layer in range(2):
        u, v = tensors[f"layers.{layer}.linear_qkv.u"], tensors[f"layers.{layer}.linear_qkv.v"]
        delta = (cfg.alpha / cfg.rank) * v[:, None] * (B @ (u[:, None] * A))
        assert delta.abs().max() > 0
        p = f"base_model.model.model.layers.{layer}.self_attn"
        for m, expected in zip(("q_proj", "k_proj", "v_proj"), split_qkv(delta, model_cfg)):
            got = state[f"{p}.{m}.lora_B.weight"] @ state[f"{p}.{m}.lora_A.weight"]
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=lambda msg: f"{p}.{m}: {msg}")


# ------------------------------------------------------------ merge into a NeMo 2 checkpoint
# merge_worker.py merges the uninterrupted run's final adapter checkpoint with
# tiedlora.integrations.nemo.merge_adapter, restores the result as a plain NeMo model and
# compares it with the adapted model on fixed tokens; it also feeds merge_adapter bad inputs.
MERGE_WORKER = Path(__file__).resolve().parent / "merge_worker.py"
TINY = dict(layers=2, hidden=64, ffn=176, heads=4)  # flow_worker.model()


def _start_merge(d: Path, base: str, whole: dict) -> dict:
    """Start merge_worker.py on the uninterrupted run's final checkpoint (a process; see ``merged``)."""
    adapter = [c for c in whole["checkpoints"] if c.endswith("-last")]
    assert len(adapter) == 1, whole["checkpoints"]
    out = d / "merge"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = open(out / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, str(MERGE_WORKER), adapter[0], base, str(out)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    return {"proc": proc, "log": log, "out": out}


@pytest.fixture(scope="module")
def merged(flow):
    m = flow["merge"]
    try:
        rc = m["proc"].wait(timeout=STAGE_TIMEOUT)
    finally:
        if m["proc"].poll() is None:
            m["proc"].kill()
        m["log"].close()
    if rc != 0:
        raise AssertionError(f"merge_worker.py failed (exit {rc}):\n{(m['out'] / 'worker.log').read_text()[-8000:]}")
    return torch.load(m["out"] / "result.pt", weights_only=False)


@pytest.mark.nemo
def test_merge_reads_the_trained_adapter_from_the_nemo_checkpoint(flow, merged):
    """The TiedLoRA recorded in the checkpoint's context is rebuilt and its tensors loaded, tied ones included."""
    trained = _adapter(flow["dir"] / "whole" / f"adapter_end_{STEPS}.safetensors")
    assert merged["preset"] == "tl6"
    assert set(merged["adapter"]) == set(trained)
    for key, t in trained.items():
        torch.testing.assert_close(merged["adapter"][key], t, **EXACT, msg=lambda m: f"{key}: {m}")


@pytest.mark.nemo
def test_merged_checkpoint_is_the_base_plus_delta_and_nothing_else(flow, merged):
    """qkv weights are base + ΔW (ΔW = s·diag(v) B diag(u) A of the trained adapter file); the rest is the base."""
    from tiedlora.checkpoint import load_adapter

    base, out, deltas = merged["base_weights"], merged["merged_weights"], merged["delta"]
    assert set(out) == set(base) and deltas
    assert not any("adapter" in k for k in out), sorted(out)
    tensors, cfg, _ = load_adapter(flow["dir"] / "whole" / f"adapter_end_{STEPS}.safetensors")
    A, B = tensors["tied.linear_qkv.A"], tensors["tied.linear_qkv.B"]
    for key in base:
        if key not in deltas:
            torch.testing.assert_close(out[key], base[key], **EXACT, msg=lambda m: f"{key}: {m}")
            continue
        layer = int(key.split("layers.")[1].split(".")[0])
        u, v = tensors[f"layers.{layer}.linear_qkv.u"], tensors[f"layers.{layer}.linear_qkv.v"]
        expected = (cfg.alpha / cfg.rank) * v[:, None] * (B @ (u[:, None] * A))
        assert expected.abs().max() > 0
        assert_close(deltas[key], expected, cfg.rank + 3, f"ΔW of {key}")  # r-term sum, 3 products
        torch.testing.assert_close(out[key], base[key] + deltas[key], **EXACT, msg=lambda m: f"{key}: {m}")
    assert sorted(deltas) == [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(2)]


@pytest.mark.nemo
def test_merged_checkpoint_restores_as_a_plain_model_with_the_adapted_logits(merged):
    """NeMo restores OUTPUT as a model without PEFT whose logits are the adapted model's (fp32 rounding)."""
    assert merged["merged_transform"] == "None"
    assert not merged["merged_yaml_has_peft"]
    assert "TiedLoRALinear" not in merged["merged_modules"] and "ColumnParallelLinear" in merged["merged_modules"]
    ref = merged["adapted_logits"]  # (batch, seq, padded vocab)
    terms = forward_terms(Net(**TINY, seq=ref.shape[1], vocab=ref.shape[-1], rank=4))
    assert_close(merged["folded_logits"], ref, terms, "logits of the folded model (before saving)")
    assert_close(merged["merged_logits"], ref, terms, "logits of the merged checkpoint restored by NeMo")
    # teeth: the base alone (a merge that added nothing) is far outside the bound
    assert error(merged["base_logits"], ref) > 10 * bound(ref, terms)


@pytest.mark.nemo
@pytest.mark.parametrize("case,kind,words", [
    ("full_model", "AdapterCheckpointError", "not an adapter checkpoint"),
    ("not_a_checkpoint", "AdapterCheckpointError", "not a NeMo 2 checkpoint"),
    ("nemo_lora", "AdapterCheckpointError", "nemo.collections.llm.peft.lora.LoRA"),
    ("missing_base", "FileNotFoundError", "does not exist; pass the base's new place with --base"),
    ("missing_base_arg", "FileNotFoundError", "no such base checkpoint"),
    ("no_dir", "FileNotFoundError", "no such checkpoint directory"),
])
def test_merge_refuses_bad_input_naming_the_path(merged, case, kind, words):
    got = merged["errors"][case]
    assert got[0] == kind, got
    message, path = got[1], got[-1]
    assert words in message, message
    assert (path in message) or (case == "missing_base_arg" and "no_such_base_either" in message), message
    if case == "nemo_lora":
        assert "merge_lora" in message
