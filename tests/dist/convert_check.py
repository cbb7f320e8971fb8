"""Worker: converters and merge at TP=2 and PP=2 (2 processes, gloo on CPU).

argv: <out.pt> <manifest.json>. The manifest (written by tests/test_convert_tp2.py) names
base checkpoints (``logits``: name -> path), merge jobs (``merges``: name -> {adapter,
checkpoint, out_tp2, out_pp2}) and the token ids. Rank 0 saves::

    logits/<name>          full-vocabulary logits of the converted base at TP=2
    adapted/<job>          logits of base + adapter at TP=2 (unmerged)
    generate/<job>         greedy tokens of base + adapter at TP=2, the manifest's ``prompts``
                           (mixed lengths) decoded in one left-padded batch
    generate_sp/<job>      the same at TP=2 with sequence parallelism
    merged_inplace/<job>   logits after merge_adapters_ at TP=2
    pp2_full/<name>        every canonical base tensor gathered from a PP=2 load
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_fixtures import megatron_logits  # noqa: E402

from tiedlora.checkpoint import load_adapter  # noqa: E402
from tiedlora.convert import load_base_checkpoint, model_config_from_checkpoint  # noqa: E402
from tiedlora.convert.layout import gather_full  # noqa: E402
from tiedlora.dist import init_distributed, shutdown  # noqa: E402
from tiedlora.generate import greedy_generate  # noqa: E402
from tiedlora.merge import merge_adapters_, merge_checkpoint  # noqa: E402
from tiedlora.config import ParallelConfig  # noqa: E402
from tiedlora.models.gpt import build_gpt_model, build_model_chunks  # noqa: E402
from tiedlora.peft import apply_peft, load_adapter_state_dict  # noqa: E402


def adapted(job: dict, parallel: ParallelConfig):
    """(model config, base + the job's adapter) under ``parallel``."""
    cfg = model_config_from_checkpoint(job["checkpoint"])
    tensors, peft_cfg, _ = load_adapter(Path(job["adapter"]))
    model = build_gpt_model(cfg, parallel)
    load_base_checkpoint([model], cfg, parallel)
    apply_peft(model, peft_cfg)
    load_adapter_state_dict(model, tensors)
    return cfg, model


def generate(model, cfg, spec: dict):
    """The manifest's mixed-length prompts decoded as one left-padded batch."""
    return greedy_generate(model, spec["prompts"], spec["new_tokens"], eos_id=-1, vocab_size=cfg.vocab_size,
                           batch_size=len(spec["prompts"]))


def main(out: str, manifest: str) -> None:
    spec = json.loads(Path(manifest).read_text())
    ids = torch.tensor(spec["ids"])
    results = {}

    tp2 = ParallelConfig(tp=2)
    init_distributed(tp2, seed=3)
    for name, path in spec["logits"].items():
        cfg = model_config_from_checkpoint(path)
        model = build_gpt_model(cfg, tp2)
        load_base_checkpoint([model], cfg, tp2)
        results[f"logits/{name}"] = megatron_logits(model, ids, cfg.vocab_size)
    for job, m in spec["merges"].items():
        cfg, model = adapted(m, tp2)
        results[f"adapted/{job}"] = megatron_logits(model, ids, cfg.vocab_size)
        results[f"generate/{job}"] = generate(model, cfg, spec)
        merge_adapters_(model)
        results[f"merged_inplace/{job}"] = megatron_logits(model, ids, cfg.vocab_size)
        merge_checkpoint(m["adapter"], cfg, m["out_tp2"], tp2)

    tp2_sp = ParallelConfig(tp=2, sp=True)  # generation switches sequence parallelism off while it runs
    init_distributed(tp2_sp, seed=3)
    for job, m in spec["merges"].items():
        cfg, model = adapted(m, tp2_sp)
        results[f"generate_sp/{job}"] = generate(model, cfg, spec)
        results[f"sp_after/{job}"] = model.config.sequence_parallel  # switched back on

    pp2 = ParallelConfig(pp=2)
    init_distributed(pp2, seed=3)
    for name, path in spec["logits"].items():
        cfg = model_config_from_checkpoint(path)
        chunks = build_model_chunks(cfg, pp2)
        load_base_checkpoint(chunks, cfg, pp2)
        results[f"pp2_full/{name}"] = gather_full(chunks)
    for job, m in spec["merges"].items():
        merge_checkpoint(m["adapter"], model_config_from_checkpoint(m["checkpoint"]), m["out_pp2"], pp2)

    if dist.get_rank() == 0:
        torch.save(results, out)
    shutdown()


if __name__ == "__main__":
    from tiedlora import compat

    compat.install()  # once, at process start
    main(sys.argv[1], sys.argv[2])
