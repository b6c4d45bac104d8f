"""Record a pipeline run in MLflow and show its comparison: terminal table, Prefect artifacts, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from artifacts import ArtifactRef
from mathforge import tracking

HEADLINE = (
    "ttft_ms_p50",
    "tpot_ms_p50",
    "itl_ms_p50",
    "e2e_ms_p50",
    "output_tok_s",
    "request_s",
    "accept_len_mean",
    "accuracy",
    "maj_at_k",
)


def metric_prefix(variant: str) -> str:
    """A variant's name as an MLflow metric-name prefix: MLflow refuses `+` in names (fp8+redrafter ->
    fp8-redrafter)."""
    return variant.replace("+", "-")


@task(cache_policy=NO_CACHE, name="start-tracking")
def start_tracking(experiment: str, preset: str, flow_run_id: str | None) -> str:
    tags = {"preset": preset}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    return tracking.start_parent_run(experiment, run_name=f"pipeline-{preset}", tags=tags)


@task(cache_policy=NO_CACHE, name="open-variant-run")
def open_variant_run(
    parent_run_id: str, variant: str, engine: ArtifactRef, engine_spec: dict[str, Any]
) -> str:
    """The variant's child run, with the same params and tags for every variant."""
    build = engine_spec.get("build", {})
    params = {
        "backend": engine_spec["backend"],
        "dtype": "fp8" if engine_spec.get("quantization") == "fp8" else build.get("dtype"),
        "speculative": json.dumps(engine_spec["speculative"], sort_keys=True)
        if engine_spec.get("speculative")
        else "none",
        "max_slots": build.get("max_slots"),
        "max_model_len": build.get("max_model_len"),
        "device": build.get("device"),
    }
    tags = {"engine.digest": engine.digest, "weights.digest": engine_spec["weights"]["digest"]}
    if engine_spec.get("drafter"):
        tags["drafter.digest"] = engine_spec["drafter"]["digest"]
    run_id = tracking.start_child_run(parent_run_id, variant, params, tags)
    sizes = {"weight_bytes": engine_spec["weight_bytes"]}
    if engine_spec.get("drafter_bytes"):
        sizes["drafter_bytes"] = engine_spec["drafter_bytes"]
    tracking.log_metrics(run_id, sizes)
    return run_id


@task(cache_policy=NO_CACHE, name="log-benchmark")
def log_benchmark(run_id: str, bench: dict[str, Any]) -> dict[str, float]:
    """Every concurrency level as a step; a speculative variant's levels carry `accept_len_mean` (tokens
    per verify forward, as the server reported it in `usage`), logged like every other metric."""
    return tracking.log_benchmark(run_id, bench["results"], Path(bench["results_file"]))


@task(cache_policy=NO_CACHE, name="compare-variants")
def compare(
    experiment: str, parent_run_id: str, rows: list[dict[str, Any]], benches: list[dict[str, Any]]
) -> str:
    """Print and publish the comparison, attach plots to the parent run, close every run."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    from mathforge import plots
    from mathforge.report import comparison_table, print_comparison

    table = comparison_table(rows, HEADLINE)
    print_comparison(table)
    if benches:
        by_variant = {b["variant"]: b["results"] for b in benches}
        for name, make in (
            ("plots/throughput.png", plots.throughput_figure),
            ("plots/latency.png", plots.latency_figure),
        ):
            fig = make(by_variant)
            tracking.log_figure(parent_run_id, fig, name)
            plots.close(fig)
    tracking.log_metrics(
        parent_run_id,
        {
            f"{metric_prefix(r['variant'])}.{k}": v
            for r in rows
            for k, v in r["metrics"].items()
            if k in HEADLINE
        },
    )
    for row in rows:
        tracking.finish_run(row["run_id"])
    tracking.finish_run(parent_run_id)
    url = tracking.compare_url(experiment, [r["run_id"] for r in rows])
    create_table_artifact(table, key="variant-comparison", description="Headline metrics per variant")
    create_link_artifact(url, link_text="Compare variants in MLflow", key="mlflow-compare")
    return url
