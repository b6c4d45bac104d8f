"""prefect.yaml as users deploy it: a real Prefect server, `prefect deploy --all`, a real process worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def prefect(
    api_url: str, *args: str, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "PREFECT_API_URL": api_url, **(env or {})},
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# every pool prefect.yaml deploys to, with its type (deploy --all needs them all to exist)
POOLS = {"cpu": "process", "gpu": "process", "gpu-h100": "process", "gpu-h100-docker": "docker"}


def test_prefect_yaml_declares_cpu_and_gpu_pools():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools == set(POOLS)
    entrypoints = {d["entrypoint"] for d in spec["deployments"]}
    for entry in entrypoints:  # every entrypoint names a real flow
        path, func = entry.split(":")
        assert f"def {func}(" in (REPO / path).read_text()
    assert {
        "flows/pipeline.py:pipeline",
        "flows/build_engines.py:build_engines",
        "flows/benchmark_engines.py:benchmark_engines",
        "flows/evaluate.py:evaluate",
    } <= entrypoints


def test_h100_pools_carry_gpus_and_tensor_parallel_size():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = spec["definitions"]["work_pools"]
    process_env = pools["gpu-h100"]["job_variables"]["env"]
    gpus = process_env["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(gpus) == int(process_env["MATHFORGE_TP_SIZE"]) == 2
    docker = pools["gpu-h100-docker"]["job_variables"]
    # what prefect-docker hands to docker-py's containers.create(): converted as a Docker engine would get
    # it (reference prefect_mlflow.md §2.5), no engine needed
    from docker.models.containers import _create_container_args

    created = _create_container_args(
        {"image": docker["image"], "version": "1.44", **docker["container_create_kwargs"]}
    )
    host = created["host_config"]
    [request] = host["DeviceRequests"]
    assert (request["Driver"], request["DeviceIDs"], request["Capabilities"]) == ("nvidia", gpus, [["gpu"]])
    assert len(request["DeviceIDs"]) == int(docker["env"]["MATHFORGE_TP_SIZE"])
    assert host["IpcMode"] == "host" and host["ShmSize"] == 16 * 2**30
    assert {u["Name"] for u in host["Ulimits"]} == {"memlock", "stack"}
    trt = [d for d in spec["deployments"] if d["work_pool"]["name"].startswith("gpu-h100")]
    assert {d["parameters"]["preset"] for d in trt} == {"openmath-14b"}
    assert all(d["pull"][0]["prefect.deployments.steps.set_working_directory"] for d in trt)


def test_deployed_build_runs_on_a_process_worker(prefect_server, tmp_path):
    home = tmp_path / "home"
    for pool, kind in POOLS.items():  # as the README says: deploying needs every pool to exist
        # the API call `prefect work-pool create` makes, without a CLI start-up per pool
        r = httpx.post(f"{prefect_server}/work_pools/", json={"name": pool, "type": kind}, timeout=60)
        assert r.status_code in (201, 409), r.text
    prefect(prefect_server, "--no-prompt", "deploy", "--all")
    deployments = httpx.post(f"{prefect_server}/deployments/filter", json={}, timeout=60).json()
    names = {(d["name"], d["entrypoint"]) for d in deployments}
    assert ("tiny", "flows/build_engines.py:build_engines") in names
    assert ("openmath-14b-docker", "flows/pipeline.py:pipeline") in names
    docker = next(d for d in deployments if d["name"] == "openmath-14b-docker")
    kwargs = docker["job_variables"]["container_create_kwargs"]
    assert kwargs["device_requests"][0]["capabilities"] == [["gpu"]]

    build = next(
        d
        for d in deployments
        if d["entrypoint"] == "flows/build_engines.py:build_engines" and d["name"] == "tiny"
    )
    run = httpx.post(  # what `prefect deployment run build-engines/tiny --param ...` sends
        f"{prefect_server}/deployments/{build['id']}/create_flow_run",
        json={"parameters": {"variants": ["bf16"]}},
        timeout=60,
    )
    assert run.status_code == 201, run.text
    prefect(
        prefect_server,
        "worker",
        "start",
        "--pool",
        "cpu",
        "--run-once",
        "--install-policy",
        "never",
        env={"MATHFORGE_HOME": str(home)},
        timeout=420,
    )

    runs = httpx.post(
        f"{prefect_server}/flow_runs/filter",
        json={
            "deployments": {
                "id": {"any_": [d["id"] for d in deployments if d["entrypoint"].startswith("flows/build")]}
            },
        },
        timeout=60,
    ).json()
    assert [r["state_type"] for r in runs] == ["COMPLETED"], json.dumps(runs, indent=1)[:3000]
    built = [json.loads(line) for line in (home / "artifacts" / "events.jsonl").read_text().splitlines()]
    assert sorted(e["kind"] for e in built if e["event"] == "built") == ["checkpoint", "engine"]
