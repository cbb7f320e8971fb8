"""Evaluation metrics of the paper's five tasks; every score is on a 0-100 scale.

SQuAD v1.1 (official script's normalisation: lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace), with ``P``/``G`` the normalised token bags::

    EM = 100 * mean_i max_r [norm(pred_i) == norm(ref_ir)]
    F1 = 100 * mean_i max_r 2 * prec * rec / (prec + rec),
         prec = |P & G| / |P|,  rec = |P & G| / |G|      (& = multiset intersection)

ROUGE-L: rouge-score's ``rougeL`` F-measure (LCS-based, its default tokenizer,
no stemming unless asked), max over references, averaged, x100.
BLEU: sacrebleu's corpus BLEU (13a tokenisation, exp smoothing) -- not an average of
sentence scores. Accuracy: exact string match after stripping surrounding whitespace.
GSM8K: the number after ``####`` (else the last number in the text), commas and ``$``
removed, compared numerically.

``compute_metrics(name, predictions, references)`` dispatches on the task's metric name
(``squad``, ``rouge``, ``bleu``, ``accuracy``, ``gsm8k``). A reference is a string or a
list of acceptable strings.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence, Union

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1",
    "rouge_l",
    "bleu",
    "accuracy",
    "gsm8k_extract",
    "gsm8k_accuracy",
    "compute_metrics",
    "METRICS",
]

Reference = Union[str, Sequence[str]]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _refs(r: Reference) -> list[str]:
    refs = [r] if isinstance(r, str) else list(r)
    if not refs:
        raise ValueError("a reference list is empty")
    return refs


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lowercase, remove punctuation, remove articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _em_one(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _f1_one(pred: str, ref: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(ref).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    _check_lengths(predictions, references)
    return 100.0 * sum(max(_em_one(p, r) for r in _refs(rs)) for p, rs in zip(predictions, references)) / len(predictions)


def f1(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    _check_lengths(predictions, references)
    return 100.0 * sum(max(_f1_one(p, r) for r in _refs(rs)) for p, rs in zip(predictions, references)) / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[Reference], use_stemmer: bool = False) -> float:
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    total = sum(
        max(scorer.score(r, p)["rougeL"].fmeasure for r in _refs(rs)) for p, rs in zip(predictions, references)
    )
    return 100.0 * total / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """sacrebleu corpus BLEU. With several references per example, every example must
    carry the same number (sacrebleu reads them as parallel reference streams)."""
    import sacrebleu

    _check_lengths(predictions, references)
    refs = [_refs(r) for r in references]
    n = len(refs[0])
    if any(len(r) != n for r in refs):
        raise ValueError("bleu: every example needs the same number of references")
    streams = [[r[k] for r in refs] for k in range(n)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def accuracy(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    _check_lengths(predictions, references)
    hits = sum(any(str(p).strip() == str(r).strip() for r in _refs(rs)) for p, rs in zip(predictions, references))
    return 100.0 * hits / len(predictions)


_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def gsm8k_extract(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: the first number after ``####`` if
    there is one, else the last number in the text; commas and ``$`` stripped, a
    trailing ``.0``-style fraction kept as written. None when there is no number."""
    if "####" in text:
        tail = text.split("####", 1)[1]
        m = _NUMBER.search(tail)
        found = m.group(0) if m else None
    else:
        ms = _NUMBER.findall(text)
        found = ms[-1] if ms else None
    if found is None:
        return None
    return found.replace(",", "").replace("$", "")


def _as_number(s: str | None) -> float | None:
    if s is None:
        return None
    try:
        return float(s)
    except ValueError:
        return None


def gsm8k_accuracy(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Share (x100) of predictions whose extracted number equals the reference's."""
    _check_lengths(predictions, references)
    hits = 0
    for p, rs in zip(predictions, references):
        got = _as_number(gsm8k_extract(p))
        hits += got is not None and any(got == _as_number(gsm8k_extract(r)) for r in _refs(rs))
    return 100.0 * hits / len(predictions)


MetricFn = Callable[[Sequence[str], Sequence[Reference]], dict[str, float]]

METRICS: dict[str, MetricFn] = {
    "squad": lambda p, r: {"exact_match": exact_match(p, r), "f1": f1(p, r)},
    "rouge": lambda p, r: {"rougeL": rouge_l(p, r)},
    "bleu": lambda p, r: {"bleu": bleu(p, r)},
    "accuracy": lambda p, r: {"accuracy": accuracy(p, r)},
    "gsm8k": lambda p, r: {"gsm8k_accuracy": gsm8k_accuracy(p, r)},
}


def compute_metrics(metric_name: str, predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Scores (0-100) of ``predictions`` under the named task metric."""
    if metric_name not in METRICS:
        raise ValueError(f"unknown metric {metric_name!r}; expected one of {sorted(METRICS)}")
    return METRICS[metric_name](list(predictions), list(references))
