"""Supervised fine-tuning data: NeMo's SFT JSONL, prompt templates, batching.

File format (one JSON object a line, UTF-8; a byte-order mark opening the file is skipped)::

    {"input": "Context: ... Question: ...", "output": "Tovin"}
    {"input": "...", "output": "barks.", "choices": ["meows.", "barks.", ...], "label": 1}

Tokenisation of one example, template ``T = "<prefix>{output}"``::

    prompt = T rendered with input, up to {output}   (its trailing whitespace moves to
    answer = that whitespace + output                  the answer, so that "Q Answer:" +
                                                       " Tovin" tokenises like the whole)
    ids    = [bos]? + encode(prompt) + encode(answer) + [eos]?
    mask   =   0    +   0 ... 0      +   1 ... 1      +   1      (answer_only_loss)

Truncation to ``max_length`` tokens (``"prompt_left"``): drop prompt tokens from the left
(BOS stays); if the answer (+EOS) alone does not fit, the prompt goes entirely and the
answer is cut at its end (EOS dropped: the answer did not end there).

Collation (right padding to ``s`` = longest ``len(ids) - 1``, rounded up)::

    tokens[b, t]   = ids[t]            (t < len - 1, else pad_id)
    labels[b, t]   = ids[t + 1]        next-token targets
    loss_mask[b,t] = mask[t + 1]       float; 0 on padding
    position_ids   = t

Right padding under a causal mask needs no attention mask: real tokens never see pads.

Batch scheme (NeMo/Megatron): one optimizer step consumes ``global_batch_size``
examples, split over ``dp_size`` data-parallel ranks and, on each rank, into
``num_micro_batches = global_batch_size // (micro_batch_size * dp_size)`` micro-batches
whose gradients are accumulated. :class:`MicroBatchSampler` yields one step's micro-batch
index lists for one rank; the DP ranks of a step together cover exactly the
``global_batch_size`` examples a DP=1 run would see in that step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from tiedlora.data.tokenizers import Tokenizer

__all__ = [
    "DataError",
    "read_jsonl",
    "PromptTemplate",
    "DEFAULT_TEMPLATE",
    "SFTDataset",
    "collate",
    "num_micro_batches",
    "MicroBatchSampler",
    "TRUNCATION_MODES",
]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{input} {output}"
TRUNCATION_MODES = ("prompt_left", "right")
_MAX_REPORTED_ERRORS = 10


class DataError(ValueError):
    """A malformed SFT data file. ``errors`` lists ``(line_number, reason)``: 1-based
    line numbers, 0 for a problem of the whole file."""

    def __init__(self, path: str | os.PathLike, errors: Sequence[tuple[int, str]]):
        self.path = str(path)
        self.errors = list(errors)
        shown = [f"{self.path}:{n}: {reason}" if n else f"{self.path}: {reason}"
                 for n, reason in self.errors[:_MAX_REPORTED_ERRORS]]
        more = len(self.errors) - len(shown)
        msg = "\n".join(shown) + (f"\n... and {more} more bad lines" if more > 0 else "")
        super().__init__(msg)


# ---------------------------------------------------------------------------- reading


def _check_record(obj: Any, required: Sequence[str]) -> str | None:
    """The reason ``obj`` is not a valid SFT record, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key in required:
        if key not in obj:
            return f"missing key {key!r} (present: {sorted(obj)})"
        if not isinstance(obj[key], str):
            return f"key {key!r} must be a string, got {type(obj[key]).__name__}"
    has_choices, has_label = "choices" in obj, "label" in obj
    if has_choices != has_label:
        return "'choices' and 'label' must appear together"
    if has_choices:
        choices, label = obj["choices"], obj["label"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            return "'choices' must be a non-empty list of strings"
        if not isinstance(label, int) or isinstance(label, bool):
            return f"'label' must be an integer, got {type(label).__name__}"
        if not 0 <= label < len(choices):
            return f"'label'={label} out of range for {len(choices)} choices"
        if "output" in obj and obj["output"] != choices[label]:
            return f"'output' {obj['output']!r} != choices[{label}] {choices[label]!r}"
    return None


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ("input", "output")) -> list[dict]:
    """Read and validate a whole SFT JSONL file; blank lines are skipped.

    A UTF-8 byte-order mark at the start of the file is skipped. Every line is checked
    before anything is returned. Raises ``FileNotFoundError`` for
    a missing file and :class:`DataError` (naming the file, the 1-based line number and
    the reason for each bad line) for bad UTF-8, bad JSON, a non-object, a missing or
    non-string required key, bad ``choices``/``label``, or a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file not found: {path}")
    records: list[dict] = []
    errors: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            # a byte-order mark opening the file is skipped, as other JSON Lines readers do
            encoding = "utf-8-sig" if lineno == 1 else "utf-8"
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                errors.append((lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not line.strip():
                continue
            if line.startswith("\ufeff"):
                errors.append((lineno, "a UTF-8 byte-order mark (U+FEFF) starts this line; only the "
                                       "file's first line may carry one (were files concatenated?)"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append((lineno, f"bad JSON: {e.msg} (column {e.colno})"))
                continue
            reason = _check_record(obj, required)
            if reason is not None:
                errors.append((lineno, reason))
            else:
                records.append(obj)
    if errors:
        raise DataError(path, errors)
    if not records:
        raise DataError(path, [(0, "file holds no records (empty or only blank lines)")])
    return records


# ---------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class PromptTemplate:
    """A template with one ``{input}`` and ending with ``{output}``, e.g.
    ``"{input} Answer: {output}"``. Literal braces are written ``{{`` and ``}}``."""

    template: str = DEFAULT_TEMPLATE

    def __post_init__(self):
        t = self.template
        if not isinstance(t, str):
            raise ValueError(f"prompt template must be a string, got {type(t).__name__}: {t!r}")
        try:
            parts = list(string.Formatter().parse(t))
        except ValueError as e:
            raise ValueError(f"prompt template {t!r} is not a valid format string: {e}") from None
        fields = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
        names = [name for name, _, _ in fields]
        if names != ["input", "output"]:
            raise ValueError(
                f"prompt template {t!r} must contain exactly one {{input}} followed by "
                f"exactly one {{output}}; found fields {names}"
            )
        if any(spec or conv for _, spec, conv in fields):
            raise ValueError(f"prompt template {t!r}: fields take no format spec or conversion")
        if parts[-1][1] != "output":  # text after {output} would never be generated
            raise ValueError(f"prompt template {t!r} must end with {{output}}")

    @property
    def _prefix(self) -> str:
        return self.template[: -len("{output}")]

    def split(self, input: str, output: str) -> tuple[str, str]:
        """``(prompt, answer)``; the prompt's trailing whitespace starts the answer."""
        rendered = self._prefix.format(input=input)
        prompt = rendered.rstrip()
        return prompt, rendered[len(prompt):] + output

    def prompt(self, input: str) -> str:
        """The text given to the model at evaluation (same as in training)."""
        return self.split(input, "")[0]


# ---------------------------------------------------------------------------- dataset


def _encode_example(
    tokenizer: Tokenizer,
    prompt: str,
    answer: str,
    max_length: int,
    add_bos: bool,
    add_eos: bool,
    answer_only_loss: bool,
    truncation: str,
) -> tuple[list[int], list[int], int, bool]:
    """``(ids, mask, prompt_len, truncated)``; ``mask[i] = 1`` where ``ids[i]`` is supervised."""
    head = [tokenizer.bos_id] if add_bos else []
    p = tokenizer.encode(prompt)
    a = tokenizer.encode(answer) + ([tokenizer.eos_id] if add_eos else [])
    budget = max_length - len(head)
    truncated = len(p) + len(a) > budget
    if truncated:
        if truncation == "prompt_left":
            if len(a) <= budget:
                p = p[len(p) + len(a) - budget:]
            else:
                p, a = [], a[:budget]
        else:  # "right": cut the whole sequence at its end
            keep = max(budget - len(p), 0)
            p, a = p[:budget], a[:keep]
    ids = head + p + a
    prompt_len = len(head) + len(p)
    prompt_mask = 0 if answer_only_loss else 1
    mask = [0] * len(head) + [prompt_mask] * len(p) + [1] * len(a)
    return ids, mask, prompt_len, truncated


class SFTDataset(torch.utils.data.Dataset):
    """A tokenised SFT JSONL file (tokenised once, at construction). ``records``: the
    file's records when the caller has already read them with :func:`read_jsonl`.

    ``dataset[i]`` is ``{"input_ids": list[int], "loss_mask": list[int],
    "prompt_len": int, "index": i}`` with ``len(input_ids) <= max_length``;
    ``loss_mask[j] = 1`` when token ``j`` is a supervised target. ``records`` holds the
    raw JSON objects (the references for evaluation), ``prompts[i]`` the prompt text.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Tokenizer,
        template: str | PromptTemplate = DEFAULT_TEMPLATE,
        max_length: int = 2048,
        add_bos: bool = False,
        add_eos: bool = True,
        answer_only_loss: bool = True,
        truncation: str = "prompt_left",
        records: Sequence[dict] | None = None,
    ):
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation={truncation!r}; expected one of {list(TRUNCATION_MODES)}")
        if add_bos and tokenizer.bos_id is None:
            raise ValueError(f"add_bos=True but tokenizer {tokenizer!r} has no BOS token")
        min_len = 2 + int(add_bos)
        if max_length < min_len:
            raise ValueError(f"max_length={max_length} must be at least {min_len}")
        self.path = Path(path)
        self.template = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
        self.max_length = max_length
        self.records = read_jsonl(self.path) if records is None else list(records)
        self.prompts: list[str] = []
        self._examples: list[dict] = []
        self.num_truncated = 0
        for i, rec in enumerate(self.records):
            prompt, answer = self.template.split(rec["input"], rec["output"])
            ids, mask, prompt_len, truncated = _encode_example(
                tokenizer, prompt, answer, max_length, add_bos, add_eos, answer_only_loss, truncation
            )
            self.num_truncated += truncated
            self.prompts.append(prompt)
            self._examples.append({"input_ids": ids, "loss_mask": mask, "prompt_len": prompt_len, "index": i})
        if self.num_truncated:
            logger.warning(
                "%s: %d of %d examples were longer than max_length=%d tokens and were "
                "truncated (%s)", self.path, self.num_truncated, len(self.records), max_length, truncation,
            )

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> dict:
        return self._examples[i]


# ---------------------------------------------------------------------------- collation


def collate(
    examples: Sequence[Mapping[str, Any]],
    pad_id: int,
    pad_to_multiple_of: int | None = 8,
    pad_to_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` (items of :class:`SFTDataset`) into a batch.

    Returns ``tokens`` [b, s] int64, ``labels`` [b, s] int64 (``tokens`` shifted left by
    one: the next-token targets), ``loss_mask`` [b, s] float32 (1 where ``labels`` is a
    supervised token, 0 on padding), ``position_ids`` [b, s] int64 and ``real_tokens``
    (an int: the tokens that are not padding). ``s`` is the longest ``len(input_ids) - 1``,
    rounded up to ``pad_to_multiple_of``, or exactly ``pad_to_length`` (a fixed shape, as
    pipeline parallelism needs) when given.
    """
    if not examples:
        raise ValueError("collate: empty list of examples")
    longest = max(max(len(e["input_ids"]) - 1, 1) for e in examples)
    if pad_to_length is not None:
        if longest > pad_to_length:
            raise ValueError(f"collate: an example needs {longest} positions > pad_to_length={pad_to_length}")
        s = pad_to_length
    else:
        m = pad_to_multiple_of or 1
        s = math.ceil(longest / m) * m
    b = len(examples)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, s), dtype=torch.float32)
    for row, e in enumerate(examples):
        ids, mask = e["input_ids"], e["loss_mask"]
        if len(ids) != len(mask):
            raise ValueError(f"collate: example {row} has {len(ids)} ids but {len(mask)} mask entries")
        n = len(ids) - 1
        if n <= 0:
            continue
        tokens[row, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        labels[row, :n] = torch.tensor(ids[1:], dtype=torch.long)
        loss_mask[row, :n] = torch.tensor(mask[1:], dtype=torch.float32)
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s).contiguous()
    real = sum(max(len(e["input_ids"]) - 1, 0) for e in examples)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "real_tokens": real}


# ---------------------------------------------------------------------------- batching


def num_micro_batches(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """``global_batch_size // (micro_batch_size * dp_size)``; raises ``ValueError``
    unless that division is exact and every size is positive."""
    for name, v in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                    ("dp_size", dp_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size * "
            f"dp_size = {micro_batch_size} * {dp_size} = {per_step}"
        )
    return global_batch_size // per_step


class MicroBatchSampler:
    """Endless iterator over optimizer steps; ``next(sampler)`` is this DP rank's list of
    ``num_micro_batches`` index lists (each ``micro_batch_size`` long) for one step.

    Epoch ``e`` uses the permutation drawn from ``(seed, e)`` (identity when
    ``shuffle=False``) and has ``num_examples // global_batch_size`` steps (the tail
    that does not fill a global batch is dropped, as in NeMo). Within step ``k`` the
    global batch ``g = perm[k*G:(k+1)*G]`` is cut into ``num_micro_batches`` chunks of
    ``micro_batch_size * dp_size``; rank ``r`` takes slice ``[r*m:(r+1)*m]`` of each.

    ``state_dict()`` holds ``epoch`` and ``position`` (steps consumed in that epoch); a
    sampler loading it yields exactly the steps the saved one would have yielded next.
    The state does not depend on the DP layout, so a run may resume with another one.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.num_micro_batches = num_micro_batches(global_batch_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_examples < global_batch_size:
            raise ValueError(
                f"num_examples={num_examples} < global_batch_size={global_batch_size}: "
                "not even one optimizer step fits in an epoch"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // global_batch_size
        self.epoch = 0
        self.position = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                self._perm = np.arange(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[list[list[int]]]:
        return self

    def __next__(self) -> list[list[int]]:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        perm = self._permutation(self.epoch)
        g = perm[self.position * self.global_batch_size:(self.position + 1) * self.global_batch_size]
        m, chunk = self.micro_batch_size, self.micro_batch_size * self.dp_size
        r = self.dp_rank
        out = [g[j * chunk + r * m: j * chunk + (r + 1) * m].tolist() for j in range(self.num_micro_batches)]
        self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore ``epoch``/``position``; the data-defining fields must match."""
        for key in ("num_examples", "global_batch_size", "seed", "shuffle"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise ValueError(
                    f"MicroBatchSampler state has {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}; resuming would change the data order"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(f"bad MicroBatchSampler state epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
