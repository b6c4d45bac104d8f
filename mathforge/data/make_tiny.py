"""Build the skeleton of the embedded `tiny` checkpoint: tokenizer, config and a seeded random initialisation.

`python -m mathforge.data.make_tiny [--out DIR] [--check]` writes config.json, generation_config.json,
tokenizer.json, tokenizer_config.json and model.safetensors (random bf16 weights, the starting point of
training) in the standard HF layout. The shipped `mathforge/data/tiny_model/` holds the same four
configuration files with TRAINED weights (`python -m mathforge.train`, see tiny_model/README.md). The same
code, seed and library versions give byte-identical configuration files: `--check` rebuilds into a temporary
directory and compares them (not the weights, not the model card) with the shipped ones.

The tokenizer is a Qwen2-style byte-level BPE (Qwen2's pre-tokenizer regex: digits split one by one,
NFC normalisation) trained on the project's own math text — the shipped problems, more problems from the
same families and their tool-integrated solutions, the prompt texts — with the ChatML tokens and the
OpenMath tool tokens added after the learned vocabulary, as in Qwen2.5: `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` (special) and `<tool_call>`, `</tool_call>` (added, not special, so they survive
`skip_special_tokens=True` decoding and stop strings can see them). eos is `<|im_end|>`;
generation_config lists `<|im_end|>` and `<|endoftext|>`.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent / "tiny_model"
SEED = 1234
VOCAB_SIZE = 1024  # learned BPE vocabulary + the 5 added tokens (asserted: the corpus must be rich enough)
MAX_POSITIONS = 4096

MODEL_SHAPE = {  # ~6.8 M parameters, 13.7 MB in bf16: fast on a CPU, enough for the synthetic families
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
}
# what `--check` compares: everything but the weights (trained, not built here) and the model card
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")

ENDOFTEXT, IM_START, IM_END, TOOL_CALL, TOOL_CALL_END = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
)
ADDED_TOKENS = [  # (content, special) in id order, after the learned vocabulary
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    (TOOL_CALL, False),
    (TOOL_CALL_END, False),
]

# ChatML, no default system message (only what the caller sends)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split pattern
QWEN2_SPLIT_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def training_corpus() -> list[str]:
    """The tokenizer's training text: deterministic, built from the project's own problem families."""
    from mathforge.data.problem_gen import draw_shipped, sample_texts
    from mathforge.data.prompts import chat_messages

    texts: list[str] = [gen.problem for _, _, gen in draw_shipped()]
    for problem, solution in sample_texts(seed=SEED, count=1800):
        for tools in (False, True):
            for msg in chat_messages(problem, tools=tools, response=solution):
                texts.append(msg["content"])
    texts.extend(_prose())
    return texts


def _prose() -> list[str]:
    """General math and Python phrasing the families do not cover, so common words get their own tokens."""
    lines = [
        "Let's think step by step. First, we simplify the expression. Then we check the result.",
        "Therefore, the final answer is the number we found above.",
        "We can verify this with a quick computation in Python.",
        "The code confirms our reasoning, so we are done.",
        "Suppose that x is a positive integer such that the equation holds.",
        "Note that the sum of two even numbers is even, and the product of two odd numbers is odd.",
        "Hence the probability is the number of favourable outcomes divided by the total number of outcomes.",
        "Let $f(x) = x^2 + 3x + 2$. Then $f(x) = (x + 1)(x + 2)$, so the roots are $-1$ and $-2$.",
        "The triangle has sides $3$, $4$ and $5$, so it is a right triangle with area $6$.",
        "A circle of radius $r$ has circumference $2\\pi r$ and area $\\pi r^2$.",
        "The polynomial has real coefficients, so its complex roots come in conjugate pairs.",
        "By the Pythagorean theorem, the hypotenuse squared equals the sum of the squares of the legs.",
        "Consider the function defined for all real numbers; it is increasing on the interval.",
        "Each integer greater than one is either prime or a product of primes, uniquely up to order.",
        "By symmetry, the expected value equals the average of the smallest and largest outcomes.",
        "We substitute the known values into the formula and solve the resulting linear equation.",
        "The matrix is invertible because its determinant is nonzero.",
        "Using the inclusion-exclusion principle, we subtract the overlap counted twice.",
        "Since the sequence is geometric with ratio $r$, the sum of the first $n$ terms is $a(r^n - 1)/(r - 1)$.",
        "The number of arrangements of the letters of the word is a multinomial coefficient.",
        "Let $a$, $b$ and $c$ be the lengths of the sides opposite the angles $A$, $B$ and $C$.",
        "Without loss of generality, assume the first coordinate is positive.",
        "The minimum occurs at the vertex of the parabola, where the derivative vanishes.",
        "Divide both sides by the common factor and simplify the fraction to lowest terms.",
        "The remainder of a power modulo a prime follows from Fermat's little theorem.",
        "Taking logarithms of both sides turns the exponential equation into a linear one.",
        "The inequality follows from the arithmetic mean - geometric mean inequality.",
        "Count the cases separately: exactly one, exactly two, or all three conditions hold.",
        "The answer must be an integer between zero and nine hundred ninety-nine inclusive.",
        "We compute the greatest common divisor with the Euclidean algorithm.",
        "Simplifying, we get a quadratic equation whose discriminant must be a perfect square.",
        "The probability that both events happen is the product of their probabilities when they are independent.",
        "def solve():\n    total = 0\n    for i in range(1, 101):\n        if i % 3 == 0 or i % 5 == 0:\n            total += i\n    return total\n\nprint(solve())",
        "import sympy as sp\n\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))",
        "from itertools import permutations, combinations, product\n\ncount = sum(1 for p in permutations(range(5)) if p[0] != 0)\nprint(count)",
        "result = [n for n in range(2, 50) if all(n % d for d in range(2, n))]\nprint(len(result), result)",
        "import numpy as np\n\nvalues = np.array([1, 2, 3])\nprint(values.sum(), values.mean())",
        "while True:\n    n += 1\n    if is_valid(n):\n        break\nelse:\n    pass",
        "from math import sqrt, floor, ceil, factorial, isqrt\n\nprint(isqrt(1000), factorial(10))",
        "Traceback (most recent call last):\nNameError: name 'y' is not defined",
        "ZeroDivisionError: division by zero",
    ]
    return lines * 20


def build_tokenizer(corpus: list[str]):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    if tok.get_vocab_size() != VOCAB_SIZE - len(ADDED_TOKENS):
        raise RuntimeError(
            f"BPE learned {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE - len(ADDED_TOKENS)}: enrich training_corpus()"
        )
    # added after the learned vocabulary, in ADDED_TOKENS order (ids learned+0 .. learned+4)
    for content, special in ADDED_TOKENS:
        token = AddedToken(
            content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False
        )
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


def tokenizer_config(tok) -> dict:
    added = {
        str(tok.token_to_id(content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": MAX_POSITIONS,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out_dir: Path, *, weights: bool = True) -> Path:
    """Write the tiny checkpoint's files into `out_dir` (created; existing ones are replaced); random bf16
    weights too unless `weights=False` (then only CONFIG_FILES)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(training_corpus())
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok))

    vocab = tok.get_vocab_size(with_added_tokens=True)
    eot, im_end = tok.token_to_id(ENDOFTEXT), tok.token_to_id(IM_END)
    config = Qwen2Config(
        vocab_size=vocab,
        **MODEL_SHAPE,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=MODEL_SHAPE["num_hidden_layers"],
        attention_dropout=0.0,
        use_cache=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        dtype="bfloat16",
    )
    config.architectures = ["Qwen2ForCausalLM"]

    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if weights:
            shutil.copyfile(Path(tmp) / "model.safetensors", out_dir / "model.safetensors")
        cfg = json.loads((Path(tmp) / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    cfg["dtype"] = "bfloat16"
    # transformers 4.x (TensorRT-LLM, vLLM) read these top-level keys; 5.x writes `dtype` and `rope_parameters`
    cfg["torch_dtype"] = "bfloat16"
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 1000000.0)
    _write_json(out_dir / "config.json", cfg)
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": eot,
            "eos_token_id": [im_end, eot],
            "pad_token_id": eot,
            "transformers_version": cfg.get("transformers_version", ""),
        },
    )
    return out_dir


def verify(out_dir: Path) -> dict:
    """Load with transformers and check the contract other parts rely on; returns a short description."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", text
    assert tok.eos_token == IM_END
    for t in (IM_START, IM_END, ENDOFTEXT, TOOL_CALL, TOOL_CALL_END):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.dtype == torch.bfloat16, model.dtype
    params = sum(p.numel() for p in model.parameters())
    return {
        "vocab_size": model.config.vocab_size,
        "params": params,
        "safetensors_bytes": (out_dir / "model.safetensors").stat().st_size,
        **MODEL_SHAPE,
    }


def compare_dirs(a: Path, b: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """Names of files that differ (or exist on one side only); only `names` when given."""
    if names is None:
        names = tuple(sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}))
    return [
        n
        for n in names
        if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mathforge.data.make_tiny", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temp dir; compare the configuration files with --out",
    )
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), weights=False)
            diff = compare_dirs(Path(tmp), args.out, CONFIG_FILES)
        if diff:
            print(f"{args.out} differs from a fresh build: {', '.join(diff)}", file=sys.stderr)
            return 1
        print(f"{args.out}: {', '.join(CONFIG_FILES)} match a fresh build")
        return 0
    build(args.out)
    info = verify(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
