"""Which TensorRT-LLM release can do what: every version-dependent choice the generated commands make.

Facts from reference/trtllm_redrafter.md (§0 version picture, §2, §3, §4). One table, so a new release is
one edit here and a golden test, not a hunt through the builders.
"""

from __future__ import annotations

import re

from mathforge.errors import UserError

# 1.0: the PyTorch backend becomes the default and `--backend trt` selects engines (§0). Older releases have
# other flags (no `--backend` choice list, `--auto_parallel` in trtllm-build): not generated for.
MIN_VERSION = (1, 0)
# The TensorRT engine flow (trtllm-build, per-model convert_checkpoint.py, examples/redrafter, --backend trt)
# was removed on main in mid-2026; 1.1.x/1.2.x still have it, treat >= 1.3 as without it (§0, [U] for the
# exact first release). ReDrafter exists only in that flow: no PyTorch decoding_type for it in any version.
ENGINE_FLOW_REMOVED = (1, 3)
# `speculative_config.decoding_type` spellings: the 1.0-era `DecodingBaseConfig.from_dict` keys vs the
# later 1.x pydantic union (`Eagle3`, `Draft_Target`) (§4). The boundary release is [U]: 1.0.x is the one
# read in source with from_dict; later 1.x is taken to be the union.
UNION_DECODING_TYPES = (1, 1)
_FROM_DICT_NAMES = {"Eagle3": "Eagle", "DraftTarget": "DraftTarget", "NGram": "NGram"}
_UNION_NAMES = {"Eagle3": "Eagle3", "DraftTarget": "Draft_Target", "NGram": "NGram"}

_VERSION_RE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a TensorRT-LLM version string: '1.1.0rc0' -> (1, 1, 0)."""
    match = _VERSION_RE.match(str(version))
    if not match:
        raise UserError(f"TensorRT-LLM version {version!r} is not a version like 1.1.0 or 1.2.0rc6")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_supported(version: str) -> None:
    if parse_version(version)[:2] < MIN_VERSION:
        raise UserError(
            f"TensorRT-LLM {version} is older than 1.0; mathforge generates commands for 1.0 and later "
            "(set engine.trtllm.version, e.g. 1.1.0rc0, the reference recipe's release)"
        )


def has_engine_flow(version: str) -> bool:
    return parse_version(version)[:2] < ENGINE_FLOW_REMOVED


def check_engine_flow(version: str, what: str = "TensorRT engines (trtllm-build)") -> None:
    """Refuse the engine flow on releases that no longer have it."""
    check_supported(version)
    if not has_engine_flow(version):
        raise UserError(
            f"{what} need TensorRT-LLM 1.2.x or older, but engine.trtllm.version is {version}: the TensorRT "
            "engine backend (trtllm-build, convert_checkpoint.py, --backend trt) was removed in 1.3. Pin "
            "engine.trtllm.version to 1.1.0rc0 (the reference recipe) or a 1.2.x release, or set "
            "engine.trtllm.runtime: pytorch to serve HF/ModelOpt checkpoints without an engine build"
        )


def check_redrafter(version: str) -> None:
    """ReDrafter is an engine-only feature (`--speculative_decoding_mode explicit_draft_tokens`)."""
    check_supported(version)
    if not has_engine_flow(version):
        raise UserError(
            f"the fp8+redrafter variant needs TensorRT-LLM 1.2.x or older, but engine.trtllm.version is "
            f"{version}: ReDrafter exists only in the TensorRT engine flow, which 1.3 removed, and the "
            "PyTorch backend has no ReDrafter decoding_type. Pin engine.trtllm.version to 1.1.0rc0 (the "
            "reference recipe), or drop the variant (PyTorch-backend alternatives: engine.trtllm.speculative "
            "with Eagle3, DraftTarget or NGram)"
        )


def decoding_type(kind: str, version: str) -> str:
    """The YAML spelling of a speculative decoding type for this release."""
    names = _UNION_NAMES if parse_version(version)[:2] >= UNION_DECODING_TYPES else _FROM_DICT_NAMES
    if kind not in names:
        raise UserError(f"unknown speculative decoding type {kind!r}; choose from {', '.join(names)}")
    return names[kind]


def serve_backend(runtime: str, version: str) -> str:
    """`trtllm-serve --backend` value: engines are `trt` in 1.0-1.2 (newest also accept `tensorrt`)."""
    if runtime == "trt":
        check_engine_flow(version, "serving TensorRT engines")
        return "trt"
    check_supported(version)
    return "pytorch"
