"""Worker: TiedLoRA on NeMo's own LLaMA-3.1 and Qwen2 model configs (CPU, one process, gloo).

    python tests/nemo/families_worker.py compare OUT_DIR             both families, TP=1
    python tests/nemo/families_worker.py finetune FAMILY OUT_DIR     llm.finetune, TL6, a few steps

``compare``: NeMo's ``Llama31Config`` (its own llama3 RoPE scaling in ``configure_model``)
and ``Qwen2Config`` (q/k/v biases), tiny, with NeMo's local layer spec; the model NeMo builds,
transformed by ``TiedLoRA("tl6")``, against tiedlora's own model of the same architecture
(``model.rope_scaling: llama3`` / ``model.add_qkv_bias``) with the same base weights and
adapter values. Writes ``OUT_DIR/compare.pt``: logits, loss and adapter gradients of both
paths per family, plus NeMo's logits with its RoPE scaling undone (the test's teeth).

``finetune``: ``llm.finetune(model=LlamaModel|Qwen2Model(config), peft=TiedLoRA("tl6"))``
from a randomly initialised base, with the adapter written before the first and after the
last step (``adapter_{start,end}_<step>.safetensors``) and the losses in ``result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ALL_TARGETS, perturb, preset, targets_override  # noqa: E402

from tiedlora.integrations.nemo import TiedLoRA  # noqa: E402  (installs the CPU and NeMo fixes)

FAMILIES = ("llama31", "qwen2")
SEED, PERTURB_SEED = 5, 17
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
            vocab_size=512, seq_length=32, make_vocab_size_divisible_by=128)
# RoPE scaling of LLaMA-3.1 with an original context (16) shorter than the test's 24 tokens
SCALING = dict(scale_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=16)
STEPS = 3


def nemo_config(family: str):
    """NeMo's own config class of the family, tiny, on NeMo's local (no transformer-engine) layer spec."""
    from nemo.collections.llm.gpt.model.base import local_layer_spec
    from nemo.collections.llm.gpt.model.llama import Llama31Config
    from nemo.collections.llm.gpt.model.qwen2 import Qwen2Config

    cpu = dict(transformer_layer_spec=local_layer_spec, use_cpu_initialization=True, persist_layer_norm=False,
               gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
               masked_softmax_fusion=False, apply_rope_fusion=False, cross_entropy_loss_fusion=False)
    if family == "llama31":
        return Llama31Config(**TINY, **cpu, **SCALING, rotary_base=500_000)
    return Qwen2Config(**TINY, **cpu, share_embeddings_and_output_weights=True)  # Qwen2.5-0.5B-style: tied


def ours_config(family: str):
    """The same architecture as tiedlora's ModelConfig (what the HF converter gives for such a checkpoint)."""
    from tiedlora.config import ModelConfig

    common = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                  vocab_size=512, seq_length=32, normalization="RMSNorm", activation="swiglu")
    if family == "llama31":
        return ModelConfig(name="llama31", **common, layernorm_epsilon=1e-5, rotary_base=500_000,
                           rope_scaling="llama3", rope_scaling_factor=8.0, rope_scaling_low_freq_factor=1.0,
                           rope_scaling_high_freq_factor=4.0, rope_scaling_original_max_positions=16)
    return ModelConfig(name="qwen2", **common, layernorm_epsilon=1e-6, rotary_base=1_000_000, add_qkv_bias=True,
                       untie_embeddings_and_output_weights=False)


def peft_cfg():
    return preset("tl6", target_modules=targets_override(ALL_TARGETS), alpha=16)


def _step(model, grads_of):
    ids = torch.randint(0, 512, (2, 25), generator=torch.Generator().manual_seed(3))
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool), 1)  # True: masked
    with torch.no_grad():
        logits = model(tokens, pos, mask).detach().clone()
    loss = model(tokens, pos, mask, labels=labels).float().mean()
    loss.backward()
    from tiedlora.peft import finalize_adapter_grads

    finalize_adapter_grads(model)
    return {"logits": logits, "loss": loss.detach().clone(), "grads": grads_of(model)}


def compare(out: Path) -> None:
    from tiedlora.config import ParallelConfig
    from tiedlora.dist import init_distributed, set_seed, shutdown
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import adapter_state_dict, apply_peft

    init_distributed(ParallelConfig(), seed=SEED)
    results = {}
    for family in FAMILIES:
        set_seed(SEED)
        nemo = nemo_config(family).configure_model(tokenizer=None)
        with torch.no_grad():  # biases start at zero: give them values, or dropping them would go unseen
            for name, p in nemo.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        ours = build_gpt_model(ours_config(family))
        missing, unexpected = ours.load_state_dict(nemo.state_dict(), strict=False)
        assert not [k for k in missing + unexpected if not k.endswith("_extra_state")], (missing, unexpected)
        unscaled = None
        if family == "llama31":  # NeMo's model with its RoPE scaling undone: how far off a missed scaling lands
            from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

            plain = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=500_000,
                                    use_cpu_initialization=True).inv_freq
        peft = TiedLoRA("tl6", target_modules=ALL_TARGETS, alpha=16)
        nemo = peft(nemo)
        apply_peft(ours, peft_cfg())
        perturb(nemo, seed=PERTURB_SEED)
        perturb(ours, seed=PERTURB_SEED)
        a = _step(ours, lambda m: adapter_state_dict(m, grads=True))
        b = _step(nemo, lambda m: peft.adapter_state_dict(m, grads=True))
        if family == "llama31":
            scaled = nemo.rotary_pos_emb.inv_freq
            nemo.rotary_pos_emb.inv_freq = plain
            nemo.rotary_pos_emb.forward.cache_clear()
            with torch.no_grad():
                ids = torch.randint(0, 512, (2, 25), generator=torch.Generator().manual_seed(3))[:, :-1]
                pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
                mask = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
                unscaled = nemo(ids, pos, mask).detach().clone()
            nemo.rotary_pos_emb.inv_freq = scaled
        results[family] = {"ours": a, "nemo": b, "unscaled_nemo_logits": unscaled,
                           "qkv_bias": [n for n, _ in nemo.named_parameters() if n.endswith("linear_qkv.bias")
                                        or n.endswith("linear_qkv.to_wrap.bias")]}
    torch.save(results, out / "compare.pt")
    shutdown()


def finetune(family: str, out: Path) -> None:
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import LlamaModel
    from nemo.collections.llm.gpt.model.qwen2 import Qwen2Model

    import flow_worker as fw

    peft = TiedLoRA("tl6", rank=4, alpha=8)
    t, losses = fw.trainer(STEPS, [fw.AdapterFiles(peft, out)])
    cls = LlamaModel if family == "llama31" else Qwen2Model
    model = cls(nemo_config(family), tokenizer=fw.tokenizer())
    llm.finetune(model=model, data=fw.data(), trainer=t, optim=fw.optim(), peft=peft,
                 log=fw.logger(out, family, every=STEPS))
    (out / "result.json").write_text(json.dumps({"losses": losses.losses}))


if __name__ == "__main__":
    from tiedlora.integrations import nemo_compat

    nemo_compat.install()  # once, first: the CPU redirections and NeMo's fixes (TiedLoRA(...) would do it too)
    mode = sys.argv[1]
    if mode == "compare":
        compare(Path(sys.argv[2]))
    elif mode == "finetune":
        finetune(sys.argv[2], Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
