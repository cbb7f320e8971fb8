"""The parameter report command (meta device): issue-stated numbers and the JSON contract."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


def _run(*args):
    res = subprocess.run([sys.executable, "-m", "tiedlora.params", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("preset, rank, trainable", [("lora", 8, 1_572_864), ("tl6", 8, 213_184)])
def test_gpt2b_json_contract(preset, rank, trainable):
    out = json.loads(_run("model=gpt2b_001", f"peft={preset}", f"peft.rank={rank}", "format=json"))
    assert out["trainable"] == trainable == out["formula"]
    assert out["lora_trainable"] == 1_572_864
    assert out["frozen_params"] > 2_000_000_000  # built on meta: 2B parameters, no memory


@pytest.mark.slow  # fresh processes, 36 rows of a 7B model on meta: run by .ci/run (make test-slow)
def test_all_table_llama():
    rows = json.loads(_run("--all", "model=llama2_7b", "format=json"))
    assert len(rows) == 9 * 4
    assert all(r["trainable"] == r["formula"] for r in rows)
    by = {(r["preset"], r["rank"]): r for r in rows}
    # L·r·(d_in + d_out) with L=32, d_in=4096, d_out=3·4096
    assert by[("lora", 8)]["trainable"] == 32 * 8 * (4096 + 3 * 4096)
    # TL3: r·d_out only
    assert by[("tl3", 128)]["trainable"] == 128 * 3 * 4096
    table = _run("--all", "model=tiny")
    assert "share of LoRA" in table and table.count("\n") >= 36
