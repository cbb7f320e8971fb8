"""bench/gpu_check.py: runs on CPU with --tiny; its FLOPs formula describes GPT-2B-001.

The real check (TL6 on a GPT-2B-001-shaped bf16 model) needs a GPU: ``python
bench/gpu_check.py`` on one H200. Here the same script runs the tiny model on the CPU
(``--tiny``; from the command line: ``python bench/gpu_check.py --tiny``), and
the docstring's FLOPs formula is checked against the parameters of a GPT-2B-001 model built
on the meta device (no weights allocated).
"""

import json
import math
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_tiny_run_on_cpu(tmp_path, mp1, capsys):
    """The script's main() in this process (a subprocess would spend ~5 s importing)."""
    out = tmp_path / "check.json"
    returned = gpu_check.main(["--tiny", "--warmup", "1", "--steps", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r == returned == json.loads(capsys.readouterr().out)
    assert (r["model"], r["preset"], r["rank"], r["device"]) == ("tiny", "tl6", 8, "cpu")
    assert r["tokens_per_step"] == 64 * 2 * 2 and r["timed_steps"] == 1 and len(r["losses"]) == 2
    assert all(math.isfinite(x) and 4.0 < x < 8.0 for x in r["losses"])  # ~ln(512) at random init
    assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["mfu"] is None
    assert math.isclose(r["tokens_per_s"] * r["step_time_s"], r["tokens_per_step"])
    assert math.isclose(r["achieved_tflops"] * 1e12 * r["step_time_s"], r["model_flops_per_step"])


def test_flops_formula_matches_gpt2b_001(mp1):
    from tiedlora.config import ParallelConfig
    from tiedlora.models.gpt import build_gpt_model
    from tiedlora.peft import apply_peft

    model_cfg, peft_cfg = gpu_check.configs(gpu_check.parse_args([]))
    assert (model_cfg.name, model_cfg.params_dtype, model_cfg.checkpoint) == ("gpt2b_001", "bfloat16", None)
    assert (peft_cfg.name, peft_cfg.rank, list(peft_cfg.target_modules)) == ("tl6", 8, ["linear_qkv"])
    model = apply_peft(build_gpt_model(model_cfg, ParallelConfig(), meta=True), peft_cfg)
    terms = gpu_check.flops_terms(model_cfg, peft_cfg)
    counted = gpu_check.counted_terms(model)
    assert (terms["n_mm"], terms["n_ad"]) == (counted["n_mm"], counted["n_ad"])
    # 24 x (2048*6144 + 2048*2048 + 2048*10880 + 5440*2048) + 2048*256000 frozen matmul weights
    assert terms["n_mm"] == 24 * (2048 * 6144 + 2048 * 2048 + 2048 * 10880 + 5440 * 2048) + 2048 * 256000
    assert terms["n_ad"] == 24 * 8 * (2048 + 6144)
    tokens = 2 * 2048 * 4
    flops = gpu_check.step_flops(terms, 24, 2048, tokens)
    assert math.isclose(flops, 4 * terms["n_mm"] * tokens + 12 * 24 * 2048 * 2048 * tokens
                        + 6 * terms["n_ad"] * tokens)
