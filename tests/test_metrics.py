"""Metrics against hand-computed values and sacrebleu's documented example."""
import math

import pytest

from tiedlora.metrics import (
    accuracy,
    bleu,
    compute_metrics,
    exact_match,
    f1,
    gsm8k_accuracy,
    gsm8k_extract,
    normalize_answer,
    rouge_l,
)

ABS = 1e-9   # exact arithmetic cases
BLEU_ABS = 0.01  # sacrebleu's documented value is printed to 2 decimals


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The  Cat's hat!", "cats hat"),
        ("An apple a day.", "apple day"),
        ("Theatre, then\tthe END", "theatre then end"),  # articles only as whole words
        ("  Tovin.  ", "tovin"),
        ("A", ""),
    ],
)
def test_squad_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_normalises_and_takes_best_reference():
    assert exact_match(["the Tovin."], ["Tovin"]) == 100.0
    assert exact_match(["Tovin"], [["Marrow", "tovin"]]) == 100.0
    assert exact_match(["Tovin", "Yeld"], ["Tovin", "Lisk"]) == 50.0


def test_f1_hand_computed():
    # pred bag {red, cat, in, tovin}, ref bag {red, dog} ("the" removed): 1 common token,
    # precision 1/4, recall 1/2 -> F1 = 2 * (1/8) / (3/4) = 1/3.
    assert f1(["red cat in Tovin"], ["the red dog"]) == pytest.approx(100 / 3, abs=ABS)
    # multiset overlap: {cat: 2, dog: 1} & {cat: 1, dog: 2} = 2 tokens; P = R = 2/3.
    assert f1(["cat cat dog"], ["cat dog dog"]) == pytest.approx(200 / 3, abs=ABS)
    # max over references (the second matches: 1.0), mean over examples with a 0.
    assert f1(["red dog", "x"], [["blue", "the red dog"], "y"]) == pytest.approx(50.0, abs=ABS)
    assert f1(["nothing"], ["common"]) == 0.0


def test_rouge_l_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5
    # tokens of 6 on both sides: P = R = F = 5/6.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(500 / 6, abs=ABS)
    # LCS 3, P = 3/3, R = 3/6 -> F = 2/3.
    assert rouge_l(["The cat sat."], ["the cat sat on the mat"]) == pytest.approx(200 / 3, abs=ABS)
    assert rouge_l(["a b"], [["x y", "a b"]]) == pytest.approx(100.0, abs=ABS)


def test_bleu_identical_is_100_and_hand_computed_partial_case():
    assert bleu(["Mara sees a red cat in Tovin."] * 3, ["Mara sees a red cat in Tovin."] * 3) == pytest.approx(100.0)
    # "the cat sat on the mat" vs "the cat sat on a mat": clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3, equal lengths (BP = 1): BLEU = 100 * (5/6*3/5*2/4*1/3) ** (1/4).
    want = 100 * math.exp(sum(map(math.log, (5 / 6, 3 / 5, 2 / 4, 1 / 3))) / 4)
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(want, abs=ABS)


def test_bleu_matches_sacrebleu_documented_example():
    # sacrebleu's README: two reference streams, "BLEU = 48.53 82.4/50.0/45.5/37.5".
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [
        ["The dog bit the man.", "The dog had bit the man."],
        ["It was not unexpected.", "No one was surprised."],
        ["The man bit him first.", "The man had bitten the dog."],
    ]
    assert bleu(hyps, refs) == pytest.approx(48.53, abs=BLEU_ABS)
    with pytest.raises(ValueError, match="same number of references"):
        bleu(hyps[:2], [refs[0], refs[1][:1]])


def test_accuracy():
    assert accuracy([" barks loudly", "moos"], ["barks loudly", "meows"]) == 50.0


@pytest.mark.parametrize(
    "text, number",
    [
        ("3 + 4 = 7. #### 7", "7"),
        ("She pays $1,234 in total.\n#### 1,234", "1234"),
        ("#### $1,000.50", "1000.50"),
        ("It costs $5, then 12 more. The end.", "12"),   # no ####: last number
        ("#### -3", "-3"),
        ("12 apples #### 5 and 6", "5"),                # first number after ####
        ("no number here", None),
    ],
)
def test_gsm8k_extract(text, number):
    assert gsm8k_extract(text) == number


def test_gsm8k_accuracy_compares_numbers():
    preds = ["so 7.0 #### 7.0", "answer 8", "#### 1,000", "none"]
    refs = ["3 + 4 = 7 #### 7", "#### 9", "#### 1000", "#### 2"]
    assert gsm8k_accuracy(preds, refs) == 50.0


def test_compute_metrics_registry():
    assert compute_metrics("squad", ["Tovin"], ["Tovin"]) == {"exact_match": 100.0, "f1": 100.0}
    assert set(compute_metrics("rouge", ["a b"], ["a b"])) == {"rougeL"}
    assert set(compute_metrics("bleu", ["a b c d"], ["a b c d"])) == {"bleu"}
    assert compute_metrics("accuracy", ["x"], ["y"]) == {"accuracy": 0.0}
    assert compute_metrics("gsm8k", ["#### 3"], ["#### 3"]) == {"gsm8k_accuracy": 100.0}
    with pytest.raises(ValueError, match="'meteor'"):
        compute_metrics("meteor", ["x"], ["x"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics("squad", ["x", "y"], ["x"])
