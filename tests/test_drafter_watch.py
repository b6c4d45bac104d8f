"""Keeping the drafter current, against the session's real Prefect server: the watch flow (fingerprint ->
Variable -> event), the deployed trigger (event -> rebuild-drafter flow run, made by the server's
automation services), and the rebuild (only the drafter and the speculative engines rebuild).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from artifacts import canonical_json
from flows.drafter import (
    DATA_CHANGED_EVENT,
    rebuild_drafter,
    rebuild_variants,
    resource_id,
    variable_name,
    watch_drafter_data,
)
from mathforge.config import Preset, load_preset
from mathforge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SPEC = "fp8+redrafter"
pytestmark = pytest.mark.integration


def write_data(path: Path, rows: int, start: int = 0) -> None:
    """A local drafter training set: shipped tiny problems with their solutions, one JSON row each."""
    shipped = (REPO / "mathforge" / "data" / "problems" / "tiny.jsonl").read_text().splitlines()
    path.write_text("".join(line + "\n" for line in shipped[start : start + rows]))


def make_preset(tmp: Path, name: str, data: Path, variants: list[str] | None = None) -> Path:
    """The tiny preset at test sizes: drafter data from a local file, a few training steps, a short bench."""
    preset = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    preset["name"] = name
    preset["variants"] = variants or preset["variants"]
    preset["calibration"].update({"num_samples": 4, "max_seq_len": 128})
    preset["engine"].update({"max_slots": 2, "max_model_len": 512})
    preset["drafter"] = {
        **(preset.get("drafter") or {}),
        "data_source": str(data),  # content-fingerprinted: sha256 of the file
        "steps": 2,
        "batch_size": 2,
        "max_seq_len": 256,
        "eval_nrows": 2,
    }
    preset["bench"].update({"num_prompts": 2, "concurrency": [1], "max_tokens": 8, "warmup": 0})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture(scope="module")
def prefect_api(prefect_server):
    """The session's real Prefect server as this process's API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server
        # deliver this module's logs and events while the server is up: left queued, the interpreter's exit
        # would retry them against a stopped server for a minute
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)


def variable(name: str):
    from prefect.variables import Variable

    return Variable.get(name, default=None)


def events_of(api: str, resource: str, expect: int, timeout: float = 30.0) -> list[dict]:
    """The server's stored change events of `resource`, once at least `expect` are stored (the server
    persists events in batches, every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        body = {
            "filter": {"event": {"name": [DATA_CHANGED_EVENT]}, "resource": {"id": [resource]}},
            "limit": 50,
        }
        events = httpx.post(f"{api}/events/filter", json=body, timeout=10).json()["events"]
        if len(events) >= expect or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


# ---------------------------------------------------------------- no server


def test_names_follow_the_preset_name():
    cfg = Preset.model_validate({"name": "My Preset.v2", "model": {"source": "embedded:tiny"}})
    assert variable_name(cfg) == "drafter-data-my-preset-v2"
    assert resource_id(cfg) == "mathforge.drafter-data.my-preset-v2"


def test_rebuild_refuses_a_preset_without_speculative_variants():
    cfg = load_preset("tiny").model_copy(update={"variants": ["bf16", "fp8"]})
    with pytest.raises(UserError, match="fp8\\+redrafter"):
        rebuild_variants(cfg, None)
    with pytest.raises(UserError, match="speculative"):
        rebuild_variants(cfg, ["bf16"])
    assert rebuild_variants(cfg, ["fp8+redrafter"]) == ["fp8+redrafter"]


# ---------------------------------------------------------------- (a) the watch flow


def test_watch_emits_once_per_content_change(prefect_api, tmp_path):
    data = tmp_path / "drafter.jsonl"
    write_data(data, 6)
    preset = make_preset(tmp_path, f"watch-{uuid.uuid4().hex[:8]}", data)
    cfg = load_preset(str(preset))
    name = variable_name(cfg)

    first = watch_drafter_data(str(preset))
    assert (first["status"], first["event_id"]) == ("first-seen", None)  # recorded, nothing to rebuild
    recorded = variable(name)
    assert recorded["fingerprint"] == first["fingerprint"] and recorded["preset"] == str(preset)

    same = watch_drafter_data(str(preset))
    assert (same["status"], same["event_id"]) == ("unchanged", None)
    assert variable(name) == recorded  # not even rewritten

    later = time.time() + 3600
    os.utime(data, (later, later))  # touched: same bytes
    touched = watch_drafter_data(str(preset))
    assert (touched["status"], touched["event_id"]) == ("unchanged", None)
    assert variable(name) == recorded

    write_data(data, 6, start=10)  # new content
    changed = watch_drafter_data(str(preset))
    assert changed["status"] == "changed" and changed["event_id"]
    assert changed["fingerprint"] != first["fingerprint"] and changed["previous"] == first["fingerprint"]
    now = variable(name)
    assert now["fingerprint"] == changed["fingerprint"] and now["event_id"] == changed["event_id"]

    events = events_of(prefect_api, resource_id(cfg), expect=1)
    assert len(events) == 1, events
    [event] = events
    assert event["id"] == changed["event_id"]
    assert event["payload"] == {
        "preset": str(preset),
        "preset_name": cfg.name,
        "old": first["fingerprint"],
        "new": changed["fingerprint"],
    }
    assert any(r["prefect.resource.role"] == "flow-run" for r in event["related"])

    again = watch_drafter_data(str(preset))  # the change was recorded: no second event for it
    assert (again["status"], again["event_id"]) == ("unchanged", None)


# ---------------------------------------------------------------- (b) the deployed trigger


def deploy_from_prefect_yaml(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """`prefect --no-prompt deploy --name ...` from the repository, run in this process by Prefect's own CLI
    test runner (a subprocess would import Prefect, torch and the flows again: ~10 s on 2 busy cores)."""
    from prefect.testing.cli import CycloptsCliRunner

    monkeypatch.chdir(REPO)
    args = ["--no-prompt", "deploy"] + [arg for name in names for arg in ("--name", name)]
    result = CycloptsCliRunner().invoke(args)
    assert result.exit_code == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.exception!r}"


def ensure_pool(api: str, name: str) -> None:
    """A process work pool (what `prefect work-pool create NAME --type process` makes), unless it exists."""
    from prefect.workers.process import ProcessWorker

    if httpx.get(f"{api}/work_pools/{name}", timeout=10).status_code == 200:
        return
    body = {
        "name": name,
        "type": "process",
        "base_job_template": ProcessWorker.get_default_base_job_template(),
    }
    r = httpx.post(f"{api}/work_pools/", json=body, timeout=10)
    assert r.status_code in (201, 409), r.text


def test_change_event_starts_rebuild_drafter_through_the_deployed_trigger(prefect_api, tmp_path, monkeypatch):
    from prefect.variables import Variable

    ensure_pool(prefect_api, "cpu")
    deploy_from_prefect_yaml(monkeypatch, "watch-drafter-data/tiny", "rebuild-drafter/tiny")
    deployments = httpx.post(f"{prefect_api}/deployments/filter", json={}, timeout=10).json()
    by_entry = {d["entrypoint"]: d for d in deployments if d["name"] == "tiny"}
    watch = by_entry["flows/drafter.py:watch_drafter_data"]
    rebuild = by_entry["flows/drafter.py:rebuild_drafter"]
    [schedule] = watch["schedules"]
    assert schedule["active"] and schedule["schedule"]["interval"] == 600
    assert watch["work_pool_name"] == rebuild["work_pool_name"] == "cpu"

    automations = httpx.post(f"{prefect_api}/automations/filter", json={}, timeout=10).json()
    [auto] = [a for a in automations if a["name"] == "rebuild-drafter-on-data-change-tiny"]
    assert auto["trigger"]["expect"] == [DATA_CHANGED_EVENT]
    assert auto["trigger"]["match"] == {"prefect.resource.id": "mathforge.drafter-data.tiny"}
    [action] = auto["actions"]
    assert (action["type"], action["deployment_id"]) == ("run-deployment", rebuild["id"])

    # the watcher on a preset named `tiny` (its drafter data in a local file): its change event is the one
    # the trigger matches; the automation passes the preset path and the new fingerprint on
    data = tmp_path / "drafter.jsonl"
    write_data(data, 5)
    preset = make_preset(tmp_path, "tiny", data)
    Variable.unset("drafter-data-tiny")
    assert watch_drafter_data(str(preset))["status"] == "first-seen"
    write_data(data, 5, start=20)
    changed = watch_drafter_data(str(preset))
    assert changed["status"] == "changed"

    deadline = time.monotonic() + 60
    while True:
        runs = httpx.post(
            f"{prefect_api}/flow_runs/filter",
            json={"flow_runs": {"deployment_id": {"any_": [rebuild["id"]]}}},
            timeout=10,
        ).json()
        if runs or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    try:
        assert len(runs) == 1, "the automation did not start exactly one rebuild-drafter run"
        [run] = runs
        assert run["parameters"] == {"preset": str(preset), "data_fingerprint": changed["fingerprint"]}
        assert run["state_type"] == "SCHEDULED"  # a `cpu` worker runs it (not started here)
    finally:  # no worker of a later test may pick these up
        for run in runs:
            httpx.delete(f"{prefect_api}/flow_runs/{run['id']}", timeout=10)
        Variable.unset("drafter-data-tiny")


# ---------------------------------------------------------------- (c) the rebuild


def built(home: Path) -> list[dict]:
    events = home / "artifacts" / "events.jsonl"
    lines = events.read_text().splitlines() if events.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == "built"]


def test_rebuild_after_a_data_change_rebuilds_only_the_drafter_and_speculative_engines(
    prefect_api, tmp_path, monkeypatch
):
    """One speculative variant keeps this test short: bf16+redrafter takes the same path (one more
    engine on the same drafter) and would cost another server start for its benchmark."""
    from flows.build_engines import build_engines
    from mathforge import tracking

    home = tmp_path / "home"
    monkeypatch.setenv("MATHFORGE_HOME", str(home))
    monkeypatch.delenv("MATHFORGE_ARTIFACTS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "drafter.jsonl"
    write_data(data, 8)
    preset = str(make_preset(tmp_path, f"rebuild-{uuid.uuid4().hex[:8]}", data, ["bf16", "fp8", SPEC]))

    before = build_engines(preset)  # everything: checkpoint, calibration, fp8 weights, drafter, 3 engines
    first_builds = built(home)
    assert sorted(e["kind"] for e in first_builds) == [
        "calibration",
        "checkpoint",
        "drafter",
        "engine",
        "engine",
        "engine",
        "fp8-checkpoint",
    ]

    write_data(data, 8, start=30)
    result = rebuild_drafter(preset)

    rebuilt = built(home)[len(first_builds) :]  # checkpoint, calibration, fp8 weights: cache hits
    assert sorted(e["kind"] for e in rebuilt) == ["drafter", "engine"], rebuilt
    [drafter, engine] = sorted(rebuilt, key=lambda e: e["kind"])
    assert set(result["engines"]) == {SPEC}
    assert result["engines"][SPEC]["key"] == engine["key"]
    assert result["engines"][SPEC]["digest"] not in {ref.digest for ref in before.values()}
    assert result["drafters"][SPEC]["digest"] == drafter["digest"]

    # the engines that do not decode with the drafter are still current: cache hits, unchanged
    again = build_engines(preset, ["bf16", "fp8"])
    assert len(built(home)) == len(first_builds) + 2
    assert {v: r.digest for v, r in again.items()} == {v: before[v].digest for v in ("bf16", "fp8")}

    # benchmarked and tracked: a parent run tagged with the data, holding the drafter's training run
    # and the variant's run
    client = tracking._client()
    parent = client.get_run(result["mlflow_parent_run_id"])
    assert parent.data.tags["drafter.data"] == canonical_json(result["drafter_data"])
    children = {c.data.tags["mathforge.role"]: c for c in tracking.child_runs(parent.info.run_id)}
    assert set(children) == {"drafter", "variant"}
    assert "redrafter0_loss" in children["drafter"].data.metrics
    variant = children["variant"]
    assert variant.data.tags["variant"] == SPEC
    assert variant.data.tags["drafter.digest"] == drafter["digest"]
    assert variant.data.metrics["output_tok_s"] > 0
    assert variant.data.metrics["accept_len_mean"] >= 1  # tokens per verify forward
