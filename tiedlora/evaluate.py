"""Evaluate a (saved) adapter on a task: greedy generation or multiple-choice scoring.

Usage::

    # the run directory of a fine-tune: its config.yaml and final adapter are used
    python -m tiedlora.evaluate output_dir=outputs/mini_sum/mini_tl6_r8
    # a given adapter file with an explicit config
    python -m tiedlora.evaluate task=mini_sum model=mini adapter=path/adapter.safetensors output_dir=outputs/eval
    # TP=2 on CPU
    torchrun --nproc_per_node 2 -m tiedlora.evaluate output_dir=outputs/mini_sum/mini_tl6_r8 parallel.tp=2

Writes ``<output_dir>/results.json`` (task, model, preset, rank, trainable parameters,
metrics, steps, wall time) and ``<output_dir>/predictions.jsonl``.

Generative tasks are decoded greedily with a key/value cache; multiple-choice tasks pick
the choice with the highest length-normalised log-likelihood (mean over its tokens).
Data-parallel ranks evaluate disjoint slices of the examples.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch.distributed as dist

from tiedlora import checkpoint as ckpt
from tiedlora import compat
from tiedlora.build import build_model, load_tokenizer, param_counts, resolve_base
from tiedlora.config import EvalConfig, FinetuneConfig, ModelConfig, TaskConfig
from tiedlora.data.sft import PromptTemplate
from tiedlora.dist import ProcessGroups, detect_env, init_distributed, is_rank0, process_groups, shutdown
from tiedlora.files import atomic_write_text, to_json, warn_if_run_dir_held
from tiedlora.generate import choice_logprobs, greedy_generate
from tiedlora.metrics import compute_metrics
from tiedlora.tasks import read_task_data


def _references(rec: dict):
    refs = rec.get("references") or rec.get("answers")
    return list(refs) if refs else rec["output"]


def evaluate_task(model, tokenizer, task: TaskConfig, records: List[dict], vocab_size: int,
                  limit: int = 0, batch_size: int = 16, progress: bool = False,
                  groups: Optional[ProcessGroups] = None) -> Tuple[dict, List[dict]]:
    """Metrics (0-100) and per-example predictions on ``records`` (all DP ranks return both)."""
    records = records[:limit] if limit else records
    template = PromptTemplate(task.template)
    groups = groups or process_groups()
    rank, size, group = groups.rank(groups.dp), groups.size(groups.dp), groups.dp
    mine = list(range(rank, len(records), size))
    preds: dict = {}

    def prompt_ids(rec) -> List[int]:
        ids = tokenizer.encode(template.prompt(rec["input"]))
        if task.add_bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
        budget = task.max_length - task.max_new_tokens
        return ids[-budget:] if budget > 0 else ids

    desc = f"eval {task.name}" if progress else None
    if task.kind == "multiple_choice":
        questions = []
        for i in mine:
            rec = records[i]
            questions.append((prompt_ids(rec), [tokenizer.encode(template.split(rec["input"], c)[1])
                                                or [tokenizer.eos_id] for c in rec["choices"]]))
        scores = choice_logprobs(model, questions, vocab_size, batch_size=batch_size, progress=desc)
        for i, (_, conts), lp in zip(mine, questions, scores):
            norm = [s / len(c) for s, c in zip(lp, conts)]
            best = max(range(len(norm)), key=norm.__getitem__)
            preds[i] = {"prediction": records[i]["choices"][best], "pred_label": best, "scores": norm}
    else:
        prompts = [prompt_ids(records[i]) for i in mine]
        outs = greedy_generate(model, prompts, task.max_new_tokens, tokenizer.eos_id, vocab_size,
                               batch_size=batch_size, progress=desc)
        for i, out in zip(mine, outs):
            preds[i] = {"prediction": tokenizer.decode(out).strip()}
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, preds, group=group)
        preds = {k: v for part in parts for k, v in part.items()}
    ordered = [preds[i] for i in range(len(records))]
    if task.kind == "multiple_choice":
        hits = [float(p["pred_label"] == r["label"]) for p, r in zip(ordered, records)]
        metrics = {"accuracy": 100.0 * sum(hits) / max(1, len(hits))}
    else:
        metrics = compute_metrics(task.metric, [p["prediction"] for p in ordered],
                                  [_references(r) for r in records])
    rows = [{"input": r["input"], "reference": r["output"], **p} for r, p in zip(records, ordered)]
    return metrics, rows


def evaluate_chunks(chunks, tokenizer, task: TaskConfig, records: List[dict], model_cfg: ModelConfig,
                    eval_cfg: EvalConfig, groups: ProcessGroups) -> Tuple[Optional[dict], Optional[List[dict]]]:
    """:func:`evaluate_task` on a run's model chunks; (None, None) under pipeline parallelism
    (generation needs the whole model on one rank: evaluate the saved adapter at pp=1)."""
    if len(chunks) > 1 or groups.size(groups.pp) > 1:
        return None, None
    return evaluate_task(chunks[0], tokenizer, task, records, model_cfg.padded_vocab_size(),
                         limit=eval_cfg.limit, batch_size=eval_cfg.batch_size, progress=is_rank0(),
                         groups=groups)


def fmt_metrics(m: Optional[dict]) -> str:
    return "n/a" if not m else ", ".join(f"{k}={v:.1f}" for k, v in m.items())


def run_evaluation(cfg: FinetuneConfig) -> dict:
    """Evaluate a saved adapter (``python -m tiedlora.evaluate``)."""
    from tiedlora.peft import load_adapter_state_dict

    t0 = time.time()
    compat.install()  # CPU machines: megatron-core's CUDA-only calls go to the CPU (no-op on GPU)
    out = Path(cfg.output_dir)
    if cfg.parallel.pp > 1:
        raise ValueError(f"parallel.pp={cfg.parallel.pp}: evaluation runs with parallel.pp=1 "
                         "(adapters are layout-independent)")
    adapter_path = Path(cfg.adapter) if cfg.adapter else out / ckpt.ADAPTER_FILE
    if detect_env().rank == 0:
        warn_if_run_dir_held(adapter_path, "adapter")
    tensors, saved_peft, meta = ckpt.load_adapter(adapter_path)
    records = read_task_data(cfg.task, splits=())[cfg.task.eval_split]  # data before weights
    weights, tok_path = resolve_base(cfg.model)
    tokenizer = load_tokenizer(tok_path, cfg.model)
    init_distributed(cfg.parallel, seed=cfg.trainer.seed)
    groups = process_groups()
    chunks = build_model(cfg.model, saved_peft, cfg.parallel, weights)
    load_adapter_state_dict(chunks, tensors, groups=groups)
    metrics, rows = evaluate_chunks(chunks, tokenizer, cfg.task, records, cfg.model, cfg.eval, groups)
    previous = {}
    if (out / "results.json").is_file():
        previous = json.loads((out / "results.json").read_text())
    results = {**previous, "task": cfg.task.name, "model": cfg.model.name, "preset": saved_peft.name,
               "rank": saved_peft.rank, **param_counts(cfg.model, saved_peft),
               "metrics": metrics, "adapter": str(adapter_path),
               "steps": json.loads(meta.get("step", "null")) if "step" in meta else previous.get("steps"),
               "eval_time_s": round(time.time() - t0, 1)}
    results.setdefault("wall_time_s", results["eval_time_s"])
    if is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "predictions.jsonl", "".join(to_json(r) + "\n" for r in rows), "write the predictions")
        atomic_write_text(out / "results.json", to_json(results, indent=2) + "\n", "write results.json")
        print(f"{cfg.task.name} {saved_peft.name} r={saved_peft.rank}: {fmt_metrics(metrics)}  "
              f"-> {out / 'results.json'}", flush=True)
    shutdown()
    return results


def main() -> None:
    """The command line (exits; a user's mistake ends with one message: tiedlora.cli)."""
    from omegaconf import OmegaConf

    from tiedlora.cli import hydra_main
    from tiedlora.config import to_object

    overrides = [a for a in sys.argv[1:] if "=" in a]

    @hydra_main("evaluate")
    def _run(dcfg) -> None:
        saved = Path(dcfg.output_dir) / "config.yaml"
        if saved.is_file():  # a fine-tuning run: start from its resolved config
            import yaml

            try:
                run_cfg = OmegaConf.load(saved)
            except yaml.YAMLError as e:
                raise ValueError(f"{saved}: not a readable config.yaml ({e})") from None
            base = OmegaConf.merge(OmegaConf.structured(type(to_object(dcfg))), run_cfg)
            # then the command line's explicit field overrides, as Hydra parsed them
            for o in overrides:
                key = o.split("=", 1)[0].lstrip("+~")
                if key in ("model", "task", "peft") or key.startswith("hydra"):
                    continue  # group choices come from the run
                OmegaConf.update(base, key, OmegaConf.select(dcfg, key), merge=False)
            dcfg = base
        run_evaluation(to_object(dcfg))

    _run()


if __name__ == "__main__":
    main()
