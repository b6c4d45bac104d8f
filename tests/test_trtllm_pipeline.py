"""The pipeline with `backend: trtllm`, end to end through a real Prefect server and MLflow, with fake
TensorRT-LLM tools (tests/fakes: TensorRT-LLM cannot run here).

The fakes reject any flag the reference does not document and record their argv; the test asserts that
exactly the commands we generated ran, in the plan's order, and that build, serve, benchmark and MLflow
all went through the trtllm paths.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from mathforge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "fakes"
pytestmark = pytest.mark.integration


def write_drafter(path: Path) -> Path:
    """A drafter in Apple's recurrent-drafting layout (config.json + one model.safetensors)."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "recurrent_drafting_drafter",
                "hidden_size": 8,
                "exit_dim": 16,
                "num_draft_layers": 2,
                "rnn": True,
                "vocab_size": 16,
            }
        )  # fmt: skip
    )
    save_file(
        {"lm_head.0.linear.weight": np.zeros((16, 16), dtype=np.float32)}, str(path / "model.safetensors")
    )
    return path


def trtllm_preset(tmp: Path, drafter: Path) -> Path:
    preset = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    preset["name"] = "trtllm-fake"
    preset["variants"] = ["bf16", "fp8", "fp8+redrafter"]
    preset["calibration"].update({"num_samples": 8, "max_seq_len": 128})
    preset["engine"] = {
        "backend": "trtllm",
        "trtllm": {
            "version": "1.1.0rc0",
            "examples_dir": str(FAKES / "examples"),
            "python": "python3",
            "tp_size": 1,
            "max_batch_size": 4,
            "max_input_len": 1024,
            "max_seq_len": 2048,
            "max_num_tokens": 2048,
            "kv_cache_free_gpu_memory_fraction": 0.5,
            "startup_timeout_s": 60,
        },
    }
    preset["drafter"] = {"checkpoint": str(drafter), "num_draft_layers": 2, "draft_len": 3, "num_beams": 1}
    preset["bench"].update({"num_prompts": 4, "concurrency": [1, 2], "max_tokens": 8, "warmup": 1})
    path = tmp / "trtllm-fake.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def fake_env(home: Path, api_url: str, log: Path, *, with_trtllm: bool = True) -> dict[str, str]:
    env = {**os.environ, "MATHFORGE_HOME": str(home), "PREFECT_API_URL": api_url}
    env["MATHFORGE_FAKE_TRTLLM_LOG"] = str(log)
    env["MATHFORGE_GPU_HOST"] = "fake-h100"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # the fakes' `python3` is this venv's; the tools are first on PATH
    env["PATH"] = os.pathsep.join([str(FAKES / "bin"), str(Path(sys.executable).parent), env["PATH"]])
    if with_trtllm:
        env["PYTHONPATH"] = str(FAKES / "site")  # tensorrt_llm 1.1.0rc0's package record
    else:
        env.pop("PYTHONPATH", None)
    return env


def mathforge(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mathforge.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, (
            f"mathforge {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


BUILD_TOOLS = [
    "qwen/convert_checkpoint.py",
    "quantize.py",
    "trtllm-build",
    "trtllm-build",
    "redrafter/convert_checkpoint.py",
    "trtllm-build",
]


def test_trtllm_pipeline_builds_serves_benchmarks_and_tracks(tmp_path, prefect_server, monkeypatch):
    home, log = tmp_path / "home", tmp_path / "fake-trtllm.jsonl"
    preset = trtllm_preset(tmp_path, write_drafter(tmp_path / "drafter"))
    env = fake_env(home, prefect_server, log)
    # this host's GPU slots (2 GPUs); strict: the run fails if the limit is missing
    limit = httpx.post(
        f"{prefect_server}/v2/concurrency_limits/", json={"name": "gpu:fake-h100", "limit": 2}, timeout=60
    )
    assert limit.status_code in (200, 201), limit.text

    # 1. build all three variants: exactly the generated commands ran, in the plan's order
    # (without per-host GPU slots here: each acquisition costs Prefect seconds; serving below takes them)
    build_env = {k: v for k, v in env.items() if k != "MATHFORGE_GPU_HOST"}
    refs = json.loads(mathforge(build_env, "build", "--preset", str(preset)).stdout)
    assert set(refs) == {"bf16", "fp8", "fp8+redrafter"}
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["tool"] for c in calls] == BUILD_TOOLS
    objects = home / "artifacts" / "objects"
    engines = {v: (objects / ref["digest"], json.loads((objects / ref["digest"] / "engine.json").read_text()))
               for v, ref in refs.items()}  # fmt: skip
    built = [c["argv"] for c in calls if c["tool"] in ("trtllm-build", "redrafter/convert_checkpoint.py")]
    recorded = [r["argv"] for v in ("bf16", "fp8", "fp8+redrafter") for r in engines[v][1]["commands"]]
    assert [r[2:] if r[0] == "python3" else r[1:] for r in recorded] == built
    converted = [c["argv"] for c in calls if c["tool"] in ("qwen/convert_checkpoint.py", "quantize.py")]
    records = [json.loads(f.read_text()) for f in objects.glob("*/mathforge-build.json")]
    by_precision = {r["recipe"]["precision"]: r["commands"][0]["argv"][2:] for r in records}
    assert [by_precision["bf16"], by_precision["fp8"]] == converted
    quantize = converted[1]
    calib_dir = Path(flag(quantize, "--calib_dataset"))
    assert calib_dir.name == "data" and [p.suffix for p in calib_dir.iterdir()] == [".parquet"]
    assert flag(quantize, "--qformat") == "fp8" and flag(quantize, "--calib_size") == "8"
    red_dir, red = engines["fp8+redrafter"]
    assert red["speculative"]["method"] == "redrafter" and red["speculative"]["draft_len_per_beam"] == 3
    assert red["inputs"]["drafter"] is not None and red["quantization"] == "fp8"
    assert red["inputs"]["trtllm_checkpoint"] == engines["fp8"][1]["inputs"]["trtllm_checkpoint"]  # shared
    assert json.loads((red_dir / "config.json").read_text())["build_config"]["max_draft_len"] == 3
    assert (red_dir / "tokenizer_config.json").is_file() and not (red_dir / ".redrafter-checkpoint").exists()

    # 2. the pipeline: builds are cache hits; each variant is served by trtllm-serve, benchmarked, tracked
    proc = mathforge(env, "pipeline", "--preset", str(preset), "--variants", "bf16,fp8", "--no-evaluate")

    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"metrics"')][-1])
    assert set(summary["metrics"]) == {"bf16", "fp8"}
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["tool"] for c in calls] == [*BUILD_TOOLS, "trtllm-serve", "trtllm-serve"]
    for call, variant in zip(calls[-2:], ("bf16", "fp8"), strict=True):
        argv, engine_dir = call["argv"], str(engines[variant][0])
        assert argv[:2] == ["serve", engine_dir]
        assert flag(argv, "--tokenizer") == engine_dir and flag(argv, "--backend") == "trt"
        assert flag(argv, "--kv_cache_free_gpu_memory_fraction") == "0.5" and flag(argv, "--tp_size") == "1"

    db = sqlite3.connect(home / "mlflow.db")
    children = dict(
        db.execute(
            "select t.value, t.run_uuid from tags t join tags p on p.run_uuid = t.run_uuid "
            "where t.key='variant' and p.key='mlflow.parentRunId' and p.value=?",
            (summary["mlflow_parent_run_id"],),
        ).fetchall()
    )
    assert set(children) == {"bf16", "fp8"}
    for variant, run in children.items():
        metrics = dict(
            db.execute("select key, value from latest_metrics where run_uuid=?", (run,)).fetchall()
        )
        assert {"ttft_ms_p50", "tpot_ms_p50", "output_tok_s", "weight_bytes"} <= set(metrics), variant
        params = dict(db.execute("select key, value from params where run_uuid=?", (run,)).fetchall())
        assert (params["backend"], params["max_slots"], params["max_model_len"]) == ("trtllm", "4", "2048")

    # the per-host GPU limit was taken and given back
    limits = httpx.post(f"{prefect_server}/v2/concurrency_limits/filter", json={}, timeout=60).json()
    assert next(lim for lim in limits if lim["name"] == "gpu:fake-h100")["active_slots"] == 0

    # 3. the ReDrafter engine through the same serve interface: trtllm-serve reports its acceptance length
    for key in ("MATHFORGE_HOME", "PATH", "PYTHONPATH", "MATHFORGE_FAKE_TRTLLM_LOG"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("MATHFORGE_GPU_HOST", raising=False)
    from artifacts import ArtifactRef
    from mathforge.bench.run import run_benchmark_sync
    from mathforge.config import load_preset
    from tasks.serve import serve_variant

    cfg = load_preset(str(preset))
    with serve_variant("fp8+redrafter", ArtifactRef(**refs["fp8+redrafter"]), cfg.engine) as served:
        assert served.model == red_dir.name  # trtllm-serve names the model after its directory
        models = httpx.get(f"{served.base_url}/models").json()
        assert [m["id"] for m in models["data"]] == [served.model]
        result = run_benchmark_sync(served.base_url, served.model, ["1 + 1 = ?"], concurrency_levels=[1],
                                    num_prompts=2, max_tokens=4, warmup=0)  # fmt: skip
    [level] = result["levels"]
    assert level["metrics"]["completed"] == 2
    assert abs(level["metrics"]["accept_len_mean"] - 2.8) < 1e-6  # 1 + 0.6 x 3 draft tokens (the fake's)

    # 4. the dry-run plan of the same preset now finds every artifact, under the keys the run used
    from artifacts.store import ArtifactStore
    from mathforge.plan import build_plan

    plan = build_plan(cfg, store=ArtifactStore(home / "artifacts"))
    assert all(s.status == "cached" for s in plan.steps if s.produces), plan.render()
    engine_steps = {s.title: s for s in plan.steps if s.title.startswith("engine ")}
    assert {t.split(" ", 1)[1]: (s.key, s.digest) for t, s in engine_steps.items()} == {
        v: (ref["key"], ref["digest"]) for v, ref in refs.items()
    }
    planned = [c.split()[1].rsplit("/examples/", 1)[-1] if c.startswith("python3") else c.split()[0]
               for c in plan.commands()]  # fmt: skip
    assert planned == [
        "models/core/qwen/convert_checkpoint.py",
        "quantization/quantize.py",
        "trtllm-build",
        "trtllm-build",
        "redrafter/convert_checkpoint.py",
        "trtllm-build",
        "trtllm-serve",
        "trtllm-serve",
        "trtllm-serve",
    ]


def test_a_host_without_tensorrt_llm_fails_at_once_naming_the_image(tmp_path, prefect_server):
    home, log = tmp_path / "home", tmp_path / "fake-trtllm.jsonl"
    preset = trtllm_preset(tmp_path, write_drafter(tmp_path / "drafter"))
    env = fake_env(home, prefect_server, log, with_trtllm=False)
    proc = mathforge(env, "build", "--preset", str(preset), "--variants", "bf16,fp8", check=False)
    assert proc.returncode != 0
    assert "nvcr.io/nvidia/tensorrt-llm/release:1.1.0rc0" in proc.stderr + proc.stdout
    assert "has no tensorrt_llm" in proc.stderr
    assert not (home / "artifacts" / "objects").exists() or not any(
        (home / "artifacts" / "objects").iterdir()
    )
    assert not log.exists()  # no tool ran


def test_pytorch_runtime_serves_the_checkpoint_with_its_yaml(tmp_path, monkeypatch):
    """No engine build: engine.json only, and trtllm-serve --backend pytorch with the generated YAML."""
    log = tmp_path / "fake-trtllm.jsonl"
    for key, value in fake_env(tmp_path / "home", "", log).items():
        if key in ("MATHFORGE_HOME", "PATH", "PYTHONPATH", "MATHFORGE_FAKE_TRTLLM_LOG"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MATHFORGE_GPU_HOST", raising=False)
    from artifacts.store import default_store
    from mathforge.config import EngineSettings, ModelSettings
    from tasks.engine import build_engine
    from tasks.model import checkpoint
    from tasks.serve import serve_variant
    from tasks.sources import resolve_model

    settings = EngineSettings.model_validate(
        {
            "backend": "trtllm",
            "trtllm": {
                "runtime": "pytorch",
                "speculative": {"decoding_type": "NGram", "max_draft_len": 4},
                "kv_cache_free_gpu_memory_fraction": 0.6,
                "startup_timeout_s": 60,
            },
        }
    )
    ckpt = checkpoint.fn(resolve_model.fn(ModelSettings(source="embedded:tiny")))
    engine = build_engine.fn(ckpt, "bf16", settings)
    spec = json.loads((default_store().path(engine) / "engine.json").read_text())
    assert (spec["runtime"], spec["commands"], spec["weights"]["digest"]) == ("pytorch", [], ckpt.digest)
    assert spec["speculative"]["decoding_type"] == "NGram"
    with serve_variant("bf16", engine, settings) as served:
        models = httpx.get(f"{served.base_url}/models").json()
        assert [m["id"] for m in models["data"]] == [served.model] == [ckpt.digest]
    [call] = [json.loads(line) for line in log.read_text().splitlines()]
    argv = call["argv"]
    assert argv[:2] == ["serve", str(default_store().path(ckpt))]
    assert flag(argv, "--backend") == "pytorch" and flag(argv, "--max_seq_len") == "8192"
    options = yaml.safe_load(Path(flag(argv, "--extra_llm_api_options")).read_text())
    assert options == {
        "kv_cache_config": {"free_gpu_memory_fraction": 0.6},
        "speculative_config": {"decoding_type": "NGram", "max_draft_len": 4},
        "disable_overlap_scheduler": True,
    }
    with pytest.raises(UserError, match="needs TensorRT engines"):
        build_engine.fn(ckpt, "fp8+redrafter", settings)
    with pytest.raises(UserError, match="no hf_quant_config.json"):
        build_engine.fn(ckpt, "fp8", settings)
