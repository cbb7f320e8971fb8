"""Ours against Hugging Face PEFT: step time and peak memory on one LLaMA-style model, side by side.

    python bench/vs_peft.py                                    # the full grid below (CPU, ~hours)
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

Timing: configurations are interleaved round by round (round k runs every configuration
once, in an order rotated each round), so drift and other load on the machine hit all of
them alike. Each run is a fresh process (build, ``--warmup`` untimed steps, ``--steps``
timed steps; its time is the median of its steps), so its peak resident memory
(``ru_maxrss``, imports included) is its own. The table reports, per configuration, the
median over rounds of the step time, the ratios to our floor, to Hugging Face's floor and
to Hugging Face PEFT LoRA at the same rank, and the largest peak RSS over rounds.

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

MODEL_134M = dict(layers=12, hidden=768, heads=12, ffn=2048, vocab=32000)
MODEL_TINY = dict(layers=2, hidden=64, heads=4, ffn=176, vocab=512)
OURS = ("lora", "vera", "tl3", "tl6")
HF = ("hf-lora", "hf-vera")
ALL_METHODS = ("hf-floor", "ours-floor") + HF + OURS


# ------------------------------------------------------------------ worker (one run)

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

    sys.path.insert(0, str(ROOT))
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


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    build = _hf_step if spec["method"].startswith("hf-") else _ours_step
    step, trainable = build(spec)
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "trainable": trainable,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ------------------------------------------------------------------ driver

def _run(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"[vs_peft] {spec['method']} r={spec['rank']} seq={spec['seq']} failed "
                         f"(exit {res.returncode}):\n{res.stderr[-4000:]}")
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
    p.add_argument("--rounds", type=int, default=3, help="rounds (fresh processes) per configuration")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (default 12)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model (smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "local"], help="our attention backend")
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
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
    if a.worker:
        from tiedlora import compat

        compat.install()  # once, at the start of each worker process
        print(json.dumps(worker(json.loads(a.worker))), flush=True)
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
        runs = {_label(m, r): [] for m, r in configs}
        for rnd in range(a.rounds):
            k = rnd % len(configs)
            for m, r in configs[k:] + configs[:k]:
                spec = dict(method=m, rank=r, seq=seq, batch=batch, model=model, threads=a.threads,
                            steps=a.steps, warmup=a.warmup, attention=a.attention)
                runs[_label(m, r)].append(_run(spec))
                print(f"  seq={seq} round {rnd + 1}/{a.rounds}: {_label(m, r):<14} "
                      f"{1000 * runs[_label(m, r)][-1]['step_s']:9.1f} ms", file=sys.stderr, flush=True)
        results[seq] = {"batch": batch, "runs": runs}
        _table(seq, batch, runs, a.rank_list)
    _targets(results, a.rank_list)
    if a.json:
        Path(a.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1) + "\n")
    return results


def _med(runs, key):
    return statistics.median(r["step_s"] for r in runs[key]) if runs.get(key) else None


def _table(seq: int, batch: int, runs: dict, ranks) -> None:
    ours, hf = _med(runs, "ours-floor"), _med(runs, "hf-floor")
    print(f"\nseq {seq} × batch {batch}")
    print(f"{'configuration':<15}{'trainable':>12}{'step ms':>10}{'÷ our floor':>13}{'÷ HF floor':>12}"
          f"{'÷ HF LoRA':>11}{'peak RSS GB':>13}")
    for key, rs in runs.items():
        t = _med(runs, key)
        rank = key.split("r=")[1] if "r=" in key else None
        lora = _med(runs, f"hf-lora r={rank}") if rank else None
        print(f"{key:<15}{rs[0]['trainable']:>12,}{1000 * t:>10.1f}{t / ours:>13.3f}{t / hf:>12.3f}"
              f"{(f'{t / lora:.3f}' if lora else '-'):>11}{max(r['peak_rss_gb'] for r in rs):>13.2f}")


def _targets(results: dict, ranks) -> None:
    print("\ntargets (✓ met, ✗ not met)")
    tied = [m for m in ("vera", "tl3", "tl6")]
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
            if seq == longest:
                mem = max(x["peak_rss_gb"] for x in runs["tl6 r=8"])
                ref = max(x["peak_rss_gb"] for x in runs["hf-lora r=8"])
                checks.append(("tl6 r=8 peak RSS ÷ HF LoRA r=8's ≤ 1", mem / ref, 1.0))
        for text, value, limit in checks:
            print(f"  seq {seq:>5}: {text:<40} {value:7.3f} {'✓' if value <= limit else '✗'}")


if __name__ == "__main__":
    main()
