"""Errors a user can act on: one clear message, a non-zero status, no traceback.

Every command-line entry point goes through :mod:`tiedlora.cli`; these tests run the real
commands as subprocesses with inputs a user could get wrong and check the three
properties, plus each input the readers and loaders must accept or refuse by name.
Each command fails before any model is built, so the file runs in well under a minute
apart from the one resume test that trains a random-init tiny model for a step.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

SPM_VOCAB = 400  # the test tokenizer's size (4 special, 256 bytes, the rest learned); tiny: 512
TIMEOUT = 300

GOOD = {"input": "What colour is the sky?", "output": "blue"}


def cli(module, *args, env=None, cwd=ROOT):
    e = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "SLURM_PROCID")}
    e.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=TIMEOUT)


def assert_user_error(res, *needles, status=2):
    """Exit status 2, exactly one ``error:`` message on stderr holding ``needles``, no traceback."""
    err = res.stderr
    assert res.returncode == status, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err and "Error executing job" not in err, err[-4000:]
    assert err.count("error: ") == 1 and err.lstrip().startswith("error: "), err[-4000:]
    for n in needles:
        assert n in err, (n, err[-4000:])


def write_jsonl(path: Path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def task_dir(d: Path, train_lines=None) -> Path:
    """A user's task folder: train/validation/test.jsonl (train replaced by ``train_lines``)."""
    write_jsonl(d / "train.jsonl", train_lines or [GOOD] * 8)
    write_jsonl(d / "validation.jsonl", [GOOD] * 4)
    write_jsonl(d / "test.jsonl", [GOOD] * 4)
    return d


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A SentencePiece model of SPM_VOCAB pieces trained on the generated corpus."""
    from tiedlora.data.mini_tasks import pretraining_corpus
    from tiedlora.data.tokenizers import train_sentencepiece

    tok = train_sentencepiece(pretraining_corpus(400), tmp_path_factory.mktemp("spm") / "tok", SPM_VOCAB)
    assert tok.vocab_size == SPM_VOCAB
    return tok.model_file


# ------------------------------------------------------------------- the data readers
def test_jsonl_starting_with_a_bom_is_read(tmp_path):
    from tiedlora.data.sft import read_jsonl

    path = write_jsonl(tmp_path / "bom.jsonl", [GOOD, {"input": "x", "output": "y"}], bom=True)
    assert read_jsonl(path) == [GOOD, {"input": "x", "output": "y"}]


def test_bom_inside_a_jsonl_file_is_named_with_its_line(tmp_path):
    from tiedlora.data.sft import DataError, read_jsonl

    path = tmp_path / "cat.jsonl"  # two BOM-led files concatenated
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError, match=rf"{path}:2: a UTF-8 byte-order mark"):
        read_jsonl(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_prepare_data_reads_bom_led_source_files(tmp_path, suffix):
    from tiedlora.prepare_data._common import read_file

    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".json":
        text = json.dumps(rows)
    else:
        text = "question,answer\r\nq1,a1\r\nq2,a2\r\n"
    path = tmp_path / f"train{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r for _, r in read_file(path)] == rows


# -------------------------------------------------------------------------- tokenizers
def test_tokenizer_larger_than_vocab_size_is_refused_naming_both_sizes(spm):
    from tiedlora.build import load_tokenizer
    from tiedlora.config import ModelConfig

    small = ModelConfig(name="small", vocab_size=SPM_VOCAB - 10)  # padded to 384: the ids would fit
    assert small.padded_vocab_size() >= SPM_VOCAB
    with pytest.raises(ValueError, match=rf"has {SPM_VOCAB} tokens but model.vocab_size={SPM_VOCAB - 10}"):
        load_tokenizer(spm, small)
    assert load_tokenizer(spm, ModelConfig(name="exact", vocab_size=SPM_VOCAB)).vocab_size == SPM_VOCAB


def test_shipped_model_configs_fit_their_tokenizers():
    """The check above must not refuse what we ship: each preset's vocab_size is the
    tokenizer's size (GPT-2B-001: 256000 SentencePiece pieces, LLaMA-2: 32000; the
    mini base trains a tokenizer of exactly its vocab_size)."""
    from tiedlora.config import compose, to_object
    from tiedlora.mini_base import PretrainSettings

    sizes = {m: to_object(compose("params", [f"model={m}"])).model.vocab_size
             for m in ("gpt2b_001", "llama2_7b", "mini", "tiny")}
    assert sizes["gpt2b_001"] == 256000 and sizes["llama2_7b"] == 32000
    assert PretrainSettings().vocab_size <= sizes["mini"]


def test_hf_folder_without_tokenizer_says_how_to_fix_it(tmp_path):
    from tiedlora.convert import CheckpointFormatError, tokenizer_path

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointFormatError, match=r"no tokenizer.model or tokenizer.json.*set model.tokenizer="):
        tokenizer_path(hf)


def test_tokenizer_folder_without_tokenizer_files_is_refused(tmp_path):
    from tiedlora.build import load_tokenizer
    from tiedlora.config import ModelConfig

    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer.json.*set model.tokenizer="):
        load_tokenizer(tmp_path, ModelConfig())


# -------------------------------------------------------------------- safetensors files
def _bad_files(tmp_path, good: Path):
    """A text file, an empty file and ``good`` cut short (header intact, data missing)."""
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file\n")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.safetensors"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) - 64])
    return {"text": text, "empty": empty, "truncated": cut}


def test_trainer_state_that_is_not_safetensors_names_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tiedlora.checkpoint import STATE_FILE, CheckpointError, load_trainer_state

    good = tmp_path / STATE_FILE
    save_file({"opt.exp_avg": torch.ones(64)}, str(good),
              metadata={"trainer": json.dumps({"step": 3, "sampler": {"epoch": 0, "position": 3}})})
    tensors, state = load_trainer_state(good)
    assert state["step"] == 3 and torch.equal(tensors["opt.exp_avg"], torch.ones(64))
    for kind, path in _bad_files(tmp_path, good).items():
        with pytest.raises(CheckpointError, match=rf"{path}: not a readable safetensors file .*expected: trainer state file \({STATE_FILE}"):
            load_trainer_state(path)
    foreign = tmp_path / "foreign.safetensors"  # safetensors, but not ours
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(CheckpointError, match=rf"{foreign}: no readable 'trainer' metadata"):
        load_trainer_state(foreign)


def test_adapter_that_is_not_safetensors_names_the_file(tmp_path):
    import torch

    from tiedlora.checkpoint import CheckpointError, load_adapter, save_adapter
    from tiedlora.config import PeftConfig

    good = save_adapter(tmp_path / "adapter.safetensors", {"tied.linear_qkv.A": torch.ones(8, 64)}, PeftConfig())
    assert load_adapter(good)[1].rank == PeftConfig().rank
    for kind, path in _bad_files(tmp_path, good).items():
        with pytest.raises(CheckpointError, match=rf"{path}: not a readable safetensors file .*expected: adapter file"):
            load_adapter(path)


def test_base_weights_that_are_not_safetensors_name_the_file(tmp_path):
    from tiedlora.convert import CheckpointFormatError
    from tiedlora.config import ModelConfig
    from tiedlora.convert.base_file import FORMAT, load_base

    bad = tmp_path / "base.safetensors"
    bad.write_text("not weights")
    with pytest.raises(CheckpointFormatError, match=rf"{bad}: not a readable safetensors file .*{FORMAT}"):
        load_base([], bad, ModelConfig())


def test_corrupt_hugging_face_shard_names_the_file(tmp_path):
    from tiedlora.convert import CheckpointFormatError
    from tiedlora.convert.hf_llama import ST_INDEX, WeightFiles

    key = "model.embed_tokens.weight"
    (tmp_path / ST_INDEX).write_text(json.dumps({"weight_map": {key: "model-00001-of-00001.safetensors"}}))
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointFormatError, match=rf"{shard}: not a readable safetensors file .*{key}"):
        WeightFiles(tmp_path).read(key)


# ----------------------------------------------------------------- the command lines
def run_main(module, *args, monkeypatch, capsys, env=None):
    """``python -m <module> ARGS`` in this process (imports once: fast): (exit status, stderr).

    The same code as the subprocess: the Hydra commands' ``main()`` exits through
    :func:`tiedlora.cli.run` itself; the plain ones are wrapped as their ``__main__`` does.
    """
    import importlib

    from tiedlora.cli import run

    for k in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", [module, *map(str, args)])
    mod = importlib.import_module(module)
    # Hydra configures logging for its job (disabling every existing logger): undo it after
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.disabled, lg.level, list(lg.handlers), lg.propagate) for lg in [logging.root, *loggers]]
    try:
        with pytest.raises(SystemExit) as exc:
            run(mod.main)
    finally:
        for lg, disabled, level, handlers, propagate in saved:
            lg.disabled, lg.level, lg.handlers, lg.propagate = disabled, level, handlers, propagate
    return exc.value.code, capsys.readouterr().err


def assert_one_message(status, err, *needles):
    assert status == 2, (status, err[-4000:])
    assert "Traceback" not in err and "Error executing job" not in err, err[-4000:]
    assert err.count("error: ") == 1 and err.lstrip().startswith("error: "), err[-4000:]
    for n in needles:
        assert n in err, (n, err[-4000:])


@pytest.mark.parametrize("module,args,needles", [
    ("tiedlora.finetune", ["trainer.max_steps=[1"], ["cannot parse the override 'trainer.max_steps=[1'"]),
    ("tiedlora.finetune", ["trainer.max_stepz=5"], ["max_stepz", "not in 'TrainerConfig'"]),
    ("tiedlora.finetune", ["peft=nope"], ["peft/nope", "tl6"]),
    ("tiedlora.finetune", ["trainer.max_steps=abc"], ["trainer.max_steps", "'abc'"]),
    ("tiedlora.finetune", ["peft.rank=0"], ["peft.rank=0"]),  # a typed config's __post_init__
    ("tiedlora.finetune", ["trainer.nonfinite=ignore"], ["trainer.nonfinite='ignore'", "skip, raise"]),
    ("tiedlora.finetune", ["trainer.max_skipped_steps=0"], ["trainer.max_skipped_steps=0"]),
    ("tiedlora.finetune", ["trainer.requeue_lock_wait_s=-1"], ["trainer.requeue_lock_wait_s=-1"]),
    ("tiedlora.finetune", ["trainer.preempt_exit_code=4"], ["trainer.preempt_exit_code=4", "mean something else"]),
    ("tiedlora.evaluate", ["peft.alpha=[x"], ["cannot parse the override 'peft.alpha=[x'"]),
    ("tiedlora.evaluate", ["task=nope"], ["task/nope"]),
    ("tiedlora.params", ["peft.rank=-1"], ["peft.rank=-1"]),
    ("tiedlora.params", ["model.hidden_sise=8"], ["hidden_sise"]),
    ("tiedlora.submit", ["--dry-run", "peft=[lora"], ["cannot parse the override 'peft=[lora'"]),
    ("tiedlora.submit", ["--dry-run", "peft=lora,nope"], ["job 001-nope", "peft/nope"]),
    ("tiedlora.mini_base", ["--check", "--out", "/nonexistent/dir"], ["/nonexistent/dir/info.json: missing"]),
    ("tiedlora.merge", ["--adapter", "/nonexistent/a", "--output", "OUT", "model.checkpoint=/nonexistent/c"],
     ["/nonexistent/c"]),
    ("tiedlora.export", ["--adapter", "/nonexistent/a", "--output", "OUT", "model.checkpoint=/c", "peft=lora"],
     ["only model=<preset>", "peft=lora"]),
    ("tiedlora.report", ["/nonexistent/runs"], ["/nonexistent/runs: no such file or directory"]),
    ("tiedlora.prepare_data", ["task=nope"], ["task='nope'", "squad"]),
])
def test_user_mistake_gives_one_message_and_status_2(module, args, needles, tmp_path, monkeypatch, capsys):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    if module == "tiedlora.submit":
        args = ["--sweep-dir", tmp_path / "sweep", *args]
    assert_one_message(*run_main(module, *args, monkeypatch=monkeypatch, capsys=capsys), *needles)


def test_recipes_usage_error_exits_2(monkeypatch, capsys):
    status, err = run_main("tiedlora.recipes", "--bogus", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and "unrecognized arguments: --bogus" in err  # argparse's own usage message


def test_report_names_a_malformed_results_file(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "run" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"task": "mini_qa",')
    assert_one_message(*run_main("tiedlora.report", tmp_path, monkeypatch=monkeypatch, capsys=capsys),
                       f"{bad}: not a results.json file")


def test_evaluate_names_an_unreadable_run_config(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    status, err = run_main("tiedlora.evaluate", f"output_dir={tmp_path}", monkeypatch=monkeypatch, capsys=capsys)
    assert_one_message(status, err, f"{tmp_path / 'config.yaml'}: not a readable config.yaml")


def test_only_rank_0_prints_and_every_rank_exits_non_zero(monkeypatch, capsys):
    import torch.distributed

    # a mistake found before the process group exists: the rank comes from torchrun's
    # environment (other tests in this process may have set up a one-process group)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for rank, expect in (("0", 1), ("1", 0)):
        status, err = run_main("tiedlora.params", "peft.rank=0", env={"RANK": rank, "WORLD_SIZE": "2"},
                               monkeypatch=monkeypatch, capsys=capsys)
        assert status == 2 and err.count("error: ") == expect, (rank, err)


def test_a_job_run_by_a_launcher_elsewhere_hands_the_mistake_back(monkeypatch, capsys):
    """In a Slurm job (another process) the mistake is raised so the launcher returns it to
    the submitting process, which reports it once (after Hydra's line naming the job)."""
    import tiedlora.cli

    monkeypatch.setattr(tiedlora.cli, "_in_entry_process", lambda: False)
    status, err = run_main("tiedlora.finetune", "peft.rank=0", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and err.count("error: peft.rank=0") == 1 and "Traceback" not in err, err
    assert "Error executing job" in err  # it went back through Hydra's job result, not SystemExit


def test_real_processes_print_one_message_and_no_traceback(tmp_path):
    """The same through real processes: a Hydra command and a plain one."""
    assert_user_error(cli("tiedlora.finetune", "trainer.max_steps=[1"), "trainer.max_steps=[1")
    assert_user_error(cli("tiedlora.report", tmp_path / "nope"), f"{tmp_path / 'nope'}: no such file")


def test_full_error_shows_the_traceback():
    res = cli("tiedlora.finetune", "peft.rank=0", env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr and "peft.rank=0" in res.stderr
    res = cli("tiedlora.report", "/nonexistent/runs", env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr and "FileNotFoundError" in res.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
    """Errors that are not the user's (here a RuntimeError planted in the task) are not hidden."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(  # the task function converts its config with this
        "import tiedlora.config as c\n"
        "def boom(cfg):\n    raise RuntimeError('planted bug')\n"
        "c.to_object = boom\n")
    res = cli("tiedlora.finetune", "trainer.max_steps=1",
              env={"PYTHONPATH": os.pathsep.join([str(plant), str(ROOT)])})
    assert res.returncode == 1 and "Traceback" in res.stderr and "RuntimeError: planted bug" in res.stderr
    assert "error: planted bug" not in res.stderr


# ---------------------------------------------------------------------- data first
def test_finetune_checks_data_before_the_base_weights(tmp_path, monkeypatch, capsys):
    """A typo in line 3 is reported, not the missing checkpoint that would be loaded next."""
    data = task_dir(tmp_path / "data", [GOOD, GOOD, '{"input": "x", "output": }', GOOD])
    status, err = run_main("tiedlora.finetune", "task=mini_qa", f"task.data_dir={data}", "model=tiny",
                           f"model.checkpoint={tmp_path / 'missing.safetensors'}", f"output_dir={tmp_path / 'out'}",
                           monkeypatch=monkeypatch, capsys=capsys)
    assert_one_message(status, err, f"{data / 'train.jsonl'}:3: bad JSON")
    assert "missing.safetensors" not in err


def test_evaluate_checks_data_before_the_base_weights(tmp_path, monkeypatch, capsys):
    import torch

    from tiedlora.checkpoint import save_adapter
    from tiedlora.config import PeftConfig

    adapter = save_adapter(tmp_path / "adapter.safetensors", {"tied.linear_qkv.A": torch.ones(8, 64)}, PeftConfig())
    data = task_dir(tmp_path / "data")
    write_jsonl(data / "test.jsonl", [GOOD, {"input": "no output key"}])
    status, err = run_main("tiedlora.evaluate", "task=mini_qa", f"task.data_dir={data}", "model=tiny",
                           f"model.checkpoint={tmp_path / 'missing.safetensors'}", f"adapter={adapter}",
                           f"output_dir={tmp_path / 'out'}", monkeypatch=monkeypatch, capsys=capsys)
    assert_one_message(status, err, f"{data / 'test.jsonl'}:2: missing key 'output'")
    assert "missing.safetensors" not in err


def test_finetune_refuses_a_tokenizer_larger_than_the_model(tmp_path, spm, monkeypatch, capsys):
    data = task_dir(tmp_path / "data")
    status, err = run_main("tiedlora.finetune", "task=mini_qa", f"task.data_dir={data}", "model=tiny",
                           f"model.vocab_size={SPM_VOCAB - 1}", "model.checkpoint=null", f"model.tokenizer={spm}",
                           f"output_dir={tmp_path / 'out'}", monkeypatch=monkeypatch, capsys=capsys)
    assert_one_message(status, err, f"has {SPM_VOCAB} tokens but model.vocab_size={SPM_VOCAB - 1}")


@pytest.mark.slow  # fresh processes, a run, then each broken file resumed: run by .ci/run (make test-slow)
def test_resume_from_a_broken_trainer_state_names_the_file(tmp_path, spm):
    """The real resume path: one step of a random-init tiny model, then its trainer state
    is overwritten with text and the rerun must say which file is wrong."""
    data = task_dir(tmp_path / "data")
    out = tmp_path / "out"
    args = ["task=mini_qa", f"task.data_dir={data}", "task.max_length=32", "model=tiny", "model.checkpoint=null",
            f"model.tokenizer={spm}", "trainer.max_steps=1", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=4", "trainer.val_check_interval=0", "eval.before=false", "eval.after=false",
            f"output_dir={out}"]
    first = cli("tiedlora.finetune", *args)
    assert first.returncode == 0, first.stderr[-4000:]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    state = latest / "trainer_state.safetensors"
    state.write_text("not a safetensors file\n")
    res = cli("tiedlora.finetune", *args[:-3], "trainer.max_steps=2", *args[-3:])
    assert_user_error(res, f"{state}: not a readable safetensors file", "expected: trainer state file")


@pytest.mark.parametrize("module,args", [
    ("tiedlora.evaluate", ["output_dir=RUN"]),
    ("tiedlora.merge", ["--adapter", "RUN/best", "--output", "OUT", "model.checkpoint=/nonexistent/c"]),
    ("tiedlora.export", ["--adapter", "RUN/best/adapter.safetensors", "--output", "OUT", "model=llama2_7b",
                         "model.checkpoint=/nonexistent/c"]),
])
def test_commands_reading_a_folder_a_live_run_holds_warn(module, args, tmp_path, monkeypatch, capsys):
    """The run's adapter may change under them: one warning naming the run, then the command as
    usual (here it stops at its missing input, as it would without the warning)."""
    from tiedlora.files import lock_run_dir

    run = tmp_path / "run"
    lock = lock_run_dir(run)  # a flock: another open file of this process conflicts like another process
    try:
        args = [a.replace("RUN", str(run)).replace("OUT", str(tmp_path / "out")) for a in args]
        status, err = run_main(module, *args, monkeypatch=monkeypatch, capsys=capsys)
    finally:
        lock.release()
    assert status == 2 and err.count("warning: ") == 1, err[-3000:]
    assert f"warning: {run} is in use by a running fine-tune (pid {os.getpid()} on " in err
    status, err = run_main(module, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and "warning:" not in err  # released: no warning
