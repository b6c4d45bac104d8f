"""The embedded tiny model and problems, prompts, and calibration data."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathforge.data import calibration as calib
from mathforge.data import make_tiny, problem_gen
from mathforge.data.problems import TINY_PROBLEMS_FILE, Problem, load_problems
from mathforge.data.prompts import OPENMATH_CODE_TAGS, render_chat, render_chat_with_response
from mathforge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MATH_PREFIX = (
    "<|im_start|>user\nSolve the following math problem. Make sure to put the answer (and only answer) "
    "inside \\boxed{}.\n\n"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------------------ tiny model


def test_tiny_tokenizer_chat_template_and_special_tokens(tokenizer, tiny_model_dir):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) == 1024
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _special in make_tiny.ADDED_TOKENS}
    assert sorted(ids.values()) == list(range(1019, 1024))
    for token, tid in ids.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [tid]
    # tool tokens are added but not special: they survive skip_special_tokens (stop strings can see them)
    enc = tokenizer.encode(
        "<|im_start|>x<tool_call>\nprint(1)\n</tool_call><|im_end|>", add_special_tokens=False
    )
    assert tokenizer.decode(enc, skip_special_tokens=True) == "x<tool_call>\nprint(1)\n</tool_call>"
    # round trip of arbitrary text (byte-level BPE), digits split one by one like Qwen2
    sample = "Compute $12345 \\times 67$ — naïve 你好\n\t```output\n42\n```\n"
    assert tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False)) == sample
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]

    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert cfg["eos_token_id"] == ids["<|im_end|>"]


def test_tiny_model_config_and_forward(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == 1000000.0
    for key, value in make_tiny.MODEL_SHAPE.items():
        assert cfg[key] == value
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 6_824_192
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 25_000_000
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 1024)
    assert torch.isfinite(logits.float()).all()


def test_make_tiny_is_deterministic(tmp_path, tiny_model_dir):
    """Two builds (one in this process, one in a fresh one) are byte-identical; the shipped checkpoint has
    the same tokenizer and configuration (its weights are trained from that skeleton, not built here)."""
    make_tiny.build(tmp_path / "a")
    subprocess.run(
        [sys.executable, "-m", "mathforge.data.make_tiny", "--out", str(tmp_path / "b")],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert make_tiny.compare_dirs(tmp_path / "a", tmp_path / "b") == []
    assert make_tiny.compare_dirs(tmp_path / "a", tiny_model_dir, make_tiny.CONFIG_FILES) == []
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()


# ------------------------------------------------------------------------------------------ problems


def _value(answer: str) -> Fraction:
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    return Fraction(int(answer))


def test_tiny_problems_splits_and_answers():
    problems = load_problems("tiny")
    assert all(isinstance(p, Problem) for p in problems)
    cal, test = load_problems("tiny", "calibration"), load_problems("tiny", split="test")
    val = load_problems("tiny", "validation")
    assert (len(cal), len(val), len(test), len(problems)) == (40, 48, 48, 136)
    assert len({p.problem for p in problems}) == 136  # no split shares a problem
    assert len({p.id for p in problems}) == 136
    assert len(problem_gen.FAMILIES) >= 15
    assert len({p.source for p in test}) == len(problem_gen.FAMILIES)  # every family is tested
    for p in problems:
        code = p.reference_solution.split("<tool_call>\n", 1)[1].split("\n</tool_call>", 1)[0]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, {})
        assert Fraction(out.getvalue().strip()) == _value(p.expected_answer), p.id
        assert p.reference_solution.endswith(f"\\boxed{{{p.expected_answer}}}$.")
        assert "</tool_call>\n```output\n" in p.reference_solution  # OpenMath tags as on the wire


def test_shipped_problems_match_the_generator():
    """Regenerated with the outputs from a real `mathforge sandbox`: byte-identical to the shipped file."""
    assert TINY_PROBLEMS_FILE.read_text(encoding="utf-8") == problem_gen.render_jsonl(
        problem_gen.generate_records()
    )
    assert problem_gen.draw_shipped() == problem_gen.draw_shipped()


def test_training_records_come_from_the_sandbox_and_avoid_shipped_problems():
    calls = []

    def fake(programs):
        calls.append(len(programs))
        return ["0\n"] * len(programs)

    with pytest.raises(AssertionError, match="in the sandbox"):  # a wrong output is never written down
        problem_gen.training_records(5, execute=fake)
    with pytest.raises(ValueError, match="shipped file's seed"):
        problem_gen.training_records(5, seed=problem_gen.SEED, execute=fake)

    def local(programs):  # the same programs run in-process: what the sandbox prints for them
        outs = []
        for code in programs:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(code, {})
            outs.append(buf.getvalue())
        return outs

    recs = problem_gen.training_records(60, seed=5, execute=local)
    assert len({r["problem"] for r in recs}) == 60
    assert not {r["problem"] for r in recs} & problem_gen.shipped_problem_texts()
    assert {r["split"] for r in recs} == {"train"}
    assert len({r["source"] for r in recs}) == len(problem_gen.FAMILIES)


def test_load_problems_from_local_files(tmp_path):
    rows = [{"problem": "1+1?", "expected_answer": 2}, {"problem": "2+2?", "expected_answer": "4", "id": "x"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pqf = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["1+1?", "2+2?"], "expected_answer": ["2", "4"]}), pqf)
    got = load_problems(jl)
    assert [(p.id, p.problem, p.expected_answer) for p in got] == [("p-0", "1+1?", "2"), ("x", "2+2?", "4")]
    assert [p.expected_answer for p in load_problems(str(pqf))] == ["2", "4"]


def test_load_problems_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(UserError, match=r"'problem' / 'expected_answer'.*columns: answer, question"):
        load_problems(bad)
    with pytest.raises(UserError, match="unknown split 'train'.*splits: calibration, test, validation"):
        load_problems("tiny", split="train")
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"problem": "q", "expected_answer": "1"}) + "\n")
    with pytest.raises(UserError, match="no 'split' column"):
        load_problems(ok, split="test")


# ------------------------------------------------------------------------------------------ prompts


def test_render_chat(tokenizer):
    assert render_chat(tokenizer, "What is 1+1?", tools=False) == (
        MATH_PREFIX + "What is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    tir = render_chat(tokenizer, "What is 1+1?", tools=True, total_code_executions=3)
    assert tir == (
        "<|im_start|>user\nSolve the following math problem, integrating natural language reasoning with Python "
        "code executions.\nYou may perform up to 3 Python code calls to assist your reasoning.\n"
        "Make sure to put the answer (and only answer) inside \\boxed{}.\n\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(tokenizer, "q", tools=False, system="").startswith("<|im_start|>system\n<|im_end|>\n")
    full = render_chat_with_response(tokenizer, "q", "\\boxed{2}")
    assert full == MATH_PREFIX + "q<|im_end|>\n<|im_start|>assistant\n\\boxed{2}<|im_end|>\n"
    assert OPENMATH_CODE_TAGS["code_end"] == "</tool_call>"


# ------------------------------------------------------------------------------------------ calibration


def _texts(out_dir: Path) -> list[str]:
    table = pq.read_table(out_dir / calib.CALIBRATION_FILE)
    assert table.column_names == ["text"]
    return table.column("text").to_pylist()


def test_calibration_from_tiny_is_deterministic(tmp_path, tiny_model_dir):
    a = calib.build_calibration("tiny", tiny_model_dir, tmp_path / "a", num_samples=12, seed=7)
    b = calib.build_calibration("tiny", tiny_model_dir, tmp_path / "b", num_samples=12, seed=7)
    assert (tmp_path / "a" / "calibration.parquet").read_bytes() == (
        tmp_path / "b" / "calibration.parquet"
    ).read_bytes()
    assert a == b
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["calibration.parquet"]
    assert a["num_samples"] == 12 and not a["short"] and a["split"] == "calibration"
    assert a["solution_field"] == "reference_solution"
    texts = _texts(tmp_path / "a")
    assert len(texts) == 12 == len(set(texts))
    cal_problems = {p.problem for p in load_problems("tiny", "calibration")}
    for t in texts:
        assert t.startswith(MATH_PREFIX)
        assert "<|im_end|>\n<|im_start|>assistant\n" in t and t.endswith("$.<|im_end|>\n")
        problem = t[len(MATH_PREFIX) :].split("<|im_end|>", 1)[0]
        assert problem in cal_problems  # never a test problem
    c = calib.build_calibration("tiny", tiny_model_dir, tmp_path / "c", num_samples=12, seed=8)
    assert c["sha256"] != a["sha256"]
    # TensorRT-LLM's quantize.py reads the directory like this
    import datasets

    ds = datasets.load_dataset(str(tmp_path / "a"), split="train")
    assert ds.column_names == ["text"] and len(ds) == 12


def test_calibration_short_source_uses_all_rows(tmp_path, tiny_model_dir):
    s = calib.build_calibration("tiny", tiny_model_dir, tmp_path, num_samples=500, seed=0)
    assert s["num_samples"] == 40 and s["short"] and "fewer than the 500 requested" in s["note"]


def test_calibration_from_jsonl_and_parquet(tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {i} + {i}?", "other": i} for i in range(10)] + [
        {"question": "  ", "other": 99}
    ]
    jl = tmp_path / "src.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = calib.build_calibration(str(jl), tiny_model_dir, tmp_path / "j", num_samples=20, seed=1)
    assert s["problem_field"] == "question" and s["solution_field"] is None
    assert s["num_samples"] == 10 and s["skipped_empty"] == 1 and s["short"]
    texts = _texts(tmp_path / "j")
    assert all(t.startswith(MATH_PREFIX) and t.endswith("<|im_end|>\n<|im_start|>assistant\n") for t in texts)

    pqf = tmp_path / "src.parquet"
    pq.write_table(
        pa.table(
            {"p": [f"Problem {i}" for i in range(30)], "generated_solution": [f"Sol {i}" for i in range(30)]}
        ),
        pqf,
    )
    s1 = calib.build_calibration(
        str(pqf), tiny_model_dir, tmp_path / "p1", num_samples=5, seed=3, text_field="p"
    )
    s2 = calib.build_calibration(
        str(pqf), tiny_model_dir, tmp_path / "p2", num_samples=5, seed=3, text_field="p"
    )
    assert s1["sha256"] == s2["sha256"] and s1["solution_field"] == "generated_solution"
    texts = _texts(tmp_path / "p1")
    assert len(texts) == 5
    for t in texts:
        i = re.search(r"Problem (\d+)<\|im_end\|>", t).group(1)
        assert t.endswith(f"<|im_start|>assistant\nSol {i}<|im_end|>\n")
    assert s1["fingerprint"] == {"kind": "file", "sha256": calib.file_sha256(pqf), "split": None}


def test_calibration_from_saved_datasets(tmp_path, tiny_model_dir):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"problem": [f"train {i}" for i in range(8)]}),
            "tir": datasets.Dataset.from_dict({"problem": [f"tir {i}" for i in range(8)]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    s = calib.build_calibration(
        str(tmp_path / "dd"), tiny_model_dir, tmp_path / "o1", num_samples=4, seed=0, split="tir"
    )
    assert s["num_samples"] == 4 and all("tir " in t for t in _texts(tmp_path / "o1"))
    assert s["fingerprint"]["kind"] == "dir"
    with pytest.raises(UserError, match="unknown split 'nope'.*splits: tir, train"):
        calib.build_calibration(
            str(tmp_path / "dd"), tiny_model_dir, tmp_path / "x", num_samples=4, seed=0, split="nope"
        )

    dd["train"].save_to_disk(str(tmp_path / "single"))
    s = calib.build_calibration(
        str(tmp_path / "single"), tiny_model_dir, tmp_path / "o2", num_samples=3, seed=0
    )
    assert s["num_samples"] == 3 and all("train " in t for t in _texts(tmp_path / "o2"))

    # a plain data directory that load_dataset reads (offline: HF_HUB_OFFLINE=1 in conftest)
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(
        pa.table({"problem": ["a", "b", "c"], "generation": ["A", "B", "C"]}), plain / "train.parquet"
    )
    s = calib.build_calibration(str(plain), tiny_model_dir, tmp_path / "o3", num_samples=3, seed=0)
    assert s["split"] == "train" and s["solution_field"] == "generation" and s["num_samples"] == 3


def test_calibration_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="unknown calibration source"):
        calib.build_calibration("./does/not/exist.jsonl", tiny_model_dir, tmp_path, num_samples=2, seed=0)
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"prompt_text": "x", "id": 1}) + "\n")
    with pytest.raises(UserError, match=r"no problem column.*columns: id, prompt_text.*text_field"):
        calib.build_calibration(str(nocol), tiny_model_dir, tmp_path, num_samples=2, seed=0)
    with pytest.raises(UserError, match="no column 'body'"):
        calib.build_calibration(
            str(nocol), tiny_model_dir, tmp_path, num_samples=2, seed=0, text_field="body"
        )
    with pytest.raises(UserError, match="unknown split 'train'.*calibration, test, validation"):
        calib.build_calibration("tiny", tiny_model_dir, tmp_path, num_samples=2, seed=0, split="train")
    with pytest.raises(UserError, match="revision applies"):
        calib.build_calibration("tiny", tiny_model_dir, tmp_path, num_samples=2, seed=0, revision="main")
    with pytest.raises(UserError, match="at least 1"):
        calib.build_calibration("tiny", tiny_model_dir, tmp_path, num_samples=0, seed=0)
    txt = tmp_path / "data.csv"
    txt.write_text("problem\nx\n")
    with pytest.raises(UserError, match="unsupported file type"):
        calib.build_calibration(str(txt), tiny_model_dir, tmp_path, num_samples=2, seed=0)
    assert not (tmp_path / "calibration.parquet").exists()


def test_source_fingerprint(tmp_path, monkeypatch):
    fp = calib.source_fingerprint("tiny")
    assert fp == {"kind": "tiny", "sha256": calib.file_sha256(TINY_PROBLEMS_FILE), "split": "calibration"}
    f = tmp_path / "a.jsonl"
    f.write_text('{"problem": "x"}\n')
    before = calib.source_fingerprint(str(f))
    f.write_text('{"problem": "y"}\n')
    assert calib.source_fingerprint(str(f)) != before

    # a Hub dataset, offline: the commit comes from the local HF cache's refs
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        calib.source_fingerprint("nvidia/OpenMathReasoning", split="tir")
    repo = tmp_path / "hf" / "hub" / "datasets--nvidia--OpenMathReasoning"
    sha = "a" * 40
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    assert calib.source_fingerprint("nvidia/OpenMathReasoning", split="tir") == {
        "kind": "hub",
        "repo_id": "nvidia/OpenMathReasoning",
        "revision": None,
        "commit": sha,
        "split": "tir",
    }
    assert calib.source_fingerprint("nvidia/OpenMathReasoning", revision=sha)["commit"] == sha


def test_calibration_hub_dataset_not_cached_offline(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot resolve dataset 'acme/absent' offline"):
        calib.build_calibration("acme/absent", tiny_model_dir, tmp_path / "o", num_samples=2, seed=0)
    repo = tmp_path / "hf" / "hub" / "datasets--acme--absent"
    (repo / "snapshots" / ("b" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    # the commit resolves from the hub cache, but the rows were never loaded into the datasets cache
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    with pytest.raises(UserError, match="cannot load dataset 'acme/absent' split 'train'"):
        calib.build_calibration("acme/absent", tiny_model_dir, tmp_path / "o", num_samples=2, seed=0)
