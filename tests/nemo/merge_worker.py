"""Worker: merge a NeMo 2 TiedLoRA adapter checkpoint and compare the merged model with the adapted one.

    python tests/nemo/merge_worker.py ADAPTER_CKPT BASE_CKPT OUT_DIR

In one process (CPU, TP=1):

1. the adapted model (base + the checkpoint's TiedLoRA + its adapter) computes logits on fixed
   tokens; its ΔW per adapted layer is recorded;
2. ``merge_adapter`` writes ``OUT_DIR/merged`` (a full NeMo 2 checkpoint);
3. the merged checkpoint is restored by NeMo as a plain model (context without
   ``model_transform``, weights through ``RestoreConfig``), and computes logits on the same tokens;
4. bad inputs are given to ``merge_adapter``: the messages are recorded.

Writes ``OUT_DIR/result.pt``: the adapter tensors loaded (by tiedlora name), the logits of the
base, adapted, folded (in memory) and merged-and-restored models, ΔW of each adapted layer, every
tensor of the base and of the merged model, what the merged context records, the messages.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

SEED = 1234
BATCH, SEQ = 2, 16


def tokens(vocab: int):
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None].expand(BATCH, 1, SEQ, SEQ)
    return ids, pos, mask


@torch.no_grad()
def logits(trainer) -> torch.Tensor:
    from tiedlora.integrations.nemo import mcore_chunks

    chunk = mcore_chunks(trainer.model)[0]
    chunk.eval()
    return chunk(*tokens(chunk.vocab_size)).float()


def weights(trainer) -> dict:
    from tiedlora.integrations.nemo import mcore_chunks

    chunk = mcore_chunks(trainer.model)[0]
    return {k: v.detach().clone() for k, v in chunk.state_dict().items()
            if torch.is_tensor(v) and "_extra_state" not in k}


def messages(adapter: Path, base: Path, out: Path) -> dict:
    """merge_adapter's error on each bad input (type name and message)."""
    from tiedlora.integrations.nemo_merge import merge_adapter

    lora = out / "lora_ckpt"  # the adapter checkpoint with NeMo's LoRA recorded as its transform
    shutil.copytree(adapter, lora)
    io_json = lora / "context" / "io.json"
    ctx = json.loads(io_json.read_text())
    for obj in ctx["objects"].values():  # fiddle's JSON: the transform's class and its arguments
        for item in obj.get("items", []):
            if isinstance(item[1], dict) and item[1].get("type") == "pyref" and item[1]["name"] == "TiedLoRA":
                item[1].update(module="nemo.collections.llm.peft.lora", name="LoRA")
        if "<root>.model.model_transform" in obj.get("paths", []):
            obj["items"] = []  # LoRA() with its defaults
    io_json.write_text(json.dumps(ctx))
    moved = out / "moved_base_ckpt"  # the adapter checkpoint whose base is gone
    shutil.copytree(adapter, moved)
    (moved / "weights" / "adapter_metadata.json").write_text('{"model_ckpt_path": "%s"}' % (out / "no_such_base"))
    cases = {"full_model": (base, None), "not_a_checkpoint": (out / "merged" / "weights", None),
             "nemo_lora": (lora, None), "missing_base": (moved, None),
             "missing_base_arg": (adapter, out / "no_such_base_either"), "no_dir": (out / "nothing_here", None)}
    found = {}
    for name, (path, base_arg) in cases.items():
        try:
            merge_adapter(path, out / f"never_{name}", base=base_arg)
            found[name] = ("no error", str(path))
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            found[name] = (type(e).__name__, str(e), str(path))
    return found


def main(adapter: str, base: str, out: str) -> None:
    from nemo.lightning import io

    from tiedlora.integrations.nemo import TiedLoRALinear, mcore_chunks
    from tiedlora.integrations.nemo_merge import fold_adapters_, load_adapted_model, merge_adapter, restore_model
    from tiedlora.merge import adapter_delta

    adapter, base, out = Path(adapter), Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}

    trainer, peft = load_adapted_model(adapter)
    result["adapted_logits"] = logits(trainer)
    chunk = mcore_chunks(trainer.model)[0]
    result["delta"] = {f"{n}.weight": adapter_delta(m.adapter) for n, m in chunk.named_modules()
                       if isinstance(m, TiedLoRALinear)}
    result["preset"] = peft.peft_config.name
    result["adapter"] = peft.adapter_state_dict(trainer.model)  # what was loaded, by tiedlora name
    fold_adapters_(trainer.model)
    result["folded_logits"] = logits(trainer)  # the merged model before it is written

    merged = merge_adapter(adapter, out / "merged")
    plain = io.load_context(merged / "context", subpath="model")
    result["merged_transform"] = repr(plain.model_transform)
    result["merged_yaml_has_peft"] = "TiedLoRA" in (merged / "context" / "model.yaml").read_text()
    trainer_m = restore_model(plain, merged)
    result["merged_logits"] = logits(trainer_m)
    result["merged_weights"] = weights(trainer_m)
    result["merged_modules"] = sorted({type(m).__name__ for m in mcore_chunks(trainer_m.model)[0].modules()})

    base_model = io.load_context(base / "context", subpath="model")
    trainer_b = restore_model(base_model, base)
    result["base_weights"] = weights(trainer_b)
    result["base_logits"] = logits(trainer_b)
    result["errors"] = messages(adapter, base, out)
    torch.save(result, out / "result.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
