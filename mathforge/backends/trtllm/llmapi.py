"""The `--extra_llm_api_options` YAML for trtllm-serve's PyTorch backend (reference §4, §1c).

Used for the route that needs no engine build: an HF checkpoint (bf16) or the ModelOpt-layout FP8
checkpoint (fp8; `hf_quant_config.json` is read by the PyTorch backend, §1c), optionally with a
`speculative_config` selecting Eagle3, DraftTarget or NGram. ReDrafter has no decoding_type here (§0).
"""

from __future__ import annotations

from typing import Any

import yaml

from mathforge.backends.trtllm import versions
from mathforge.config import TrtllmSettings


def llm_api_options(settings: TrtllmSettings) -> dict[str, Any]:
    """The YAML document as a dict. `kv_cache_config` always carries the memory fraction: YAML keys override
    the CLI-derived args (§4), so a YAML `kv_cache_config` without it would reset the CLI's fraction."""
    versions.check_supported(settings.version)
    kv: dict[str, Any] = {"free_gpu_memory_fraction": settings.kv_cache_free_gpu_memory_fraction}
    if settings.kv_cache_dtype:
        kv["dtype"] = settings.kv_cache_dtype  # valid values auto | fp8 (§1c)
    options: dict[str, Any] = {"kv_cache_config": kv}
    spec = settings.speculative
    if spec is not None:
        config: dict[str, Any] = {
            "decoding_type": versions.decoding_type(spec.decoding_type, settings.version),
            "max_draft_len": spec.max_draft_len,
        }
        if spec.speculative_model:
            # `speculative_model_dir`: the 1.0-era name, kept as an alias of `speculative_model` later (§4)
            config["speculative_model_dir"] = spec.speculative_model
        if spec.max_matching_ngram_size is not None:
            config["max_matching_ngram_size"] = spec.max_matching_ngram_size
        options["speculative_config"] = config
        # the documented two-model example runs with the overlap scheduler off (§4)
        options["disable_overlap_scheduler"] = True
    return options


def llm_api_options_yaml(settings: TrtllmSettings) -> str:
    return yaml.safe_dump(llm_api_options(settings), sort_keys=False)
