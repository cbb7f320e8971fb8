"""NeMo 2 integration: ``TiedLoRA`` (a NeMo PEFT transform) vs tiedlora's ``apply_peft``.

Run with ``.ci/nemo-tests`` (or ``.venv-nemo/bin/python -m pytest -q -m nemo tests/nemo``).
Tests marked ``nemo`` are excluded from the default run and skip where NeMo is missing;
the one unmarked test checks, in any environment, that tiedlora works without NeMo.

Two torchrun launches (gloo, CPU; worker: nemo_worker.py): TP=1, then TP=2 with and without
sequence parallel, which also loads the NeMo checkpoints the TP=1 run wrote. Both paths
run the same adapter modules on the same seeded factors, so outputs, gradients and
round-tripped tensors must be *identical* (tolerance 0), not merely close.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ALL_TARGETS, ROOT, preset, targets_override, tiny_model_cfg

WORKER = Path(__file__).resolve().parent / "nemo_worker.py"
DOC = ROOT / "docs" / "nemo.md"
PRESETS = ["lora", "vera", "tl6"]
EXACT = dict(atol=0.0, rtol=0.0)  # same modules, same factors, same op order
LOSS_ATOL_TP, GRAD_ATOL_TP, GRAD_RTOL_TP = 1e-5, 2e-6, 1e-4  # TP=2 vs TP=1 (as test_tensor_parallel)
WORKER_TIMEOUT = 900  # s; a TP=2 launch takes ~2 min on 2 cores, mostly NeMo's import
RUNS = [(1, 0), (2, 0), (2, 1)]  # (tp, sequence parallel)


def _need_nemo():
    pytest.importorskip("nemo.lightning.pytorch.callbacks.peft", reason="NeMo 2 is not installed")


def _torchrun(nproc: int, out: Path, *args: str) -> dict:
    from tiedlora.dist import _free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(WORKER), str(out), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    if res.returncode != 0:
        raise AssertionError(f"nemo_worker.py (nproc={nproc}) failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _need_nemo()
    d = tmp_path_factory.mktemp("nemo")
    tp1 = _torchrun(1, d / "tp1.pt", str(d / "ckpt_tp1"))
    tp2 = _torchrun(2, d / "tp2.pt", str(d / "ckpt_tp2"), str(d / "ckpt_tp1"))
    return {1: tp1, 2: tp2}


def _cfg(name: str):
    return preset(name, target_modules=targets_override(ALL_TARGETS), alpha=16)


def _tied(name: str) -> list:
    cfg = _cfg(name)
    return [f"{t}_{f}" for t in ALL_TARGETS for f in "AB" if getattr(cfg, f).tied]


# ------------------------------------------------------------------ numerics
@pytest.mark.nemo
@pytest.mark.dist
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tp,sp", RUNS)
def test_same_outputs_and_adapter_gradients(runs, tp, sp, name):
    r = runs[tp][f"{name}/sp{sp}"]
    ours, nemo = r["ours"], r["nemo"]
    torch.testing.assert_close(nemo["logits"], ours["logits"], **EXACT)
    torch.testing.assert_close(nemo["loss"], ours["loss"], **EXACT)
    assert set(nemo["grads"]) == set(ours["grads"]) and ours["grads"]
    for key, g in ours["grads"].items():
        assert g.abs().sum() > 0, f"{key}: zero gradient (test has no teeth)"
        torch.testing.assert_close(nemo["grads"][key], g, **EXACT,
                                   msg=lambda m: f"{name} tp={tp} sp={sp} {key}: {m}")


@pytest.mark.nemo
@pytest.mark.dist
@pytest.mark.parametrize("name", PRESETS)
def test_nemo_path_at_tp2_gives_the_tp1_loss(runs, name):
    """The launches themselves are sound: TP=2 (+SP) through NeMo reproduces TP=1."""
    ref = runs[1][f"{name}/sp0"]["nemo"]
    for sp in (0, 1):
        got = runs[2][f"{name}/sp{sp}"]["nemo"]
        torch.testing.assert_close(got["loss"], ref["loss"], atol=LOSS_ATOL_TP, rtol=0)
        for key, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][key], g, atol=GRAD_ATOL_TP, rtol=GRAD_RTOL_TP)


# ------------------------------------------------------------- one owner each
@pytest.mark.nemo
@pytest.mark.dist
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tp", [1, 2])
def test_tied_factors_have_one_owner(runs, tp, name):
    r = runs[tp][f"{name}/sp0"]
    cfg, tied = _cfg(name), _tied(name)
    trainable = r["trainable"]
    assert len(trainable) == len(set(trainable))
    for key in tied:
        target, factor = key.rsplit("_", 1)
        owner_key = f"tied_adapters.{key}"
        # NeMo's adapter state (what WrappedAdapterIO saves): the owner's key, once, even when frozen
        assert r["nemo_state_keys"].count(owner_key) == 1, owner_key
        assert [k for k in r["nemo_sharded_keys"] if k.endswith(key)] == [owner_key]
        assert not any(k.endswith(f"{target}.adapter.{factor}") for k in r["nemo_state_keys"])
        assert trainable.count(owner_key) == int(getattr(cfg, factor).trainable)
        # every wrapped layer references the same storage
        assert len({ptr for k, ptr in r["tied_refs"] if k == f"{target}.{factor}"}) == 1
    # the optimizer holds exactly the trainable tensors, tied ones once
    assert r["optimizer_names"] == sorted(trainable)
    if tp == 1:
        model = tiny_model_cfg()
        shapes = {t: model.target_shape(t) for t in ALL_TARGETS}
        assert r["optimizer_numel"] == cfg.trainable_count(shapes, model.num_layers)


# -------------------------------------------------------------- checkpoints
@pytest.mark.nemo
@pytest.mark.dist
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tp,route", [(1, "nemo_to_ours"), (1, "ours_to_nemo"), (2, "nemo_to_ours"),
                                      (2, "ours_to_nemo"), (2, "cross_tp")])
def test_checkpoint_round_trip(runs, tp, route, name):
    """NeMo's PEFT checkpoint (WrappedAdapterIO, dist-ckpt) <-> tiedlora's safetensors file.

    nemo_to_ours: saved through NeMo, reloaded through NeMo, exported with save_adapter,
    loaded into apply_peft's model. ours_to_nemo: the reverse. cross_tp: a NeMo checkpoint
    written at TP=1 loaded through NeMo at TP=2 (resharding, SwiGLU fc1 included).
    """
    r = runs[tp][f"ckpt/{name}"]
    expected, got = r["expected"], r[route]
    assert set(got) == set(expected)
    assert any(k.startswith("tied.") for k in expected) == bool(_tied(name))
    for key, t in expected.items():
        torch.testing.assert_close(got[key], t, **EXACT, msg=lambda m: f"{name} {route} {key}: {m}")


# ------------------------------------------------------------ in-process API
@pytest.mark.nemo
def test_presets_and_explicit_flags_resolve_like_our_config():
    _need_nemo()
    from tiedlora.integrations.nemo import TiedLoRA

    for name in ["lora", "vera", "tl1", "tl6"]:
        assert TiedLoRA(name, rank=4, dropout=0.1).peft_config == preset(name, rank=4, dropout=0.1)
    explicit = TiedLoRA(preset=None, rank=16, alpha=32, target_modules=["linear_qkv", "linear_fc1"],
                        A={"trainable": False, "tied": True}, u={"trainable": False}).peft_config
    assert (explicit.rank, explicit.alpha, explicit.target_modules) == (16, 32, ["linear_qkv", "linear_fc1"])
    assert (explicit.A.trainable, explicit.A.tied, explicit.u.trainable, explicit.B.trainable) == (
        False, True, False, True)
    with pytest.raises(ValueError, match="preset='tl9'.*'tl6'"):
        TiedLoRA("tl9")
    with pytest.raises(ValueError, match=r"peft.rank=0"):
        TiedLoRA("tl6", rank=0)
    with pytest.raises(ValueError, match="unknown target 'linear_q'"):
        TiedLoRA("tl6", target_modules=["linear_q"])


@pytest.mark.nemo
def test_nemo_lightning_model_in_megatron_parallel(mp1):
    """NeMo's own containers: llm.GPTModel inside MegatronParallel, fitting and validating."""
    _need_nemo()
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.base import local_layer_spec
    from nemo.lightning.megatron_parallel import MegatronParallel

    from tiedlora.integrations.nemo import TiedLoRA, TiedLoRALinear

    for fn, trains in [(TrainerFn.FITTING, True), (TrainerFn.VALIDATING, False)]:
        config = llm.GPTConfig(
            num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, seq_length=32,
            vocab_size=256, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
            add_bias_linear=False, share_embeddings_and_output_weights=False,
            use_cpu_initialization=True, transformer_layer_spec=local_layer_spec,
            bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)
        model = llm.GPTModel(config)
        model.configure_model()
        parallel = MegatronParallel(model, cpu=True)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        trainer.state.fn = fn
        model.trainer = trainer
        peft = TiedLoRA("tl6", rank=4)
        assert peft(parallel) is parallel
        assert isinstance(model.module.decoder.layers[0].self_attention.linear_qkv, TiedLoRALinear)
        trainable = sorted(n for n, p in parallel.named_parameters() if p.requires_grad)
        if not trains:
            assert trainable == []
            continue
        assert trainable == sorted(
            ["0.module.tied_adapters.linear_qkv_A", "0.module.tied_adapters.linear_qkv_B"]
            + [f"0.module.decoder.layers.{i}.self_attention.linear_qkv.adapter.{f}"
               for i in range(2) for f in "uv"])
        keys = [k for k in parallel.sharded_state_dict(metadata={}) if peft.adapter_key_filter(k)]
        assert sorted(keys) == sorted(n[2:] for n in trainable)  # NeMo's keys drop the chunk index
        assert sorted(peft.adapter_state_dict(parallel)) == [
            "layers.0.linear_qkv.u", "layers.0.linear_qkv.v", "layers.1.linear_qkv.u",
            "layers.1.linear_qkv.v", "tied.linear_qkv.A", "tied.linear_qkv.B"]


@pytest.mark.nemo
def test_refuses_a_second_application_and_a_bare_transform(mp1):
    _need_nemo()
    from tiedlora.integrations.nemo import TiedLoRA
    from tiedlora.models.gpt import build_gpt_model

    model = TiedLoRA("tl6")(build_gpt_model(tiny_model_cfg()))
    with pytest.raises(ValueError, match="already has tiedlora adapters"):
        TiedLoRA("tl6")(model)
    with pytest.raises(RuntimeError, match="called by TiedLoRA.__call__"):
        TiedLoRA("tl6").transform(model.decoder.layers[0].self_attention.linear_proj)


@pytest.mark.nemo
def test_load_adapter_refuses_another_preset(mp1, tmp_path):
    _need_nemo()
    from tiedlora.checkpoint import CheckpointError
    from tiedlora.integrations.nemo import TiedLoRA
    from tiedlora.models.gpt import build_gpt_model

    lora = TiedLoRA("lora")
    path = lora.save_adapter(lora(build_gpt_model(tiny_model_cfg())), tmp_path / "lora.safetensors")
    tl6 = TiedLoRA("tl6")
    with pytest.raises(CheckpointError, match="saved with preset 'lora'"):
        tl6.load_adapter(tl6(build_gpt_model(tiny_model_cfg())), path)


# ----------------------------------------------------------------- the docs
def _doc_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    scripts = [b for b in blocks if "llm.finetune(" in b]
    assert len(scripts) == 1, "docs/nemo.md should hold one complete llm.finetune script"
    return scripts[0]


@pytest.mark.nemo
@pytest.mark.parametrize("model_name,model_yaml", [("gpt2b_001", "gpt2b_001"), ("llama2_7b", "llama2_7b")])
def test_docs_example_builds_the_paper_models(mp1, model_name, model_yaml):
    """The docs script's configs describe conf/model/<name>.yaml, and TiedLoRA adapts them.

    Built on the meta device (no weights); trainable parameters must match the formula.
    """
    _need_nemo()
    from omegaconf import OmegaConf

    from tiedlora.config import CONF_DIR
    from tiedlora.integrations.nemo import TiedLoRA, TiedLoRALinear
    from tiedlora.config import ModelConfig

    ns = {"__name__": "docs_nemo_example"}
    exec(compile(_doc_code(), str(DOC), "exec"), ns)
    model_cls, make_config = ns["MODELS"][model_name]
    peft = ns["make_peft"]()
    assert isinstance(peft, TiedLoRA) and peft.peft_config == preset("tl6")
    ours = OmegaConf.to_object(OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{model_yaml}.yaml")))

    # CPU: no transformer-engine, so no fused RoPE (LLaMA's config enables it by default)
    config = make_config(apply_rope_fusion=False)
    assert config.transformer_layer_spec.__name__ == "local_layer_spec"
    facts = {"num_layers": ours.num_layers, "hidden_size": ours.hidden_size,
             "ffn_hidden_size": ours.ffn_hidden_size, "num_attention_heads": ours.num_attention_heads,
             "rotary_percent": ours.rotary_percent, "normalization": ours.normalization,
             "layernorm_zero_centered_gamma": ours.layernorm_zero_centered_gamma,
             "add_bias_linear": ours.add_bias_linear,
             "share_embeddings_and_output_weights": not ours.untie_embeddings_and_output_weights,
             "gated_linear_unit": ours.activation == "swiglu"}
    assert {k: getattr(config, k) for k in facts} == facts
    config.vocab_size = ours.padded_vocab_size()  # comes from the checkpoint's tokenizer in a real run
    config.init_model_with_meta_device = True
    config.perform_initialization = False
    config.use_cpu_initialization = True
    config.layernorm_zero_centered_gamma = False  # torch's fallback norm (no apex on CPU) refuses it
    mcore = config.configure_model(tokenizer=None)
    peft(mcore)
    layers = mcore.decoder.layers
    assert all(isinstance(layer.self_attention.linear_qkv, TiedLoRALinear) for layer in layers)
    trainable = sum(p.numel() for p in mcore.parameters() if p.requires_grad)
    shapes = {"linear_qkv": ours.target_shape("linear_qkv")}
    assert trainable == peft.peft_config.trainable_count(shapes, ours.num_layers)


# ------------------------------------------------------------ without NeMo
def test_package_works_without_nemo_and_the_integration_says_how_to_install():
    """Runs in any environment: NeMo is made unimportable in a subprocess."""
    code = (
        "import sys\n"
        "sys.modules['nemo'] = None  # as if nemo_toolkit were not installed\n"
        "import tiedlora, tiedlora.peft, tiedlora.checkpoint, tiedlora.config, tiedlora.models.gpt\n"
        "import tiedlora.integrations\n"
        "try:\n"
        "    import tiedlora.integrations.nemo\n"
        "except ImportError as e:\n"
        "    print('MSG', e)\n"
        "else:\n"
        "    print('IMPORTED')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORTED" not in res.stdout
    msg = res.stdout.split("MSG", 1)[1]
    assert "needs NeMo 2" in msg and "requirements-nemo.txt" in msg and "docs/nemo.md" in msg
