"""Grading: answer extraction, symbolic equivalence, pass@k and maj@k — NeMo-Skills' rules.

Extraction (`extract_answer`) is NeMo-Skills' `search_boxed`: the LAST `\\boxed` in the text, its braces
matched (nested braces allowed); `\\boxed 5` (no brace) and an unclosed brace give None, as in NeMo-Skills.
`extract_answer(..., allow_unbraced=True)` additionally accepts the MATH-dataset form `\\boxed 5`.

Equivalence (`math_equal`) uses **math-verify**, not a hand-written sympy grader, because:
  * it is what NeMo-Skills grades with at HEAD (`math_grader.math_equal`, reference §4.2), so our accuracy
    numbers are comparable with published OpenMath-Nemotron results — the decisive reason;
  * it parses LaTeX (fractions, roots, intervals, sets, percentages, units) into sympy via latex2sympy2 and
    compares with numeric tolerance; a plain-sympy grader would need its own LaTeX parser and normaliser.
The steps follow NeMo-Skills': None is wrong; optional `take_modulo`; single-letter MCQ answers; strip a
trailing `%`/`\\%` from a plain number and trailing `.`/`\\`; LaTeX normalisation, where two literal answers
(only letters/commas/spaces, or only digits/spaces) are decided by string equality after normalisation (the
AIME integer case, no sympy involved); otherwise both sides are wrapped in `$...$` and math-verify decides.

math-verify's own timeouts use `signal.alarm`, which only works in the main thread (Prefect runs tasks in
threads). We switch them off and run a comparison that is not decided literally in a daemon thread joined
with a timeout (`EQUIVALENCE_TIMEOUT_S`, NeMo-Skills' 10 s): a pathological expression makes the answer
"not equal" instead of hanging the caller.

Metrics: `pass_at_k` is the unbiased estimator 1 - C(n-c, k) / C(n, k) over all n samples (NeMo-Skills'
`pass@k` for binary scores); `majority_at_k` is NeMo-Skills' `majority@k`: the first k predictions, None
ignored, votes by the literal answer string, ties scored as the mean correctness of the tied answers, 0 when
no prediction has an answer.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence

EQUIVALENCE_TIMEOUT_S = 10.0
NUMERIC_PRECISION = 15  # NeMo-Skills' MathEvaluatorConfig.numeric_precision

_MCQ_OPTIONS = "ABCDEFGHIJ"
_PERCENT_RE = re.compile(r"^(\d+\.?\d*)(?:\\%|%)$")
_LITERAL_RE = re.compile(r"[a-zA-Z ,]+|[0-9 ]+")
_LATEX_ENV_RE = re.compile(r"\$.*\$|\\\(.*\\\)|\\\[.*\\\]|\\boxed\{", re.DOTALL)

# math-verify warns once that its (signal-based) timeouts are off; we time comparisons out ourselves.
logging.getLogger("math_verify").setLevel(logging.ERROR)


# ------------------------------------------------------------------ extraction


def extract_answer(text: str | None, *, allow_unbraced: bool = False) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces matched), or None.

    `\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`; an unclosed brace -> None; `\\boxed 5` -> None unless
    `allow_unbraced` (then `5`: the text after `\\boxed ` up to the next `$` or end of line).
    """
    if not text or "\\boxed" not in text:
        return None
    start = text.rfind("\\boxed")
    rest = text[start + len("\\boxed") :]
    if rest.startswith("{"):
        depth = 0
        for i, ch in enumerate(rest):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return rest[1:i]
        return None  # unbalanced
    if allow_unbraced and rest.startswith(" "):
        answer = re.split(r"[$\n]", rest[1:], maxsplit=1)[0].strip()
        return answer or None
    return None


# ------------------------------------------------------------------ equivalence


def _strip_number_dressing(expr: str) -> str:
    match = _PERCENT_RE.fullmatch(expr)
    if match:
        expr = match.group(1)
    return expr.rstrip(".\\")


def _symbolic_equal(gt: str, pred: str) -> bool:
    from math_verify import LatexExtractionConfig, parse, verify

    if not _LATEX_ENV_RE.search(gt):
        gt = f"${gt}$"
    if not _LATEX_ENV_RE.search(pred):
        pred = f"${pred}$"
    parsed_gt = parse(gt, [LatexExtractionConfig()], parsing_timeout=None)
    parsed_pred = parse(pred, [LatexExtractionConfig()], parsing_timeout=None)
    return bool(verify(parsed_gt, parsed_pred, numeric_precision=NUMERIC_PRECISION, timeout_seconds=None))


def _with_timeout(fn, *args, timeout: float) -> bool:
    """Run `fn(*args)` in a daemon thread; False if it raises or does not finish within `timeout`."""
    result: list[bool] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except Exception:  # math-verify/sympy raise many types on odd input: not equal
            result.append(False)

    worker = threading.Thread(target=target, name="math-equal", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def math_equal(
    expected: object,
    predicted: object,
    *,
    take_modulo: int | None = None,
    timeout: float = EQUIVALENCE_TIMEOUT_S,
) -> bool:
    """Whether `predicted` is mathematically the same answer as `expected` (NeMo-Skills' `math_equal`)."""
    if predicted is None or expected is None:
        return False
    gt, pred = str(expected), str(predicted)
    if take_modulo is not None:
        try:
            return int(gt) % take_modulo == int(pred) % take_modulo
        except ValueError:
            return False

    if re.fullmatch(f"[{_MCQ_OPTIONS}]", gt.strip()):
        if _mcq_letter(pred) == gt.strip():
            return True

    from latex2sympy2_extended import NormalizationConfig, normalize_latex

    gt = _strip_number_dressing(gt)
    pred = _strip_number_dressing(pred)
    try:
        norm_gt = normalize_latex(gt, NormalizationConfig())
        norm_pred = normalize_latex(pred, NormalizationConfig())
    except Exception:
        norm_gt, norm_pred = gt, pred
    same = norm_gt.replace(" ", "") == norm_pred.replace(" ", "")
    if same or (_LITERAL_RE.fullmatch(norm_gt) and _LITERAL_RE.fullmatch(norm_pred)):
        return same
    return _with_timeout(_symbolic_equal, gt, pred, timeout=timeout)


def _mcq_letter(text: str) -> str | None:
    """The option letter of an MCQ answer like `B`, `(B)`, `\\text{B}`, `B.`."""
    from math_verify import StringExtractionConfig, parse

    try:
        parsed = parse(text, [StringExtractionConfig(strings=tuple(_MCQ_OPTIONS))], parsing_timeout=None)
    except Exception:
        return None
    return str(parsed[-1]) if parsed else None


def is_correct(expected: object, predicted: str | None, **kwargs) -> bool:
    return math_equal(expected, predicted, **kwargs)


# ------------------------------------------------------------------ answer agreement (early stopping)


def answer_groups(answers: Sequence[str | None]) -> list[list[int]]:
    """Indices of `answers` grouped by mathematical equivalence (None answers are in no group).

    Identical strings are grouped without any parsing; otherwise an answer joins the first group whose
    representative it `math_equal`s. Largest groups first, ties in order of first appearance.
    """
    groups: list[list[int]] = []
    reps: list[str] = []
    by_text: dict[str, int] = {}
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        key = ans.strip()
        if key in by_text:
            groups[by_text[key]].append(i)
            continue
        for g, rep in enumerate(reps):
            if math_equal(rep, key):
                groups[g].append(i)
                by_text[key] = g
                break
        else:
            by_text[key] = len(groups)
            groups.append([i])
            reps.append(key)
    return sorted(groups, key=lambda g: (-len(g), g[0]))


# ------------------------------------------------------------------ metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: the chance that k of n samples (c correct), drawn without replacement, hit one."""
    if n <= 0 or k <= 0:
        raise ValueError(f"pass_at_k needs n >= 1 and k >= 1 (got n={n}, k={k})")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n (got c={c}, n={n})")
    k = min(k, n)
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) as a product, which stays exact in floats for large n
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def pass_at_k_exact(n: int, c: int, k: int) -> float:
    """The same estimator with exact binomials (for checking)."""
    k = min(k, n)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(answers: Sequence[str | None]) -> tuple[list[str], int]:
    """The most frequent literal answers (all tied ones, in order of first appearance) and their count."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return [], 0
    top = max(votes.values())
    return [a for a in votes if votes[a] == top], top


def majority_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None) -> float:
    """NeMo-Skills' majority@k for one problem: 1.0/0.0, or a fraction when the vote ties.

    Votes go to `(answer, correctness)` over the first k samples with an answer; a tie scores the mean
    correctness of the tied answers; no answer at all scores 0.
    """
    if len(answers) != len(correct):
        raise ValueError("answers and correct must have the same length")
    k = len(answers) if k is None else k
    pairs = [(a, bool(c)) for a, c in zip(answers[:k], correct[:k], strict=True) if a is not None]
    if not pairs:
        return 0.0
    votes = Counter(pairs)
    top = max(votes.values())
    tied = [pair for pair, count in votes.items() if count == top]
    return sum(c for _, c in tied) / len(tied)
