"""Golden tests: every TensorRT-LLM command line and YAML the trtllm backend generates, against the facts.

The expected values are the reference recipe's own commands, copied from reference/trtllm_redrafter.md and
reference/nemo_skills.md (section noted at each), so a change that drifts from them fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from artifacts.keys import canonicalize, recipe_key
from mathforge.backends.preflight import check_variants, require_build_host
from mathforge.backends.trtllm import commands as cmds
from mathforge.backends.trtllm import recipes, versions
from mathforge.backends.trtllm.build import check_drafter
from mathforge.backends.trtllm.host import require_trtllm
from mathforge.backends.trtllm.llmapi import llm_api_options, llm_api_options_yaml
from mathforge.backends.trtllm.runner import CommandFailed, run_commands
from mathforge.config import TRTLLM_VERSION, Preset, TrtllmSettings, load_preset
from mathforge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "fakes"
EX = "/app/tensorrt_llm/examples"


def flags(argv: list[str] | tuple[str, ...]) -> dict[str, object]:
    """`--flag value` / `--flag=value` / bare `--flag` (True) pairs of an argv, order-free."""
    out: dict[str, object] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        a = items[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                out[a] = items[i + 1]
                i += 1
            else:
                out[a] = True
        i += 1
    return out


def recipe_flags(command_line: str) -> dict[str, object]:
    return flags(shlex.split(command_line))


@pytest.fixture(scope="module")
def om() -> Preset:
    return load_preset("openmath-14b")


def with_trtllm(preset: Preset, **changes) -> Preset:
    data = preset.model_dump(mode="json", exclude_none=False)
    data["engine"]["trtllm"] = {**preset.engine.trtllm.model_dump(), **_host(preset), **changes}
    # the drafter's excluded (decode-time / location) fields are left out of dumps too: keep them
    d = preset.drafter
    data["drafter"] = {
        **data["drafter"],
        **{k: getattr(d, k) for k, f in type(d).model_fields.items() if f.exclude},
    }
    return Preset.model_validate(data)


def _host(preset: Preset) -> dict:
    t = preset.engine.trtllm
    return {k: getattr(t, k) for k, f in TrtllmSettings.model_fields.items() if f.exclude}


# ------------------------------------------------------------------ the preset


def test_openmath_preset_is_the_reference_setup(om):
    assert om.model.source == "nvidia/OpenMath-Nemotron-14B-Kaggle"
    assert om.calibration.source == "nvidia/OpenMathReasoning"
    assert om.calibration.split == "tir[:4096]" and om.calibration.num_samples == 4096
    assert om.variants == ["bf16", "fp8", "fp8+redrafter"]
    assert om.engine.backend == "trtllm"
    t = om.engine.trtllm
    assert (t.tp_size, t.max_seq_len, t.runtime, t.version) == (2, 32000, "trt", "1.1.0rc0")
    assert (om.drafter.draft_len, om.drafter.num_draft_layers, om.drafter.num_beams) == (3, 2, 1)


def test_the_pinned_release_is_the_same_everywhere(om):
    dockerfile = (REPO / "infra" / "gpu-worker.Dockerfile").read_text()
    arg = re.search(r"^ARG TRTLLM_VERSION=(\S+)$", dockerfile, re.M)[1]
    assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt-llm/release:\$\{TRTLLM_VERSION\}$", dockerfile, re.M)
    assert arg == TRTLLM_VERSION == om.engine.trtllm.version == "1.1.0rc0"
    assert om.engine.trtllm.container_image == f"nvcr.io/nvidia/tensorrt-llm/release:{arg}"
    assert TrtllmSettings().container_image == om.engine.trtllm.container_image
    pools = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]
    assert pools["gpu-h100-docker"]["job_variables"]["image"].endswith(f"trtllm-{arg}")


# ------------------------------------------------------------------ quantization and conversion


def test_fp8_quantize_command_is_the_recipes(om):
    r = recipes.checkpoint_recipe(om, "fp8")
    cmd = cmds.checkpoint_command(r, "/ckpt", "/calib/data", "/out", None)
    assert cmd.to_list() == [
        "python3", f"{EX}/quantization/quantize.py",
        "--model_dir", "/ckpt", "--dtype", "auto", "--qformat", "fp8", "--output_dir", "/out",
        "--calib_dataset", "/calib/data", "--calib_size", "4096", "--batch_size", "4",
        "--calib_max_seq_length", "512", "--tp_size", "2", "--pp_size", "1",
    ]  # fmt: skip
    # nemo_skills.md §5.1: what `ns convert --dtype fp8 --num_gpus 2` runs (quantize.py's flags); ours adds
    # only the explicit default --calib_max_seq_length and passes no --kv_cache_dtype (KV stays BF16)
    ns = recipe_flags(
        "python -m nemo_skills.conversion.hf_to_trtllm_quantize --model_dir /ckpt --dtype auto --qformat fp8 "
        "--output_dir /out --calib_size 4096 --calib_dataset /calib/data --batch_size 4 --tp_size 2 --pp_size 1"
    )
    ours = flags(cmd.argv)
    assert ours == {**ns, "--calib_max_seq_length": "512"}
    assert "--kv_cache_dtype" not in ours


def test_fp8_kv_cache_is_opt_in(om):
    r = recipes.checkpoint_recipe(with_trtllm(om, kv_cache_dtype="fp8"), "fp8")
    assert flags(cmds.quantize_fp8(r, "/m", "/c", "/o").argv)["--kv_cache_dtype"] == "fp8"


def test_bf16_conversion_command(om):
    r = recipes.checkpoint_recipe(om, "bf16")
    cmd = cmds.checkpoint_command(r, "/ckpt", None, "/out", None)
    # the per-model converter with the flag set NeMo-Skills' legacy bf16 path used (nemo_skills.md §5.1)
    assert cmd.to_list() == [
        "python3", f"{EX}/models/core/qwen/convert_checkpoint.py",
        "--model_dir", "/ckpt", "--output_dir", "/out", "--dtype", "bfloat16", "--tp_size", "2", "--pp_size", "1",
    ]  # fmt: skip
    llama = cmds.convert_bf16(r, "/m", "/o", "llama")
    assert llama.argv[1] == f"{EX}/models/core/llama/convert_checkpoint.py"
    assert cmds.model_type_of(["Qwen2ForCausalLM"]) == "qwen"
    with pytest.raises(UserError, match="no TensorRT-LLM converter"):
        cmds.model_type_of(["MixtralForCausalLM"])


def test_checkpoint_key_ignores_engine_shapes_and_host_paths(om):
    def key(preset: Preset, precision: str = "fp8") -> str:
        return recipe_key(
            "trtllm-checkpoint", 1, {"recipe": recipes.checkpoint_recipe(preset, precision)}, {}
        )

    base = key(om)
    assert key(with_trtllm(om, max_seq_len=16000, max_input_len=16000)) == base
    assert key(with_trtllm(om, examples_dir="/elsewhere", python="/usr/bin/python3", image="x:1")) == base
    assert key(with_trtllm(om, tp_size=4)) != base
    assert key(with_trtllm(om, version="1.2.0")) != base
    assert canonicalize(recipes.checkpoint_recipe(om, "fp8"))["tools"] == {}


# ------------------------------------------------------------------ engines


def test_fp8_and_bf16_engine_builds(om):
    for variant in ("bf16", "fp8"):
        r = recipes.engine_recipe(om, variant)
        [cmd] = cmds.engine_commands(r, "/tck", None, "/eng", "/scratch")
        assert cmd.to_list() == [
            "trtllm-build", "--checkpoint_dir", "/tck", "--output_dir", "/eng",
            "--gemm_plugin", "auto", "--use_paged_context_fmha", "enable",
            "--max_batch_size", "32", "--max_input_len", "32000", "--max_seq_len", "32000",
            "--max_num_tokens", "32000",
        ]  # fmt: skip


def test_redrafter_engine_is_the_recipes(om):
    r = recipes.engine_recipe(om, "fp8+redrafter")
    convert, build = cmds.engine_commands(r, "/fp8-tck", "/drafter", "/eng", "/eng/.redrafter-checkpoint")
    # nemo_skills.md §5.2 (the AIMO tutorial's commands, paths renamed)
    assert flags(convert.argv) == recipe_flags(
        "python TensorRT-LLM/examples/redrafter/convert_checkpoint.py --base_model_checkpoint_dir /fp8-tck "
        "--drafter_model_dir /drafter --output_dir /eng/.redrafter-checkpoint --dtype bfloat16 --tp_size 2 "
        "--redrafter_num_beams 1 --redrafter_draft_len_per_beam 3"
    )
    assert convert.argv[:2] == ("python3", f"{EX}/redrafter/convert_checkpoint.py")
    assert build.argv[0] == "trtllm-build"
    assert flags(build.argv) == recipe_flags(
        "trtllm-build --checkpoint_dir /eng/.redrafter-checkpoint --output_dir /eng --gemm_plugin fp8 "
        "--use_paged_context_fmha=enable --max_batch_size 32 --max_seq_len 32000 --max_input_len 32000 "
        "--max_num_tokens 32000 --speculative_decoding_mode explicit_draft_tokens --max_beam_width 1 "
        "--kv_cache_type paged"
    )
    assert "--max_draft_len" not in flags(build.argv)  # computed inside the model (§2, §3)


def test_redrafter_sampling_mode_and_beams(om):
    preset = om.model_copy(update={"drafter": om.drafter.model_copy(update={"greedy_search": False})})
    r = recipes.engine_recipe(preset, "fp8+redrafter")
    convert = cmds.redrafter_convert(r, "/b", "/d", "/o")
    assert convert.argv[-1] == "--redrafter_no_greedy_search"


def test_token_budget_must_hold_a_batch_of_draft_steps(om):
    # pitfall 7: 1 + num_beams * draft_len tokens per request and step
    many = om.model_copy(update={"drafter": om.drafter.model_copy(update={"num_beams": 5, "draft_len": 5})})
    small = with_trtllm(many, max_num_tokens=512, max_input_len=512, max_seq_len=512)
    assert recipes.engine_recipe(small, "fp8").max_num_tokens == 512  # plain decoding: 32 x 1 fits
    with pytest.raises(UserError, match=r"32 x 26 tokens per step = 832"):
        recipes.engine_recipe(small, "fp8+redrafter")


def test_engine_key_ignores_serve_settings(om):
    def key(preset: Preset) -> str:
        return recipe_key("engine", 1, {"recipe": recipes.engine_recipe(preset, "fp8")}, {})

    base = key(om)
    assert key(with_trtllm(om, kv_cache_free_gpu_memory_fraction=0.5, startup_timeout_s=10)) == base
    assert key(with_trtllm(om, max_batch_size=16)) != base


# ------------------------------------------------------------------ serving


def test_trt_serve_command_is_the_notebooks(om):
    cmd = cmds.serve(
        "/engine",
        runtime="trt",
        version="1.1.0rc0",
        tp_size=2,
        max_batch_size=12,
        kv_cache_free_gpu_memory_fraction=0.92,
        host="127.0.0.1",
        port=5000,
        tokenizer="/hf",
    )
    # nemo_skills.md §5.3 / trtllm_redrafter.md §4: the AIMO notebook's exact command
    assert str(cmd) == (
        "trtllm-serve serve /engine --tokenizer /hf --backend trt --tp_size 2 "
        "--kv_cache_free_gpu_memory_fraction 0.92 --max_batch_size 12 --host 127.0.0.1 --port 5000"
    )


def test_pytorch_serve_command_and_yaml(tmp_path):
    cmd = cmds.serve(
        "/fp8-modelopt",
        runtime="pytorch",
        version="1.1.0rc0",
        tp_size=2,
        max_batch_size=32,
        max_num_tokens=8192,
        max_seq_len=32000,
        kv_cache_free_gpu_memory_fraction=0.9,
        host="127.0.0.1",
        port=8000,
        extra_llm_api_options="/tmp/opts.yaml",
    )
    assert cmd.to_list() == [
        "trtllm-serve", "serve", "/fp8-modelopt", "--backend", "pytorch", "--tp_size", "2",
        "--kv_cache_free_gpu_memory_fraction", "0.9", "--max_batch_size", "32", "--max_num_tokens", "8192",
        "--max_seq_len", "32000", "--host", "127.0.0.1", "--port", "8000",
        "--extra_llm_api_options", "/tmp/opts.yaml",
    ]  # fmt: skip
    with pytest.raises(UserError, match="PyTorch backend only"):
        cmds.serve("/e", runtime="trt", version="1.1.0rc0", tp_size=1, max_batch_size=1,
                   kv_cache_free_gpu_memory_fraction=0.9, host="h", port=1, extra_llm_api_options="/x.yaml")  # fmt: skip


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        (
            "1.1.0rc0",
            {"decoding_type": "Eagle3", "max_draft_len": 3, "speculative_model": "/eagle3-head"},
            "kv_cache_config:\n  free_gpu_memory_fraction: 0.9\nspeculative_config:\n  decoding_type: Eagle3\n"
            "  max_draft_len: 3\n  speculative_model_dir: /eagle3-head\ndisable_overlap_scheduler: true\n",
        ),
        (
            "1.2.1",
            {
                "decoding_type": "DraftTarget",
                "max_draft_len": 4,
                "speculative_model": "nvidia/OpenMath-Nemotron-1.5B",
            },
            "kv_cache_config:\n  free_gpu_memory_fraction: 0.9\nspeculative_config:\n  decoding_type: Draft_Target\n"
            "  max_draft_len: 4\n  speculative_model_dir: nvidia/OpenMath-Nemotron-1.5B\n"
            "disable_overlap_scheduler: true\n",
        ),
        (
            "1.0.0",  # the 1.0-era from_dict keys (§4): Eagle, DraftTarget
            {"decoding_type": "DraftTarget", "max_draft_len": 4, "speculative_model": "/draft"},
            "kv_cache_config:\n  free_gpu_memory_fraction: 0.9\nspeculative_config:\n  decoding_type: DraftTarget\n"
            "  max_draft_len: 4\n  speculative_model_dir: /draft\ndisable_overlap_scheduler: true\n",
        ),
        (
            "1.1.0",
            {"decoding_type": "NGram", "max_draft_len": 4, "max_matching_ngram_size": 2},
            "kv_cache_config:\n  free_gpu_memory_fraction: 0.9\nspeculative_config:\n  decoding_type: NGram\n"
            "  max_draft_len: 4\n  max_matching_ngram_size: 2\ndisable_overlap_scheduler: true\n",
        ),
    ],
)
def test_speculative_yaml(version, spec, expected):
    settings = TrtllmSettings(version=version, runtime="pytorch", speculative=spec)
    assert llm_api_options_yaml(settings) == expected
    assert "ReDrafter" not in expected


def test_yaml_keeps_the_memory_fraction_with_an_fp8_kv_cache():
    s = TrtllmSettings(runtime="pytorch", kv_cache_dtype="fp8", kv_cache_free_gpu_memory_fraction=0.85)
    assert llm_api_options(s) == {"kv_cache_config": {"free_gpu_memory_fraction": 0.85, "dtype": "fp8"}}


def test_speculative_settings_are_validated():
    with pytest.raises(ValueError, match="needs speculative_model"):
        TrtllmSettings(runtime="pytorch", speculative={"decoding_type": "Eagle3"})
    with pytest.raises(ValueError, match="runtime pytorch"):
        TrtllmSettings(runtime="trt", speculative={"decoding_type": "NGram"})


# ------------------------------------------------------------------ version gates


def test_redrafter_refused_on_13_and_later(om):
    for version in ("1.3.0rc14", "1.3.0", "2.0.0"):
        with pytest.raises(UserError, match=r"fp8\+redrafter variant needs TensorRT-LLM 1\.2\.x or older"):
            versions.check_redrafter(version)
    newer = with_trtllm(om, version="1.3.0rc14", image=None)
    with pytest.raises(UserError, match="1.2.x or older"):
        recipes.engine_recipe(newer, "fp8+redrafter")
    with pytest.raises(UserError, match="removed in 1.3"):
        recipes.engine_recipe(newer, "fp8")
    for ok in ("1.1.0rc0", "1.1.0", "1.2.0rc6.post2", "1.2.1"):
        versions.check_redrafter(ok)


def test_version_dependent_choices():
    assert versions.parse_version("1.2.0rc6.post2") == (1, 2, 0)
    assert versions.serve_backend("trt", "1.2.1") == "trt"
    assert versions.serve_backend("pytorch", "1.3.0") == "pytorch"
    with pytest.raises(UserError, match="removed in 1.3"):
        versions.serve_backend("trt", "1.3.0")
    with pytest.raises(UserError, match="older than 1.0"):
        versions.check_supported("0.21.0")
    assert versions.decoding_type("Eagle3", "1.0.0") == "Eagle"
    assert versions.decoding_type("Eagle3", "1.2.0") == "Eagle3"
    with pytest.raises(UserError, match="not a version"):
        versions.parse_version("latest")


# ------------------------------------------------------------------ variants, drafter, host


def test_speculative_variants_per_backend(om):
    """torch builds both speculative variants (drafter trained or imported); trtllm only fp8+redrafter."""
    tiny = load_preset("tiny")
    assert check_variants(tiny, None) == ["bf16", "fp8", "bf16+redrafter", "fp8+redrafter"]
    assert check_variants(tiny, ["fp8+redrafter"]) == ["fp8+redrafter"]
    with pytest.raises(UserError, match="torch backend only"):
        check_variants(om, ["bf16+redrafter"])
    data = tiny.model_dump(mode="json")
    data["drafter"] = {**data["drafter"], "num_beams": 4}
    with pytest.raises(UserError, match="drafts one beam"):
        check_variants(Preset.model_validate(data), ["bf16+redrafter"])
    from mathforge.engine.build import build_torch_engine

    with pytest.raises(UserError, match="needs a drafter"):
        build_torch_engine(Path("/nonexistent"), {}, "fp8+redrafter", {}, Path("/nonexistent-out"))
    with pytest.raises(UserError, match="takes no drafter"):
        build_torch_engine(Path("/x"), {}, "bf16", {}, Path("/y"), drafter=(Path("/d"), {}), draft_len=3)


def test_redrafter_without_a_drafter_checkpoint_is_trained_not_refused(om):
    # no drafter.checkpoint: the pipeline trains the drafter (tasks/drafter.py) before converting it
    assert om.drafter.checkpoint is None
    assert check_variants(om) == ["bf16", "fp8", "fp8+redrafter"]
    assert check_variants(om, ["bf16", "fp8"]) == ["bf16", "fp8"]
    with pytest.raises(UserError, match="bf16\\+redrafter"):
        check_variants(om, ["bf16+redrafter"])
    with pytest.raises(UserError, match="unknown variant"):
        check_variants(om, ["int4"])


def _drafter(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"hidden_size": 8, "exit_dim": 16, "num_draft_layers": 2, "rnn": True, **config}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").write_bytes(b"x")
    return path


def test_drafter_layout_checks(tmp_path):
    assert check_drafter(_drafter(tmp_path / "ok"), 2, True)["exit_dim"] == 16
    with pytest.raises(UserError, match="3 draft layers"):
        check_drafter(_drafter(tmp_path / "layers", num_draft_layers=3), 2, True)
    sharded = _drafter(tmp_path / "sharded")
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="sharded"):
        check_drafter(sharded)
    bad = _drafter(tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="exit_dim, num_draft_layers, rnn"):
        check_drafter(bad)


def test_host_without_trtllm_names_the_image(om, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with pytest.raises(UserError) as err:
        require_build_host(om, ["bf16", "fp8"])
    assert "nvcr.io/nvidia/tensorrt-llm/release:1.1.0rc0" in str(err.value)
    assert "has no tensorrt_llm" in str(err.value)


def test_host_check_with_the_fake_install(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(FAKES / "site"))
    monkeypatch.setenv("PATH", f"{FAKES / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    common = {"image": "img:1", "python": sys.executable, "examples_dir": str(FAKES / "examples")}
    assert require_trtllm(
        version="1.1.0", tools=["trtllm-build"], scripts=[cmds.REDRAFTER_SCRIPT], **common
    ) == ("1.1.0rc0")
    with pytest.raises(UserError, match="generated for TensorRT-LLM 1.2.1, but this host has 1.1.0rc0"):
        require_trtllm(version="1.2.1", **common)
    with pytest.raises(UserError, match="missing-tool"):
        require_trtllm(version="1.1.0rc0", tools=["missing-tool"], **common)
    with pytest.raises(UserError, match="models/core/llama/convert_checkpoint.py"):
        require_trtllm(version="1.1.0rc0", scripts=[cmds.CONVERT_SCRIPTS["llama"]], **common)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(UserError, match="tensor parallel size 2 but CUDA_VISIBLE_DEVICES gives 1"):
        require_trtllm(version="1.1.0rc0", tp_size=2, **common)


def test_tp_size_from_the_work_pool_environment(monkeypatch):
    monkeypatch.setenv("MATHFORGE_TP_SIZE", "4")
    assert load_preset("openmath-14b").engine.trtllm.tp_size == 4
    assert load_preset("tiny").engine.trtllm is None  # torch presets ignore it


# ------------------------------------------------------------------ runner


def test_runner_streams_output_and_stops_at_the_first_failure(tmp_path):
    lines: list[str] = []
    ok = cmds.Command("say", (sys.executable, "-c", "print('one'); print('two')"))
    bad = cmds.Command("fail", (sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"))
    never = cmds.Command("never", (sys.executable, "-c", "open('never', 'w')"))
    log_file = tmp_path / "build.log"
    with pytest.raises(CommandFailed) as err:
        run_commands([ok, bad, never], log=lines.append, cwd=tmp_path, log_file=log_file)
    assert err.value.returncode == 3 and err.value.tail == ["boom"]
    assert "fail exited with code 3" in str(err.value)
    assert "[say] one" in lines and "[say] two" in lines and "[fail] boom" in lines
    assert not (tmp_path / "never").exists()
    assert log_file.read_text() == "one\ntwo\nboom\n"
    records = run_commands([ok], log=lines.append)
    assert records[0]["argv"] == list(ok.argv) and records[0]["seconds"] >= 0
    with pytest.raises(CommandFailed, match="could not start"):
        run_commands([cmds.Command("x", ("/nonexistent/tool",))], log=lines.append)
