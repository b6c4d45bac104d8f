"""Answer extraction, symbolic equivalence, pass@k and maj@k (no servers)."""

from __future__ import annotations

import itertools
import threading

import pytest

from mathforge.solve.grading import (
    answer_groups,
    extract_answer,
    majority_answer,
    majority_at_k,
    math_equal,
    pass_at_k,
    pass_at_k_exact,
)

# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is $\\boxed{42}$.", "42"),
        ("\\boxed{1} then later \\boxed{2}", "2"),  # the LAST boxed
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\left\\{ x : x^{2} > 0 \\right\\}}", "\\left\\{ x : x^{2} > 0 \\right\\}"),
        ("\\boxed{a{b{c}}d} trailing } brace", "a{b{c}}d"),
        ("\\boxed{}", ""),
        ("\\boxed{12", None),  # unclosed
        ("\\boxed{1} and \\boxed{2", None),  # the last one is unclosed: NeMo-Skills gives None
        ("no answer here", None),
        ("", None),
        (None, None),
        ("\\boxed 5", None),  # NeMo-Skills: not `\boxed{` -> None
        ("\\boxed{3}\n\\boxed 5", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_unbraced_form_when_allowed():
    assert extract_answer("the answer is $\\boxed 5$.", allow_unbraced=True) == "5"
    assert extract_answer("\\boxed 17\nmore", allow_unbraced=True) == "17"
    assert extract_answer("\\boxed{4}", allow_unbraced=True) == "4"


def test_extract_from_code_loop_text():
    gen = "<tool_call>\nprint('\\\\boxed{1}')\n</tool_call>\n```output\n\\boxed{1}\n```\nSo $\\boxed{2}$."
    assert extract_answer(gen) == "2"


# ------------------------------------------------------------------ equivalence


@pytest.mark.parametrize(
    ("gt", "pred"),
    [
        ("1/2", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "1/2"),
        ("\\frac12", "0.5"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("42", "42"),
        ("42", "42.0"),
        ("70", " 70 "),
        ("50", "50\\%"),  # a trailing percent on a plain number is dropped
        ("3", "3."),  # end-of-sentence dot
        ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"),
        ("x + 1", "1 + x"),
        ("B", "(B)"),  # MCQ letter
    ],
)
def test_equivalent(gt, pred):
    assert math_equal(gt, pred)


@pytest.mark.parametrize(
    ("gt", "pred"),
    [
        ("1/2", "0.25"),
        ("42", "43"),
        ("42", None),
        ("10", "100"),
        ("yes", "no"),
        ("B", "C"),
        ("(1, 2)", "(2, 1)"),
    ],
)
def test_not_equivalent(gt, pred):
    assert not math_equal(gt, pred)


def test_take_modulo():
    assert math_equal("5", "1005", take_modulo=1000)
    assert not math_equal("5", "x", take_modulo=1000)


def test_equivalence_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_equal("\\frac{1}{2}", "0.5")))
    t.start()
    t.join()
    assert out == [True]


def test_garbage_is_just_not_equal():
    assert not math_equal("1", "\\frac{{{")
    assert not math_equal("\\sqrt{", "}}}")


def test_answer_groups_by_equivalence():
    groups = answer_groups(["0.5", None, "7", "1/2", "\\frac{1}{2}", "7", None])
    assert groups == [[0, 3, 4], [2, 5]]
    assert answer_groups([None, None]) == []


# ------------------------------------------------------------------ pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Enumerate every k-subset of n samples (c correct); the fraction with at least one correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = brute_force_pass_at_k(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
            assert pass_at_k_exact(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(64, 1, 64) == 1.0
    assert pass_at_k(4, 1, 10) == 1.0  # k > n is clipped to n
    assert 0.0 < pass_at_k(1000, 7, 50) < 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(0, 0, 1)


# ------------------------------------------------------------------ maj@k


def test_majority_at_k_clear_winner():
    answers = ["7", "7", "3", None]
    correct = [True, True, False, False]
    assert majority_at_k(answers, correct) == 1.0
    assert majority_at_k(["3", "7", "3"], [False, True, False]) == 0.0


def test_majority_at_k_uses_first_k_only():
    answers = ["3", "7", "7", "7"]
    correct = [False, True, True, True]
    assert majority_at_k(answers, correct, k=1) == 0.0
    assert majority_at_k(answers, correct, k=4) == 1.0


def test_majority_at_k_tie_is_mean_correctness_of_tied():
    assert majority_at_k(["7", "3"], [True, False]) == 0.5
    assert majority_at_k(
        ["7", "3", "5", "7", "3", "5"], [True, False, False, True, False, False]
    ) == pytest.approx(1 / 3)


def test_majority_at_k_ignores_none_and_scores_zero_without_answers():
    assert majority_at_k([None, None, "7"], [False, False, True]) == 1.0
    assert majority_at_k([None, None], [False, False]) == 0.0
    assert majority_at_k([], []) == 0.0


def test_majority_answer_helper():
    assert majority_answer(["a", "b", "b", None]) == (["b"], 2)
    assert majority_answer([None]) == ([], 0)


# ------------------------------------------------------------------ metrics over JSONL rows


def _row(pid, i, answer, correct, *, completed=True, tokens=10, code=0, timeouts=0, stop="all_done"):
    return {
        "id": pid,
        "expected_answer": "7" if pid == "a" else "2",
        "sample_index": i,
        "predicted_answer": answer,
        "is_correct": correct,
        "completed": completed,
        "cancelled": not completed,
        "error": None,
        "num_generated_tokens": tokens,
        "code_rounds_executed": code,
        "num_code_timeouts": timeouts,
        "problem_stop_reason": stop,
        "problem_answer": "7" if pid == "a" else "1",
        "problem_time_s": 2.0 if pid == "a" else 4.0,
    }


def test_compute_metrics():
    from mathforge.solve.evaluate import METRIC_NAMES, compute_metrics

    a = [_row("a", 0, "7", True, code=2), _row("a", 1, "7", True, timeouts=1), _row("a", 2, "3", False)]
    b = [  # sample 2 was cancelled with a (correct) partial answer; the finished ones vote "1"
        _row("b", 0, "1", False, stop="n_completed"),
        _row("b", 1, None, False, stop="n_completed"),
        _row("b", 2, "2", True, completed=False, tokens=40, stop="n_completed"),
    ]
    m = compute_metrics([a, b], samples=3, total_time_s=6.0)
    assert set(METRIC_NAMES) <= set(m)
    assert m["accuracy"] == 0.5  # sample 0: right on a, wrong on b
    assert m["pass_at_k"] == 1.0
    assert m["maj_at_k"] == 0.5
    assert m["pass_at_1"] == pytest.approx(0.5)  # (2/3 + 1/3) / 2
    assert m["solver_accuracy"] == 0.5
    assert m["mean_tokens"] == pytest.approx(90 / 6)
    assert m["time_per_problem_s"] == 3.0
    assert m["code_executions_mean"] == pytest.approx(2 / 6)
    assert m["code_timeouts"] == 1
    assert (m["num_problems"], m["num_samples"], m["num_generations"]) == (2, 3, 6)
    assert (m["num_cancelled"], m["early_stopped"], m["no_answer"]) == (1, 1, pytest.approx(1 / 6))
