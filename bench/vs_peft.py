"""Ours against Hugging Face PEFT: step time and peak memory on one LLaMA-style model, side by side.

    python bench/vs_peft.py                                    # the full grid below (CPU, ~1 hour)
    python bench/vs_peft.py --seqs 256,1024 --ranks 8 --rounds 3
    python bench/vs_peft.py --layers 2 --seqs 128 --ranks 8 --rounds 1 --steps 1   # minutes
    python bench/vs_peft.py --tiny --methods hf-lora,tl6 --rounds 1 --steps 1      # a smoke run

The model is the 134M LLaMA-style base of the step-time benchmark (12 layers, hidden 768,
12 heads, FFN 2048 SwiGLU, RMSNorm, RoPE, vocabulary 32000, untied embeddings, fp32),
built twice: as megatron-core's GPTModel (ours, ``model.attention_backend`` from
``--attention``, default sdpa) and as ``transformers.LlamaForCausalLM`` (attention
``sdpa``). Both get random weights: step time and memory do not depend on them.
Every configuration trains the QKV projection only (ours: the fused ``linear_qkv``; PEFT:
``q_proj, k_proj, v_proj``), AdamW (lr 1e-4) over its adapter tensors, no adapter dropout.

Configurations per sequence length s (batch ``--tokens`` / s, at least 1: 4×256, 1×1024,
1×2048 by default, so every length sees about the same tokens):

    hf-floor, ours-floor   frozen base forward + backward (activation gradients down to the
                           embedding output, no weight gradient): what every adapter pays
    hf-lora, hf-vera       Hugging Face PEFT LoRA / VeRA at each rank
    lora, vera, tl3, tl6   our presets (conf/peft/*.yaml) at each rank

Timing: one process per sequence length builds every configuration side by side and
interleaves their steps round by round (round k runs ``--steps`` timed steps of every
configuration, in an order rotated each round, after ``--warmup`` untimed ones), so drift and
other load on the machine hit all of them alike; a configuration's time is the median of its
timed steps, and ``spread`` is their interquartile range over that median. (Fresh processes
per timed run were tried first: on a shared VM the same configuration's time moved by up to
30% between processes, more than the differences to be measured.) Peak resident memory
(``ru_maxrss``, imports included) is measured separately, each configuration in its own
fresh process running ``--warmup`` + 1 steps. The table reports, per configuration, the
step time, the ratios to our floor, to Hugging Face's floor and to Hugging Face PEFT LoRA at
the same rank, and the peak RSS.

Targets (CPU, 2 threads, fp32), checked at the end of the output: our floor ≤ 1.02× HF's
floor; each tied preset ≤ 1.03× our floor at r=8 and ≤ 1.06× at r=128; TL6 r=8 ≤ HF
LoRA r=8; TL6 r=8 peak memory ≤ HF LoRA r=8's at the longest sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's tiedlora, before any worker imports it

MODEL_134M = dict(layers=12, hidden=768, heads=12, ffn=2048, vocab=32000)
MODEL_TINY = dict(layers=2, hidden=64, heads=4, ffn=176, vocab=512)
OURS = ("lora", "vera", "tl3", "tl6")
HF = ("hf-lora", "hf-vera")
ALL_METHODS = ("hf-floor", "ours-floor") + HF + OURS


# ------------------------------------------------------------------ workers

def _hf_step(spec: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = spec["model"]
    cfg = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["ffn"],
                      num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                      num_key_value_heads=m["heads"], max_position_embeddings=max(spec["seq"], 2048),
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, hidden_act="silu")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    method = spec["method"]
    if method == "hf-floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer, no weight gradient
    else:
        from peft import LoraConfig, VeraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj"]
        r = spec["rank"]
        pc = (LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets) if method == "hf-lora"
              else VeraConfig(r=r, vera_dropout=0.0, target_modules=targets))
        model = get_peft_model(model, pc)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if method != "hf-floor" else None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m["vocab"], (spec["batch"], spec["seq"]), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def _ours_step(spec: dict):
    import torch

    from tiedlora.config import compose, to_object
    from tiedlora.dist import init_distributed, set_seed
    from tiedlora.config import ModelConfig, ParallelConfig
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import adapter_parameters, apply_peft
    from step_time import freeze_to_floor, training_step  # bench/ is this script's folder

    m = spec["model"]
    cfg = ModelConfig(name="llama_like", num_layers=m["layers"], hidden_size=m["hidden"],
                      ffn_hidden_size=m["ffn"], num_attention_heads=m["heads"], vocab_size=m["vocab"],
                      seq_length=spec["seq"], normalization="RMSNorm", activation="swiglu",
                      attention_backend=spec["attention"])
    init_distributed(ParallelConfig(), seed=0)
    set_seed(0)
    model = build_gpt_model(cfg)
    method = spec["method"]
    if method == "ours-floor":
        params = freeze_to_floor(model)
    else:
        pc = to_object(compose("params", [f"peft={method}", f"peft.rank={spec['rank']}",
                                          "peft.target_modules=[linear_qkv]", "peft.dropout=0.0"])).peft
        apply_peft(model, pc)
        params = list(adapter_parameters(model).values())
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m["vocab"], (spec["batch"], spec["seq"] + 1), generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(spec["seq"]).unsqueeze(0).expand(spec["batch"], -1)
    return training_step(model, params, x, pos, y)


def _build(spec: dict):
    build = _hf_step if spec["method"].startswith("hf-") else _ours_step
    return build(spec)


def worker_time(spec: dict) -> dict:
    """Every configuration of one sequence length in this process, steps interleaved."""
    import torch

    torch.set_num_threads(spec["threads"])
    steps, trainable = {}, {}
    for m, r in spec["configs"]:
        key = _label(m, r)
        steps[key], trainable[key] = _build({**spec, "method": m, "rank": r})
        for _ in range(spec["warmup"]):
            steps[key]()
    keys = list(steps)
    times = {k: [] for k in keys}
    for rnd in range(spec["rounds"]):
        k0 = rnd % len(keys)
        for key in keys[k0:] + keys[:k0]:
            for _ in range(spec["steps"]):
                t0 = time.perf_counter()
                steps[key]()
                times[key].append(time.perf_counter() - t0)
        print(f"  seq={spec['seq']} round {rnd + 1}/{spec['rounds']}: "
              + ", ".join(f"{k} {1000 * times[k][-1]:.0f}" for k in keys) + " ms",
              file=sys.stderr, flush=True)
    return {k: {"times": times[k], "trainable": trainable[k]} for k in keys}


def worker_memory(spec: dict) -> dict:
    """One configuration alone in a fresh process: its peak resident memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    step, trainable = _build(spec)
    for _ in range(spec["warmup"] + 1):
        step()
    return {"trainable": trainable,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ------------------------------------------------------------------ driver

def _run(mode: str, spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, __file__, f"--worker-{mode}", json.dumps(spec)], env=env,
                         stdout=subprocess.PIPE, stderr=None if mode == "time" else subprocess.PIPE,
                         text=True, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        what = f"seq={spec['seq']}" + ("" if mode == "time" else f" {_label(spec['method'], spec['rank'])}")
        raise SystemExit(f"[vs_peft] {mode} run {what} failed (exit {res.returncode})"
                         + (f":\n{res.stderr[-4000:]}" if res.stderr else ""))
    return json.loads(lines[-1])


def _label(method: str, rank: int) -> str:
    return method if method.endswith("floor") else f"{method} r={rank}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="256,1024,2048", help="sequence lengths (comma-separated)")
    p.add_argument("--ranks", default="8,128", help="adapter ranks (comma-separated)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"subset of {','.join(ALL_METHODS)} (the floors are always run)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per step: batch = max(1, tokens // seq)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each times --steps steps of every configuration")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration before the first round")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (default 12)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model (smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "local"], help="our attention backend")
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--worker-time", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.seq_list = [int(s) for s in a.seqs.split(",")]
    a.rank_list = [int(r) for r in a.ranks.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    bad = sorted(set(methods) - set(ALL_METHODS))
    if bad:
        p.error(f"--methods: unknown {bad}; expected a subset of {list(ALL_METHODS)}")
    a.method_list = ["hf-floor", "ours-floor"] + [m for m in ALL_METHODS[2:] if m in methods]
    for f in ("tokens", "rounds", "steps", "threads"):
        if getattr(a, f) < 1:
            p.error(f"--{f} must be >= 1")
    if min(a.seq_list) < 2 or min(a.rank_list) < 1:
        p.error("--seqs must be >= 2 and --ranks >= 1")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker_time or a.worker_memory:
        from tiedlora import compat

        compat.install()  # once, at the start of each worker process
        out = worker_time(json.loads(a.worker_time)) if a.worker_time else worker_memory(json.loads(a.worker_memory))
        print(json.dumps(out), flush=True)
        return {}
    import torch

    model = dict(MODEL_TINY if a.tiny else MODEL_134M)
    if a.layers:
        model["layers"] = a.layers
    print(f"# vs_peft: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {platform.processor() or platform.machine()}"
          f" ({os.cpu_count()} cpus), torch {torch.__version__}, {a.threads} threads, model {model}, "
          f"our attention={a.attention}")
    print(f"# command: python bench/vs_peft.py {' '.join(sys.argv[1:])}", flush=True)
    results: dict = {}
    for seq in a.seq_list:
        batch = max(1, a.tokens // seq)
        configs = [(m, 0) for m in a.method_list[:2]] + [
            (m, r) for r in a.rank_list for m in a.method_list[2:]]
        base = dict(seq=seq, batch=batch, model=model, threads=a.threads, warmup=a.warmup,
                    attention=a.attention)
        print(f"  seq={seq}: timing {len(configs)} configurations in one process, {a.rounds} rounds",
              file=sys.stderr, flush=True)
        runs = _run("time", {**base, "configs": configs, "rounds": a.rounds, "steps": a.steps})
        for key, run in runs.items():
            run["step_s"] = statistics.median(run["times"])
        for m, r in ([] if a.no_memory else configs):
            mem = _run("memory", {**base, "method": m, "rank": r})
            runs[_label(m, r)]["peak_rss_gb"] = mem["peak_rss_gb"]
            print(f"  seq={seq} memory: {_label(m, r):<14} {mem['peak_rss_gb']:.2f} GB",
                  file=sys.stderr, flush=True)
        results[seq] = {"batch": batch, "runs": runs}
        _table(seq, batch, runs)
    _targets(results, a.rank_list)
    if a.json:
        Path(a.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1) + "\n")
    return results


def _med(runs, key):
    return runs[key]["step_s"] if key in runs else None


def _spread(times) -> float:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return (q[2] - q[0]) / statistics.median(times)


def _table(seq: int, batch: int, runs: dict) -> None:
    ours, hf = _med(runs, "ours-floor"), _med(runs, "hf-floor")
    print(f"\nseq {seq} × batch {batch}")
    print(f"{'configuration':<15}{'trainable':>12}{'step ms':>10}{'spread':>8}{'÷ our floor':>13}"
          f"{'÷ HF floor':>12}{'÷ HF LoRA':>11}{'peak RSS GB':>13}")
    for key, run in runs.items():
        t = run["step_s"]
        rank = key.split("r=")[1] if "r=" in key else None
        lora = _med(runs, f"hf-lora r={rank}") if rank else None
        mem = f"{run['peak_rss_gb']:.2f}" if "peak_rss_gb" in run else "-"
        print(f"{key:<15}{run['trainable']:>12,}{1000 * t:>10.1f}{100 * _spread(run['times']):>7.1f}%"
              f"{t / ours:>13.3f}{t / hf:>12.3f}{(f'{t / lora:.3f}' if lora else '-'):>11}{mem:>13}")


def _targets(results: dict, ranks) -> None:
    print("\ntargets (✓ met, ✗ not met)")
    tied = ("vera", "tl3", "tl6")
    longest = max(results)
    for seq, res in results.items():
        runs = res["runs"]
        ours, hf = _med(runs, "ours-floor"), _med(runs, "hf-floor")
        checks = [(f"our floor ÷ HF floor ≤ 1.02", ours / hf, 1.02)]
        for r in ranks:
            limit = 1.03 if r <= 8 else 1.06
            for m in tied:
                t = _med(runs, f"{m} r={r}")
                if t is not None:
                    checks.append((f"{m} r={r} ÷ our floor ≤ {limit}", t / ours, limit))
        tl6, lora = _med(runs, "tl6 r=8"), _med(runs, "hf-lora r=8")
        if tl6 and lora:
            checks.append(("tl6 r=8 ÷ HF LoRA r=8 ≤ 1", tl6 / lora, 1.0))
            if seq == longest and "peak_rss_gb" in runs["tl6 r=8"]:
                mem, ref = runs["tl6 r=8"]["peak_rss_gb"], runs["hf-lora r=8"]["peak_rss_gb"]
                checks.append(("tl6 r=8 peak RSS ÷ HF LoRA r=8's ≤ 1", mem / ref, 1.0))
        for text, value, limit in checks:
            print(f"  seq {seq:>5}: {text:<40} {value:7.3f} {'✓' if value <= limit else '✗'}")


if __name__ == "__main__":
    main()
