"""Seeded generator of synthetic math problems with exact answers and tool-integrated reference solutions.

Each family is one function `(rng: random.Random) -> Generated`: the problem statement, the exact answer
(an `int` or a `Fraction`, computed in Python here) and a short program that prints it. The reference
solution is OpenMath TIR style (NeMo-Skills' `openmath` code tags): a sentence of reasoning, the program in
`<tool_call>` tags, the program's real output as a fenced `output` block, the answer in `\\boxed{}`. The output
block is what the program printed when it ran in `mathforge sandbox` (the same server and ipython shell the
evaluation uses), and a family whose printed output disagrees with its exact answer is an error.

    python -m mathforge.data.problem_gen             # rewrite mathforge/data/problems/tiny.jsonl
    python -m mathforge.data.problem_gen --check     # verify the shipped file is what the generator gives
    python -m mathforge.data.problem_gen --train 1000 --out train.jsonl   # a training set (see below)

Splits: the shipped file holds `calibration`, `validation` and `test`, drawn in that order from one seed,
round-robin over the families, never repeating a problem text. Training sets (`training_records`) come from
other seeds and skip every shipped problem, so no split shares a problem with another. The large training
set is not shipped: the training flow builds it (tasks/train.py).

Adding a family: write the function and append it to `FAMILIES`. That changes which problems are drawn,
so regenerate the shipped file and say so in the change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mathforge.data.problems import TINY_PROBLEMS_FILE

SEED = 20250601
SPLIT_SIZES = {"calibration": 40, "validation": 48, "test": 48}  # drawn in this order
TRAIN_SEED = 7_000_001  # training sets: seeds from here on, never SEED
MAX_REDRAWS = 60  # a family that repeats itself this often in a row is skipped for that turn


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


def printed_form(answer: int | Fraction) -> str:
    """What `print(answer)` shows."""
    return str(answer)


# ---------------------------------------------------------------------------------------------- families


def arithmetic(rng: random.Random) -> Generated:
    a, b, c, d = rng.randint(12, 99), rng.randint(12, 99), rng.randint(100, 999), rng.randint(2, 9)
    return Generated(
        problem=f"Compute $({a} \\times {b} - {c}) \\times {d}$.",
        answer=(a * b - c) * d,
        code=f"print(({a} * {b} - {c}) * {d})",
        lead="Let's evaluate the expression directly.",
    )


def big_arithmetic(rng: random.Random) -> Generated:
    a = rng.randint(10**7, 10**11)
    b = rng.randint(10**7, 10**11)
    c = rng.randint(1000, 99999)
    op = rng.choice(["+", "-"])
    return Generated(
        problem=f"Compute ${a} \\times {b} {op} {c}$.",
        answer=a * b + c if op == "+" else a * b - c,
        code=f"print({a} * {b} {op} {c})",
        lead="The numbers are large, so let's multiply them exactly with Python's integers.",
    )


def modular_power(rng: random.Random) -> Generated:
    a, e, m = rng.randint(2, 99), rng.randint(20, 999), rng.randint(7, 999)
    return Generated(
        problem=f"What is the remainder when ${a}^{{{e}}}$ is divided by ${m}$?",
        answer=pow(a, e, m),
        code=f"print(pow({a}, {e}, {m}))",
        lead="We need a power modulo a number, which modular exponentiation computes exactly.",
    )


def gcd_lcm(rng: random.Random) -> Generated:
    g = rng.randint(2, 40)
    a, b = g * rng.randint(2, 60), g * rng.randint(2, 60)
    return Generated(
        problem=f"Find $\\gcd({a}, {b}) + \\operatorname{{lcm}}({a}, {b})$.",
        answer=math.gcd(a, b) + math.lcm(a, b),
        code=f"import math\n\nprint(math.gcd({a}, {b}) + math.lcm({a}, {b}))",
        lead="Let's compute the greatest common divisor and the least common multiple.",
    )


def digit_sum_power(rng: random.Random) -> Generated:
    base, e = rng.randint(2, 30), rng.randint(10, 200)
    return Generated(
        problem=f"What is the sum of the digits of ${base}^{{{e}}}$?",
        answer=sum(int(ch) for ch in str(base**e)),
        code=f"n = {base}**{e}\nprint(sum(int(d) for d in str(n)))",
        lead="The number is large, so let's expand it and add its digits.",
    )


def digit_sum_factorial(rng: random.Random) -> Generated:
    n = rng.randint(10, 999)
    return Generated(
        problem=f"What is the sum of the digits of ${n}!$?",
        answer=sum(int(ch) for ch in str(math.factorial(n))),
        code=f"import math\n\nprint(sum(int(d) for d in str(math.factorial({n}))))",
        lead="The factorial is huge, so let's compute it exactly and add its digits.",
    )


def arithmetic_series(rng: random.Random) -> Generated:
    a, d, n = rng.randint(-50, 99), rng.randint(2, 30), rng.randint(10, 150)
    return Generated(
        problem=(
            f"An arithmetic sequence has first term ${a}$ and common difference ${d}$. "
            f"What is the sum of its first ${n}$ terms?"
        ),
        answer=n * (2 * a + (n - 1) * d) // 2,
        code=f"a, d, n = {a}, {d}, {n}\nprint(sum(a + k * d for k in range(n)))",
        lead="The sum of an arithmetic sequence is the number of terms times the average of the first and last terms.",
    )


def geometric_series(rng: random.Random) -> Generated:
    a, r, n = rng.randint(1, 20), rng.randint(2, 9), rng.randint(5, 30)
    return Generated(
        problem=(
            f"A geometric sequence has first term ${a}$ and common ratio ${r}$. "
            f"What is the sum of its first ${n}$ terms?"
        ),
        answer=sum(a * r**k for k in range(n)),
        code=f"a, r, n = {a}, {r}, {n}\nprint(sum(a * r**k for k in range(n)))",
        lead="Let's add the terms of the geometric sequence exactly.",
    )


def binomial(rng: random.Random) -> Generated:
    n = rng.randint(8, 99)
    k = rng.randint(2, n - 2)
    return Generated(
        problem=f"In how many ways can a committee of ${k}$ people be chosen from a group of ${n}$ people?",
        answer=math.comb(n, k),
        code=f"import math\n\nprint(math.comb({n}, {k}))",
        lead=f"The order does not matter, so the count is the binomial coefficient $\\binom{{{n}}}{{{k}}}$.",
    )


def arrangements(rng: random.Random) -> Generated:
    n = rng.randint(5, 80)
    k = rng.randint(2, min(n, 12))
    return Generated(
        problem=f"In how many ways can ${k}$ of ${n}$ different books be placed in a row on a shelf?",
        answer=math.perm(n, k),
        code=f"import math\n\nprint(math.perm({n}, {k}))",
        lead="The order matters, so we count the permutations of the chosen books.",
    )


def stars_and_bars(rng: random.Random) -> Generated:
    k, n = rng.randint(2, 9), rng.randint(5, 150)
    return Generated(
        problem=(
            f"How many solutions in nonnegative integers does $x_1 + x_2 + \\cdots + x_{{{k}}} = {n}$ have?"
        ),
        answer=math.comb(n + k - 1, k - 1),
        code=f"import math\n\nn, k = {n}, {k}\nprint(math.comb(n + k - 1, k - 1))",
        lead="By stars and bars, the count is a binomial coefficient.",
    )


def fraction_sum(rng: random.Random) -> Generated:
    a, b, c = rng.sample(range(2, 60), 3)
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


def power_sum(rng: random.Random) -> Generated:
    n, p = rng.randint(10, 999), rng.choice([2, 3, 4])
    return Generated(
        problem=f"Find the value of $1^{p} + 2^{p} + 3^{p} + \\cdots + {n}^{p}$.",
        answer=sum(k**p for k in range(1, n + 1)),
        code=f"print(sum(k**{p} for k in range(1, {n} + 1)))",
        lead="We can add the powers one by one to be safe.",
    )


def divisor_count(rng: random.Random) -> Generated:
    n = rng.randint(100, 30000)
    return Generated(
        problem=f"How many positive divisors does ${n}$ have?",
        answer=sum(1 for k in range(1, n + 1) if n % k == 0),
        code=f"n = {n}\nprint(sum(1 for k in range(1, n + 1) if n % k == 0))",
        lead="Let's count the divisors by checking every candidate.",
    )


def divisor_sum(rng: random.Random) -> Generated:
    n = rng.randint(100, 30000)
    return Generated(
        problem=f"What is the sum of all positive divisors of ${n}$?",
        answer=sum(k for k in range(1, n + 1) if n % k == 0),
        code=f"n = {n}\nprint(sum(k for k in range(1, n + 1) if n % k == 0))",
        lead="Let's add up every divisor by checking each candidate.",
    )


def base_divisibility(rng: random.Random) -> Generated:
    """AIME 2025 I #1 style: bases b > k where (p1 p0)_b divides (q1 q0)_b. Always finitely many, >= 1."""
    while True:
        p1, p0, q1, q0 = rng.randint(1, 9), rng.randint(0, 9), rng.randint(1, 9), rng.randint(0, 9)
        k = rng.randint(max(p1, p0, q1, q0), 12)
        d = abs(p1 * q0 - q1 * p0)
        if d == 0:
            continue
        bases = [b for b in range(k + 1, d + 1) if (q1 * b + q0) % (p1 * b + p0) == 0]
        if bases:
            break
    return Generated(
        problem=(
            f"Find the sum of all integer bases $b > {k}$ for which ${p1}{p0}_b$ is a divisor of ${q1}{q0}_b$."
        ),
        answer=sum(bases),
        code=(
            "total = 0\n"
            f"for b in range({k + 1}, 1000):\n"
            f"    if ({q1} * b + {q0}) % ({p1} * b + {p0}) == 0:\n"
            "        total += b\n"
            "print(total)"
        ),
        lead=(
            f"In base $b$, ${p1}{p0}_b = {p1}b + {p0}$ and ${q1}{q0}_b = {q1}b + {q0}$; "
            "only finitely many bases work, so let's test them."
        ),
    )


def base_to_decimal(rng: random.Random) -> Generated:
    base = rng.randint(2, 9)
    digits = [rng.randint(1, base - 1)] + [rng.randint(0, base - 1) for _ in range(rng.randint(3, 9))]
    text = "".join(map(str, digits))
    return Generated(
        problem=f"Express ${text}_{{{base}}}$ in base $10$.",
        answer=int(text, base),
        code=f"print(int('{text}', {base}))",
        lead=f"Each digit is multiplied by a power of ${base}$; Python can convert the numeral directly.",
    )


def count_primes(rng: random.Random) -> Generated:
    n = rng.randint(20, 50000)
    sieve = [True] * n
    sieve[0:2] = [False, False][:n]
    for i in range(2, math.isqrt(n - 1) + 1):
        if sieve[i]:
            sieve[i * i :: i] = [False] * len(sieve[i * i :: i])
    return Generated(
        problem=f"How many prime numbers are less than ${n}$?",
        answer=sum(sieve),
        code=(
            f"n = {n}\n"
            "sieve = [True] * n\n"
            "sieve[0] = sieve[1] = False\n"
            "for i in range(2, int(n**0.5) + 1):\n"
            "    if sieve[i]:\n"
            "        for j in range(i * i, n, i):\n"
            "            sieve[j] = False\n"
            "print(sum(sieve))"
        ),
        lead="Let's count the primes with the sieve of Eratosthenes.",
    )


def linear_diophantine(rng: random.Random) -> Generated:
    while True:
        a, b, n = rng.randint(2, 19), rng.randint(2, 19), rng.randint(40, 2000)
        count = sum(1 for x in range(1, n // a + 1) if n - a * x > 0 and (n - a * x) % b == 0)
        if count:
            break
    return Generated(
        problem=f"How many ordered pairs of positive integers $(x, y)$ satisfy ${a}x + {b}y = {n}$?",
        answer=count,
        code=(
            "count = 0\n"
            f"for x in range(1, {n} // {a} + 1):\n"
            f"    r = {n} - {a} * x\n"
            f"    if r > 0 and r % {b} == 0:\n"
            "        count += 1\n"
            "print(count)"
        ),
        lead="For each positive $x$ we check whether the remaining part gives a positive integer $y$.",
    )


_PRIMES_11_TO_400 = [p for p in range(11, 400) if all(p % q for q in range(2, math.isqrt(p) + 1))]


def linear_congruence(rng: random.Random) -> Generated:
    m = rng.choice(_PRIMES_11_TO_400)
    a, c = rng.randint(2, m - 1), rng.randint(1, m - 1)
    return Generated(
        problem=f"Find the smallest positive integer $x$ such that ${a}x \\equiv {c} \\pmod{{{m}}}$.",
        answer=c * pow(a, -1, m) % m,
        code=f"print(next(x for x in range(1, {m} + 1) if ({a} * x - {c}) % {m} == 0))",
        lead="The modulus is prime, so there is exactly one solution modulo it; let's search for it.",
    )


def _poly(coeffs: Sequence[int]) -> tuple[str, str]:
    """LaTeX and Python for sum(c_i x^i), highest degree first (coeffs[0] is the leading one)."""
    degree = len(coeffs) - 1
    tex, py = [], []
    for i, c in enumerate(coeffs):
        power = degree - i
        if c == 0:
            continue
        sign = "-" if c < 0 else "+"
        mag = abs(c)
        if power == 0:
            t, p = str(mag), str(mag)
        else:
            xt = "x" if power == 1 else f"x^{power}"
            xp = "x" if power == 1 else f"x**{power}"
            t = xt if mag == 1 else f"{mag}{xt}"
            p = xp if mag == 1 else f"{mag} * {xp}"
        if not tex:
            tex.append(t if sign == "+" else f"-{t}")
            py.append(p if sign == "+" else f"-{p}")
        else:
            tex.append(f"{sign} {t}")
            py.append(f"{sign} {p}")
    return " ".join(tex), " ".join(py)


def polynomial_value(rng: random.Random) -> Generated:
    degree = rng.randint(2, 5)
    coeffs = [rng.choice([c for c in range(-9, 10) if c])] + [rng.randint(-9, 9) for _ in range(degree)]
    x = rng.choice([v for v in range(-20, 31) if v not in (0, 1)])
    tex, py = _poly(coeffs)
    value = sum(c * x ** (degree - i) for i, c in enumerate(coeffs))
    return Generated(
        problem=f"Let $p(x) = {tex}$. What is $p({x})$?",
        answer=value,
        code=f"def p(x):\n    return {py}\n\nprint(p({x}))",
        lead="Let's substitute the value into the polynomial.",
    )


def multiples_count(rng: random.Random) -> Generated:
    a, b = rng.sample(range(2, 30), 2)
    n = rng.randint(100, 20000)
    return Generated(
        problem=f"How many integers from $1$ to ${n}$ are divisible by ${a}$ or ${b}$?",
        answer=sum(1 for k in range(1, n + 1) if k % a == 0 or k % b == 0),
        code=f"print(sum(1 for k in range(1, {n} + 1) if k % {a} == 0 or k % {b} == 0))",
        lead="By inclusion-exclusion we could count this by hand, but a direct count is safest.",
    )


def trailing_zeros(rng: random.Random) -> Generated:
    n = rng.randint(10, 100000)
    count, m = 0, n
    while m:
        m //= 5
        count += m
    return Generated(
        problem=f"How many zeros does ${n}!$ end with?",
        answer=count,
        code=f"n, count = {n}, 0\nwhile n:\n    n //= 5\n    count += n\nprint(count)",
        lead="Each trailing zero needs a factor $10 = 2 \\cdot 5$, and factors of $5$ are the rarer, so we count them.",
    )


def fibonacci_mod(rng: random.Random) -> Generated:
    n, m = rng.randint(10, 2000), rng.randint(7, 9999)
    a, b = 1, 1
    for _ in range(n - 2):
        a, b = b, a + b
    return Generated(
        problem=(
            "The Fibonacci numbers are $F_1 = F_2 = 1$ and $F_n = F_{n-1} + F_{n-2}$. "
            f"What is the remainder when $F_{{{n}}}$ is divided by ${m}$?"
        ),
        answer=b % m,
        code=(f"a, b = 1, 1\nfor _ in range({n} - 2):\n    a, b = b, a + b\nprint(b % {m})"),
        lead="Let's iterate the recurrence with exact integers.",
    )


def digit_sum_count(rng: random.Random) -> Generated:
    while True:
        n, s = rng.randint(100, 5000), rng.randint(2, 30)
        count = sum(1 for k in range(1, n) if sum(int(ch) for ch in str(k)) == s)
        if count:
            break
    return Generated(
        problem=f"How many positive integers less than ${n}$ have digits that add up to ${s}$?",
        answer=count,
        code=f"print(sum(1 for k in range(1, {n}) if sum(int(d) for d in str(k)) == {s}))",
        lead="Let's check the digit sum of every number in the range.",
    )


def lcm_range(rng: random.Random) -> Generated:
    lo = rng.randint(1, 20)
    hi = rng.randint(lo + 4, 60)
    return Generated(
        problem=f"What is the least common multiple of all integers from ${lo}$ to ${hi}$?",
        answer=math.lcm(*range(lo, hi + 1)),
        code=f"import math\n\nprint(math.lcm(*range({lo}, {hi} + 1)))",
        lead="Let's take the least common multiple of the whole range at once.",
    )


FAMILIES: list[Callable[[random.Random], Generated]] = [
    arithmetic,
    modular_power,
    gcd_lcm,
    digit_sum_power,
    arithmetic_series,
    binomial,
    fraction_sum,
    power_sum,
    divisor_count,
    big_arithmetic,
    base_divisibility,
    digit_sum_factorial,
    count_primes,
    linear_diophantine,
    polynomial_value,
    linear_congruence,
    geometric_series,
    stars_and_bars,
    multiples_count,
    trailing_zeros,
    base_to_decimal,
    fibonacci_mod,
    divisor_sum,
    arrangements,
    digit_sum_count,
    lcm_range,
]

# ---------------------------------------------------------------------------------------------- execution

Executor = Callable[[Sequence[str]], list[str]]


async def _execute_async(
    programs: Sequence[str],
    url: str,
    lanes: int,
    timeout: float,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    from mathforge.solve.sandbox_client import SandboxClient, new_session_id

    outputs: list[str | None] = [None] * len(programs)
    done = [0]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(programs)):
        queue.put_nowait(i)

    async with SandboxClient(url) as sandbox:

        async def lane() -> None:
            # one ipython session per lane, as the evaluation runs code; every program is self-contained and
            # its printed result is checked against the exact answer, so state left by a previous cell cannot
            # go unnoticed. A fresh session every few hundred cells keeps the worker small.
            session, used = new_session_id(), 0
            try:
                while not queue.empty():
                    i = queue.get_nowait()
                    if used >= 200:
                        await sandbox.delete_session(session)
                        session, used = new_session_id(), 0
                    out = await sandbox.execute(programs[i], session_id=session, timeout=timeout)
                    used += 1
                    if out.get("process_status") != "completed" or out.get("stderr"):
                        raise RuntimeError(f"sandbox failed on program {i}:\n{programs[i]}\n-> {out}")
                    outputs[i] = out.get("stdout") or ""
                    done[0] += 1
                    if progress is not None and (done[0] % 5000 == 0 or done[0] == len(programs)):
                        progress(done[0], len(programs))
            finally:
                await sandbox.delete_session(session)

        await asyncio.gather(*(lane() for _ in range(max(1, min(lanes, len(programs))))))
    return [o if o is not None else "" for o in outputs]


def sandbox_executor(
    url: str | None = None,
    *,
    lanes: int = 4,
    timeout: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> Executor:
    """Run programs in `mathforge sandbox` at `url` (or in one started for the call); `progress(done, total)`
    is called every 5000 programs."""

    def run(programs: Sequence[str]) -> list[str]:
        if not programs:
            return []
        if url is not None:
            return asyncio.run(_execute_async(programs, url, lanes, timeout, progress))
        from mathforge.sandbox import SandboxProcess

        with SandboxProcess(args=["--max-workers", str(lanes)]) as sb:
            return asyncio.run(_execute_async(programs, sb.url, lanes, timeout, progress))

    return run


# ---------------------------------------------------------------------------------------------- assembly


def reference_solution(gen: Generated, output: str) -> str:
    """An OpenMath-style tool-integrated solution around the program's real `output`."""
    answer = format_answer(gen.answer)
    return (
        f"{gen.lead} Here's a Python code to compute it:\n\n"
        f"<tool_call>\n{gen.code}\n</tool_call>\n```output\n{output}```\n"
        f"The code prints {output.strip()}, so the answer is $\\boxed{{{answer}}}$."
    )


def draw(
    rng: random.Random,
    count: int,
    seen: set[str],
    start_turn: int = 0,
    families: Sequence[Callable[[random.Random], Generated]] = FAMILIES,
) -> list[tuple[str, Generated]]:
    """`count` new problems, round-robin over `families`, none of whose text is in `seen` (updated)."""
    out: list[tuple[str, Generated]] = []
    active = list(families)
    turn = start_turn
    while len(out) < count:
        if not active:
            raise RuntimeError(f"the families cannot give {count} distinct problems")
        family = active[turn % len(active)]
        turn += 1
        for _ in range(MAX_REDRAWS):
            gen = family(rng)
            if gen.problem not in seen:
                seen.add(gen.problem)
                out.append((family.__name__, gen))
                break
        else:  # this family has (nearly) run out of new problems: leave it out of this draw from now on
            active.remove(family)
    return out


def _records(
    drawn: Sequence[tuple[str, Generated]], splits: Sequence[str], ids: Sequence[str], execute: Executor
) -> list[dict]:
    outputs = execute([gen.code for _, gen in drawn])
    records = []
    for (family, gen), split, rid, output in zip(drawn, splits, ids, outputs, strict=True):
        if output.strip() != printed_form(gen.answer):
            raise AssertionError(
                f"family {family}: the program printed {output.strip()!r} in the sandbox, the answer is {gen.answer!r}"
            )
        records.append(
            {
                "id": rid,
                "problem": gen.problem,
                "expected_answer": format_answer(gen.answer),
                "split": split,
                "source": f"mathforge-synthetic/{family}",
                "reference_solution": reference_solution(gen, output),
            }
        )
    return records


def draw_shipped(
    seed: int = SEED, split_sizes: dict[str, int] | None = None
) -> list[tuple[str, str, Generated]]:
    """(split, family, problem) of the shipped file, before anything runs."""
    sizes = dict(SPLIT_SIZES if split_sizes is None else split_sizes)
    rng, seen, turn, out = random.Random(seed), set(), 0, []
    for split, size in sizes.items():
        for family, gen in draw(rng, size, seen, start_turn=turn):
            out.append((split, family, gen))
        turn += size
    return out


def generate_records(
    seed: int = SEED, split_sizes: dict[str, int] | None = None, execute: Executor | None = None
) -> list[dict]:
    """The shipped splits: unique problems, round-robin over families, outputs from the sandbox."""
    drawn = draw_shipped(seed, split_sizes)
    counters: dict[str, int] = {}
    ids = []
    for split, _, _ in drawn:
        ids.append(f"tiny-{split}-{counters.get(split, 0):03d}")
        counters[split] = counters.get(split, 0) + 1
    return _records(
        [(f, g) for _, f, g in drawn], [s for s, _, _ in drawn], ids, execute or sandbox_executor()
    )


def shipped_problem_texts() -> set[str]:
    """Every problem text of the shipped splits (what a training set must never contain)."""
    return {gen.problem for _, _, gen in draw_shipped()}


def training_records(
    count: int,
    seed: int = TRAIN_SEED,
    *,
    split: str = "train",
    exclude: Iterable[str] | None = None,
    execute: Executor | None = None,
) -> list[dict]:
    """`count` training problems with sandbox-run solutions, disjoint from the shipped splits and `exclude`."""
    if seed == SEED:
        raise ValueError("training sets must not use the shipped file's seed")
    seen = shipped_problem_texts() | set(exclude or ())
    drawn = draw(random.Random(seed), count, seen)
    ids = [f"{split}-{seed}-{i:06d}" for i in range(count)]
    return _records(drawn, [split] * count, ids, execute or sandbox_executor())


def sample_texts(seed: int, count: int) -> list[tuple[str, str]]:
    """`count` (problem, solution) pairs for tokenizer training, without running anything: the output block
    holds what `print(answer)` shows, which is what the sandbox prints for every family."""
    rng = random.Random(seed)
    out = []
    for turn in range(count):
        gen = FAMILIES[turn % len(FAMILIES)](rng)
        out.append((gen.problem, reference_solution(gen, printed_form(gen.answer) + "\n")))
    return out


def render_jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mathforge.data.problem_gen", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=None, help=f"default: {TINY_PROBLEMS_FILE}")
    parser.add_argument(
        "--check", action="store_true", help="verify the file matches the generator; write nothing"
    )
    parser.add_argument(
        "--train", type=int, metavar="N", help="write N training problems instead (needs --out)"
    )
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed of a training set")
    parser.add_argument("--sandbox-url", help="a running `mathforge sandbox` (default: start one)")
    parser.add_argument("--lanes", type=int, default=4, help="programs running at once in the sandbox")
    args = parser.parse_args(argv)
    execute = sandbox_executor(args.sandbox_url, lanes=args.lanes)
    if args.train is not None:
        if args.out is None:
            parser.error("--train needs --out")
        text = render_jsonl(training_records(args.train, args.seed, execute=execute))
    else:
        text = render_jsonl(generate_records(execute=execute))
    out = args.out or TINY_PROBLEMS_FILE
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != text:
            print(f"{out} is stale: run `python -m mathforge.data.problem_gen`", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({text.count(chr(10))} problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
