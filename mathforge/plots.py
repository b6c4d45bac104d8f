"""Figures people would rather look at than read: latency and throughput per variant, per concurrency."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _levels(results: Mapping[str, Any]) -> tuple[list[int], list[Mapping[str, float]]]:
    levels = results["levels"]
    return [int(lv["concurrency"]) for lv in levels], [lv["metrics"] for lv in levels]


def throughput_figure(by_variant: Mapping[str, Mapping[str, Any]]):
    """Output tokens/s and requests/s against concurrency, one line per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant, results in by_variant.items():
        conc, metrics = _levels(results)
        axes[0].plot(conc, [m["output_tok_s"] for m in metrics], marker="o", label=variant)
        axes[1].plot(conc, [m["request_s"] for m in metrics], marker="o", label=variant)
    for ax, title in zip(axes, ("output tokens/s", "requests/s"), strict=True):
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def latency_figure(by_variant: Mapping[str, Mapping[str, Any]]):
    """p50 (bar) and p99 (whisker) of TTFT, TPOT and end-to-end latency per variant at each concurrency."""
    keys = ("ttft_ms", "tpot_ms", "e2e_ms")
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 4))
    variants = list(by_variant)
    width = 0.8 / max(len(variants), 1)
    for ax, key in zip(axes, keys, strict=True):
        for i, variant in enumerate(variants):
            conc, metrics = _levels(by_variant[variant])
            xs = [j + i * width for j in range(len(conc))]
            p50 = [m[f"{key}_p50"] for m in metrics]
            p99 = [m[f"{key}_p99"] for m in metrics]
            ax.bar(xs, p50, width, label=variant)
            ax.errorbar(
                xs,
                p50,
                yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99, strict=True)]],
                fmt="none",
                ecolor="black",
                capsize=3,
            )
            ax.set_xticks(
                [j + width * (len(variants) - 1) / 2 for j in range(len(conc))], [f"c={c}" for c in conc]
            )
        ax.set_title(f"{key} (p50 bar, p99 whisker)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
