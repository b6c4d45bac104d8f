"""`mathforge pipeline --dry-run`: the plan lists every command in order, with recipe keys or what they wait on.

The keys must be the ones a run computes, so the tests build real (tiny) artifacts through the tasks
themselves and compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from artifacts.keys import recipe_key
from artifacts.store import ArtifactStore
from mathforge.config import Preset, load_preset
from mathforge.errors import UserError
from mathforge.plan import BUILD_DIR, Resolver, build_plan

REPO = Path(__file__).resolve().parents[1]
EX = "/app/tensorrt_llm/examples"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_openmath_plan_lists_every_command_in_order(tmp_path, empty_hf_cache):
    store = ArtifactStore(tmp_path / "store")
    plan = build_plan(load_preset("openmath-14b"), store=store)
    assert [s.title for s in plan.steps] == [
        "checkpoint",
        "calibration",
        "TensorRT-LLM checkpoint bf16",
        "TensorRT-LLM checkpoint fp8",
        "drafter",
        "engine bf16",
        "engine fp8",
        "engine fp8+redrafter",
        "serve bf16",
        "serve fp8",
        "serve fp8+redrafter",
    ]
    tools = [c.split()[1] if c.startswith("python3") else c.split()[0] for c in plan.commands()]
    assert tools == [
        f"{EX}/models/core/qwen/convert_checkpoint.py",
        f"{EX}/quantization/quantize.py",
        "trtllm-build",
        "trtllm-build",
        f"{EX}/redrafter/convert_checkpoint.py",
        "trtllm-build",
        "trtllm-serve",
        "trtllm-serve",
        "trtllm-serve",
    ]
    steps = {s.title: s for s in plan.steps}
    # nothing resolvable offline: the checkpoint waits on the Hub revision, everything after on content
    assert steps["checkpoint"].key is None
    assert steps["checkpoint"].waits_on == [
        "the commit of nvidia/OpenMath-Nemotron-14B-Kaggle@main (resolved when the run starts; it is not in the "
        "local Hugging Face cache)"
    ]
    assert any("nvidia/OpenMathReasoning@main" in w for w in steps["calibration"].waits_on)
    assert (
        "the content of [4] TensorRT-LLM checkpoint fp8 (known once it is built)"
        in steps["engine fp8+redrafter"].waits_on
    )
    # no drafter.checkpoint: the pipeline trains it, keyed by the base checkpoint and the dataset's commit
    assert steps["drafter"].task == "train-drafter"
    assert any("nvidia/OpenMathReasoning" in w for w in steps["drafter"].waits_on), steps["drafter"].waits_on
    assert all(s.status == "waits" for s in plan.steps if s.produces)
    assert (
        "--calib_dataset <calibration>/data --calib_size 4096"
        in steps["TensorRT-LLM checkpoint fp8"].commands[0]
    )
    assert f"--output_dir {BUILD_DIR}" in steps["engine fp8"].commands[0]
    text = plan.render()
    assert "recipe key: not known yet; waits on:" in text and "$ trtllm-serve serve <engine:fp8>" in text
    assert not (tmp_path / "store").exists() and not empty_hf_cache.exists()  # nothing written or fetched


def test_a_cached_hub_revision_gives_the_checkpoint_key(tmp_path, empty_hf_cache):
    repo = empty_hf_cache / "models--nvidia--OpenMath-Nemotron-14B-Kaggle"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    plan = build_plan(load_preset("openmath-14b"), ["bf16"], store=ArtifactStore(tmp_path / "s"))
    ckpt = plan.steps[0]
    expected = {"kind": "hub", "repo_id": "nvidia/OpenMath-Nemotron-14B-Kaggle", "commit": COMMIT}
    assert ckpt.key == recipe_key("checkpoint", 1, {"source": {"fingerprint": expected}}, {})
    assert ckpt.status == "builds" and ckpt.waits_on == []
    assert plan.steps[1].waits_on == ["the content of [1] checkpoint (known once it is built)"]


def test_plan_keys_are_the_keys_a_run_uses(tmp_path, monkeypatch):
    """Build the tiny preset's artifacts through the very tasks (`.fn`) and watch the plan fill in."""
    monkeypatch.setenv("MATHFORGE_HOME", str(tmp_path / "home"))
    from artifacts.store import default_store
    from tasks.calibration import calibration
    from tasks.engine import build_engine, build_speculative_engine, import_drafter, resolve_drafter
    from tasks.model import checkpoint
    from tasks.quantize import quantize_fp8
    from tasks.sources import resolve_calibration, resolve_model

    cfg = small_tiny(tmp_path, drafter=random_drafter(tmp_path / "drafter"))
    assert cfg.variants == ["bf16", "fp8", "bf16+redrafter", "fp8+redrafter"]
    store = default_store()
    before = build_plan(cfg, store=store)
    assert [s.status for s in before.steps] == ["builds", "waits", "waits", "builds"] + ["waits"] * 4 + [
        "runs"
    ] * 4

    ckpt = checkpoint.fn(resolve_model.fn(cfg.model))
    c = cfg.calibration
    calib = calibration.fn(ckpt, resolve_calibration.fn(c), c.num_samples, c.seed, c.split, c.text_field)
    fp8 = quantize_fp8.fn(ckpt, calib, c.num_samples, c.max_seq_len)
    engine = build_engine.fn(fp8, "fp8", cfg.engine)
    drafter = import_drafter.fn(resolve_drafter(cfg.drafter.checkpoint))
    spec = build_speculative_engine.fn(fp8, drafter, "fp8+redrafter", cfg.engine, cfg.drafter.draft_len)

    after = build_plan(cfg, store=store)
    steps = {s.title: s for s in after.steps}
    assert steps["checkpoint"].key == before.steps[0].key == ckpt.key
    for title, ref in (
        ("checkpoint", ckpt),
        ("calibration", calib),
        ("fp8 checkpoint", fp8),
        ("engine fp8", engine),
        ("drafter", drafter),
        ("engine fp8+redrafter", spec),
    ):
        assert (steps[title].key, steps[title].digest, steps[title].status) == (ref.key, ref.digest, "cached")
    assert steps["engine bf16"].status == "builds"  # its key is known now, the engine is not built
    assert str(store.path(fp8.digest)) in steps["serve fp8"].commands[0]
    serve = steps["serve fp8+redrafter"].commands[0]
    assert f"--drafter {store.path(drafter.digest)} --draft-len 3" in serve
    assert str(store.path(fp8.digest)) in serve and "--drafter" not in steps["serve fp8"].commands[0]


def random_drafter(path: Path) -> Path:
    import torch

    from mathforge.drafter.model import Drafter, DrafterConfig
    from mathforge.engine.config import ModelConfig

    torch.manual_seed(0)
    base = ModelConfig.from_pretrained(REPO / "mathforge" / "data" / "tiny_model")
    Drafter(DrafterConfig.for_base(base)).save_pretrained(path)
    return path


def small_tiny(tmp_path: Path, drafter: Path | None = None) -> Preset:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["calibration"].update({"num_samples": 4, "max_seq_len": 64})
    if drafter is not None:
        data["drafter"] = {**data.get("drafter", {}), "checkpoint": str(drafter)}
    path = tmp_path / "small-tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_preset(str(path))


def test_torch_plan_trains_the_drafter_for_speculative_variants(tmp_path):
    plan = build_plan(load_preset("tiny"), ["bf16", "fp8+redrafter"], store=ArtifactStore(tmp_path / "s"))
    steps = {s.title: s for s in plan.steps}
    assert [s.title for s in plan.steps] == [
        "checkpoint",
        "calibration",
        "fp8 checkpoint",
        "drafter",
        "engine bf16",
        "engine fp8+redrafter",
        "serve bf16",
        "serve fp8+redrafter",
    ]
    assert steps["drafter"].task == "train-drafter" and steps["drafter"].produces == "drafter"
    assert "the content of [1] checkpoint (known once it is built)" in steps["drafter"].waits_on
    assert steps["engine fp8+redrafter"].task == "build-speculative-engine"
    assert "the content of [4] drafter (known once it is built)" in steps["engine fp8+redrafter"].waits_on
    assert "--drafter <drafter> --draft-len 3" in steps["serve fp8+redrafter"].commands[0]
    assert steps["serve bf16"].commands[0].split()[1:4] == ["-m", "mathforge.cli", "serve"]


def test_trtllm_plan_blocks_bf16_redrafter(tmp_path, empty_hf_cache):
    plan = build_plan(load_preset("openmath-14b"), ["bf16+redrafter"], store=ArtifactStore(tmp_path / "s"))
    steps = {s.title: s for s in plan.steps}
    assert "torch backend only" in steps["engine bf16+redrafter"].blocked
    assert steps["serve bf16+redrafter"].status == "blocked"


def test_pytorch_runtime_plan_shows_the_yaml(tmp_path, empty_hf_cache):
    cfg = load_preset("openmath-14b")
    data = cfg.model_dump(mode="json")
    data["engine"]["trtllm"].update(
        runtime="pytorch",
        speculative={"decoding_type": "NGram", "max_draft_len": 3},
        kv_cache_free_gpu_memory_fraction=0.92,
    )
    plan = build_plan(Preset.model_validate(data), ["fp8"], store=ArtifactStore(tmp_path / "s"))
    assert [s.title for s in plan.steps] == [
        "checkpoint",
        "calibration",
        "fp8 checkpoint",
        "engine fp8",
        "serve fp8",
    ]
    serve = plan.steps[-1]
    assert serve.commands[0].startswith("trtllm-serve serve <fp8-checkpoint> --backend pytorch --tp_size 2")
    [(name, content)] = serve.files.items()
    assert serve.commands[0].endswith(f"--extra_llm_api_options {name}")
    assert yaml.safe_load(content)["speculative_config"] == {"decoding_type": "NGram", "max_draft_len": 3}


def test_an_unknown_variant_is_an_error(tmp_path):
    with pytest.raises(UserError, match="unknown variant"):
        build_plan(load_preset("tiny"), ["int8"], store=ArtifactStore(tmp_path))


def test_resolver_is_injectable(tmp_path):
    from tasks.sources import SourceSpec

    fixed = SourceSpec(fingerprint={"kind": "local", "digest": "a" * 64}, locator="/nowhere")
    resolver = Resolver(model=lambda cfg: fixed, calibration=lambda cfg: fixed, drafter=lambda path: fixed)
    plan = build_plan(load_preset("tiny"), ["bf16"], store=ArtifactStore(tmp_path), resolver=resolver)
    assert plan.steps[0].key == recipe_key(
        "checkpoint", 1, {"source": {"fingerprint": fixed.fingerprint}}, {}
    )


def test_dry_run_cli_prints_the_plan_without_network_or_gpu(tmp_path):
    env = {
        **os.environ,
        "MATHFORGE_HOME": str(tmp_path / "home"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mathforge.cli", "pipeline", "--preset", "openmath-14b", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("mathforge plan: preset openmath-14b")
    order = [
        out.index(s)
        for s in ("quantize.py", "--speculative_decoding_mode explicit_draft_tokens", "trtllm-serve")
    ]
    assert order == sorted(order)
    assert out.count("$ ") == 9
    assert not (tmp_path / "hf").exists()
    assert not (tmp_path / "home" / "artifacts" / "objects").exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mathforge.cli",
            "pipeline",
            "--preset",
            "openmath-14b",
            "--dry-run",
            "--variants",
            "x",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown variant" in bad.stderr
