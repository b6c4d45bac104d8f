"""Seeded generator of the shipped math problems (exact answers, tool-integrated reference solutions).

`python -m mathforge.data.problem_gen` rewrites `mathforge/data/problems/tiny.jsonl`;
`--check` verifies that the shipped file is exactly what the generator produces.

Adding a family: write one function `(rng: random.Random) -> Generated` and append it to `FAMILIES`.
The function states the problem, gives the exact answer (an `int` or a `Fraction`) and a short Python program
that prints it; the generator runs that program and refuses a family whose program disagrees with its answer,
so the reference solution (OpenMath TIR style: code in `<tool_call>` tags, its output in a fenced `output`
block) is always consistent. Appending a family changes which problems are drawn (the draw is round-robin
over families), so regenerate the shipped file and say so in the change.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mathforge.data.problems import TINY_PROBLEMS_FILE

SEED = 20250601
SPLIT_SIZES = {"calibration": 40, "test": 30}  # drawn in this order, one round-robin over families


@dataclass(frozen=True)
class Generated:
    problem: str
    answer: int | Fraction
    code: str  # a Python program that prints the answer (as `print(answer)` would)
    lead: str  # one sentence that starts the reference solution


def format_answer(answer: int | Fraction) -> str:
    """The `expected_answer` string: an integer, or a reduced LaTeX fraction."""
    if isinstance(answer, Fraction):
        if answer.denominator == 1:
            return str(answer.numerator)
        sign = "-" if answer < 0 else ""
        return f"{sign}\\frac{{{abs(answer.numerator)}}}{{{answer.denominator}}}"
    return str(int(answer))


# ---------------------------------------------------------------------------------------------- families


def arithmetic(rng: random.Random) -> Generated:
    a, b, c, d = rng.randint(12, 99), rng.randint(12, 99), rng.randint(100, 999), rng.randint(2, 9)
    return Generated(
        problem=f"Compute $({a} \\times {b} - {c}) \\times {d}$.",
        answer=(a * b - c) * d,
        code=f"print(({a} * {b} - {c}) * {d})",
        lead="Let's evaluate the expression directly.",
    )


def modular_power(rng: random.Random) -> Generated:
    a, e, m = rng.randint(2, 19), rng.randint(20, 200), rng.randint(7, 97)
    return Generated(
        problem=f"What is the remainder when ${a}^{{{e}}}$ is divided by ${m}$?",
        answer=pow(a, e, m),
        code=f"print(pow({a}, {e}, {m}))",
        lead="We need a power modulo a number, which modular exponentiation computes exactly.",
    )


def gcd_lcm(rng: random.Random) -> Generated:
    g = rng.randint(2, 15)
    a, b = g * rng.randint(2, 30), g * rng.randint(2, 30)
    return Generated(
        problem=f"Find $\\gcd({a}, {b}) + \\operatorname{{lcm}}({a}, {b})$.",
        answer=math.gcd(a, b) + math.lcm(a, b),
        code=f"import math\n\nprint(math.gcd({a}, {b}) + math.lcm({a}, {b}))",
        lead="Let's compute the greatest common divisor and the least common multiple.",
    )


def digit_sum_power(rng: random.Random) -> Generated:
    base, e = rng.choice([2, 3, 5, 7, 11]), rng.randint(10, 60)
    return Generated(
        problem=f"What is the sum of the digits of ${base}^{{{e}}}$?",
        answer=sum(int(ch) for ch in str(base**e)),
        code=f"n = {base}**{e}\nprint(sum(int(d) for d in str(n)))",
        lead="The number is large, so let's expand it and add its digits.",
    )


def arithmetic_series(rng: random.Random) -> Generated:
    a, d, n = rng.randint(-20, 50), rng.randint(2, 12), rng.randint(10, 60)
    return Generated(
        problem=(
            f"An arithmetic sequence has first term ${a}$ and common difference ${d}$. "
            f"What is the sum of its first ${n}$ terms?"
        ),
        answer=n * (2 * a + (n - 1) * d) // 2,
        code=f"a, d, n = {a}, {d}, {n}\nprint(sum(a + k * d for k in range(n)))",
        lead="The sum of an arithmetic sequence is the number of terms times the average of the first and last terms.",
    )


def binomial(rng: random.Random) -> Generated:
    n = rng.randint(8, 25)
    k = rng.randint(2, n - 2)
    return Generated(
        problem=f"In how many ways can a committee of ${k}$ people be chosen from a group of ${n}$ people?",
        answer=math.comb(n, k),
        code=f"import math\n\nprint(math.comb({n}, {k}))",
        lead=f"The order does not matter, so the count is the binomial coefficient $\\binom{{{n}}}{{{k}}}$.",
    )


def fraction_sum(rng: random.Random) -> Generated:
    a, b, c = rng.sample(range(2, 30), 3)
    value = Fraction(1, a) + Fraction(1, b) - Fraction(1, c)
    return Generated(
        problem=(
            f"Compute $\\frac{{1}}{{{a}}} + \\frac{{1}}{{{b}}} - \\frac{{1}}{{{c}}}$. "
            "Express your answer as a common fraction."
        ),
        answer=value,
        code=f"from fractions import Fraction\n\nprint(Fraction(1, {a}) + Fraction(1, {b}) - Fraction(1, {c}))",
        lead="Let's add the fractions exactly with rational arithmetic.",
    )


def sum_of_squares(rng: random.Random) -> Generated:
    n = rng.randint(10, 99)
    return Generated(
        problem=f"Find the value of $1^2 + 2^2 + 3^2 + \\cdots + {n}^2$.",
        answer=n * (n + 1) * (2 * n + 1) // 6,
        code=f"print(sum(k * k for k in range(1, {n} + 1)))",
        lead="We can add the squares one by one to be safe.",
    )


def divisor_count(rng: random.Random) -> Generated:
    n = rng.randint(100, 5000)
    return Generated(
        problem=f"How many positive divisors does ${n}$ have?",
        answer=sum(1 for k in range(1, n + 1) if n % k == 0),
        code=f"n = {n}\nprint(sum(1 for k in range(1, n + 1) if n % k == 0))",
        lead="Let's count the divisors by checking every candidate.",
    )


FAMILIES: list[Callable[[random.Random], Generated]] = [
    arithmetic,
    modular_power,
    gcd_lcm,
    digit_sum_power,
    arithmetic_series,
    binomial,
    fraction_sum,
    sum_of_squares,
    divisor_count,
]

# ---------------------------------------------------------------------------------------------- assembly


def run_code(code: str) -> str:
    """Run a family's own (trusted) program and return what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<family>", "exec"), {"__name__": "__main__"})
    return buf.getvalue()


def reference_solution(gen: Generated) -> str:
    """An OpenMath-style tool-integrated solution (NeMo-Skills `openmath` code tags)."""
    output = run_code(gen.code)
    answer = format_answer(gen.answer)
    return (
        f"{gen.lead} Here's a Python code to compute it:\n\n"
        f"<tool_call>\n{gen.code}\n</tool_call>\n```output\n{output}```\n"
        f"The code prints {output.strip()}, so the answer is $\\boxed{{{answer}}}$."
    )


def check(gen: Generated, family: str) -> None:
    printed = run_code(gen.code).strip()
    if printed != str(gen.answer):
        raise AssertionError(f"family {family}: program printed {printed!r}, answer is {gen.answer!r}")


def generate_records(seed: int = SEED, split_sizes: dict[str, int] | None = None) -> list[dict]:
    """Unique problems, drawn round-robin over families; splits never share a problem text."""
    split_sizes = dict(SPLIT_SIZES if split_sizes is None else split_sizes)
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    turn = 0
    for split, size in split_sizes.items():
        for index in range(size):
            family = FAMILIES[turn % len(FAMILIES)]
            turn += 1
            for _ in range(1000):
                gen = family(rng)
                if gen.problem not in seen:
                    break
            else:  # pragma: no cover - a family with too few distinct problems
                raise RuntimeError(f"family {family.__name__} keeps repeating problems")
            seen.add(gen.problem)
            check(gen, family.__name__)
            records.append(
                {
                    "id": f"tiny-{split}-{index:03d}",
                    "problem": gen.problem,
                    "expected_answer": format_answer(gen.answer),
                    "split": split,
                    "source": f"mathforge-synthetic/{family.__name__}",
                    "reference_solution": reference_solution(gen),
                }
            )
    return records


def sample_texts(seed: int, count: int) -> list[tuple[str, str]]:
    """`count` (problem, reference solution) pairs from a separate seed: extra text for tokenizer training."""
    rng = random.Random(seed)
    out = []
    for turn in range(count):
        family = FAMILIES[turn % len(FAMILIES)]
        gen = family(rng)
        out.append((gen.problem, reference_solution(gen)))
    return out


def render_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mathforge.data.problem_gen", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=TINY_PROBLEMS_FILE)
    parser.add_argument(
        "--check", action="store_true", help="verify the file matches the generator; write nothing"
    )
    args = parser.parse_args(argv)
    text = render_jsonl(generate_records())
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} is stale: run `python -m mathforge.data.problem_gen`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({text.count(chr(10))} problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
