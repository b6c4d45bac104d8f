"""Keep a preset's ReDrafter drafter current with its training data.

    watch-drafter-data (interval schedule)          rebuild-drafter (triggered by the event)
    fingerprint the drafter data ─► same as the     build_engines(speculative variants only):
    Prefect Variable `drafter-data-<preset>`?        the drafter and its engines rebuild, every other
      yes: nothing                                   artifact is a cache hit; then benchmark them and
      no:  emit `mathforge.drafter.data.changed`,    track them in MLflow
           then record the new fingerprint

The fingerprint is the one the drafter's recipe key uses (`tasks.drafter.resolve_drafter_data`): a hub
dataset's resolved revision sha, a local file's content sha256, the generator's parameters. Touching a file
(mtime only) therefore changes nothing, and the rebuild rebuilds exactly what the new data invalidates.

The first sighting of a preset (no Variable yet) only records the fingerprint: the drafter is built when
something first asks for a speculative variant (pipeline, build-engines), so there is nothing stale to
rebuild. `announce_first=True` emits on the first sighting too.

The Variable is written only after the server confirmed the event: a watcher that dies in between emits
again on its next run (a duplicate rebuild costs only cache hits), it never loses a change.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from artifacts import canonical_json
from artifacts.store import default_store
from flows.build_engines import build_engines
from flows.measure import measure_variants
from mathforge import tracking
from mathforge.backends.preflight import is_speculative
from mathforge.config import Preset, Variant, load_preset
from mathforge.engine.build import load_engine
from mathforge.errors import UserError
from tasks.drafter import resolve_drafter_data
from tasks.track import compare

DATA_CHANGED_EVENT = "mathforge.drafter.data.changed"
RESOURCE_PREFIX = "mathforge.drafter-data"
VARIABLE_PREFIX = "drafter-data-"


def preset_slug(cfg: Preset) -> str:
    """The preset's name as Prefect names allow it (lowercase letters, digits, dashes, underscores)."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", cfg.name.lower()).strip("-")
    if not slug:
        raise UserError(f"preset name {cfg.name!r} has no letters or digits to name its drafter data by")
    return slug


def variable_name(cfg: Preset) -> str:
    """The Prefect Variable holding the last drafter-data fingerprint seen for this preset."""
    return f"{VARIABLE_PREFIX}{preset_slug(cfg)}"


def resource_id(cfg: Preset) -> str:
    """The event resource a rebuild trigger matches on (prefect.yaml: `mathforge.drafter-data.<preset>`)."""
    return f"{RESOURCE_PREFIX}.{preset_slug(cfg)}"


def normalized(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON, so a stored one compares equal to a fresh one."""
    return json.loads(canonical_json(fingerprint))


def rebuild_variants(cfg: Preset, variants: list[str] | None) -> list[str]:
    """What a rebuild builds: the given variants, else the preset's speculative ones; only speculative
    variants, since nothing else depends on the drafter."""
    chosen = list(variants) if variants else [v for v in cfg.variants if is_speculative(v)]
    if not chosen or not all(is_speculative(v) for v in chosen):
        raise UserError(
            f"rebuild-drafter builds speculative variants (<weights>+redrafter) only; preset {cfg.name} lists "
            f"{', '.join(cfg.variants)} and variants={variants!r}: add fp8+redrafter to the preset's variants "
            "or pass variants=[...]"
        )
    return chosen


# ---------------------------------------------------------------- tasks


@task(name="read-drafter-data-variable", cache_policy=NO_CACHE)
def last_seen(name: str) -> dict[str, Any] | None:
    """The Variable's value ({"fingerprint": ..., ...}) or None when this preset was never seen."""
    from prefect.variables import Variable

    value = Variable.get(name, default=None)
    if value is not None and not (isinstance(value, dict) and isinstance(value.get("fingerprint"), dict)):
        raise UserError(
            f"Prefect Variable {name!r} does not hold a drafter-data record ({value!r}); delete it "
            f"(`prefect variable unset {name}`) and the next watch run records the current data"
        )
    return value


@task(name="announce-drafter-data-change", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def announce_change(
    resource: str, preset: str, preset_name: str, old: dict | None, new: dict, flow_run_id: str | None
) -> str:
    """Emit the change event and wait until the server has it (returns the event id).

    Sent on its own connection with a checkpoint after the event (a websocket ping answered only after the
    server read the event), not queued to Prefect's background events worker, so a failure fails this task
    and the Variable keeps the old fingerprint."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    related = []
    if flow_run_id:
        related.append(
            {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}
        )
    event = Event(
        event=DATA_CHANGED_EVENT,
        resource={"prefect.resource.id": resource, "prefect.resource.name": preset_name},
        related=related,
        payload={"preset": preset, "preset_name": preset_name, "old": old, "new": new},
    )

    async def send() -> None:
        async with get_events_client(checkpoint_every=1) as client:
            await client.emit(event)

    run_coro_as_sync(send())
    return str(event.id)


@task(name="record-drafter-data", cache_policy=NO_CACHE)
def remember(name: str, record: dict[str, Any]) -> None:
    from prefect.variables import Variable

    Variable.set(name, record, overwrite=True)


@task(name="start-drafter-rebuild-tracking", cache_policy=NO_CACHE)
def start_rebuild_tracking(experiment: str, preset_name: str, data: dict, flow_run_id: str | None) -> str:
    """The MLflow parent run of one rebuild, tagged with the drafter data it rebuilt for."""
    tags = {"preset": preset_name, "mathforge.trigger": "drafter-data", "drafter.data": canonical_json(data)}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    return tracking.start_parent_run(experiment, run_name=f"drafter-rebuild-{preset_name}", tags=tags)


# ---------------------------------------------------------------- flows


@flow(name="watch-drafter-data")
def watch_drafter_data(preset: str = "tiny", announce_first: bool = False) -> dict[str, Any]:
    """Compare the preset's drafter-data fingerprint with the last one seen; on a change emit
    `mathforge.drafter.data.changed` (which triggers rebuild-drafter) and record the new one."""
    log = get_run_logger()
    cfg = load_preset(preset)
    name = variable_name(cfg)
    current = normalized(resolve_drafter_data(cfg.drafter).fingerprint)
    seen = last_seen(name)
    previous = seen["fingerprint"] if seen else None
    result: dict[str, Any] = {
        "preset": cfg.name,
        "variable": name,
        "fingerprint": current,
        "previous": previous,
        "event_id": None,
    }
    if previous == current:
        log.info("drafter data of %s unchanged (%s)", cfg.name, canonical_json(current))
        return {**result, "status": "unchanged"}
    status = "changed" if seen else "first-seen"
    if seen or announce_first:
        result["event_id"] = announce_change(
            resource_id(cfg), preset, cfg.name, previous, current, flow_run.get_id()
        )
        log.info("drafter data of %s %s: emitted %s", cfg.name, status, DATA_CHANGED_EVENT)
    else:
        log.info("first sighting of %s's drafter data: recorded, nothing to rebuild", cfg.name)
    record = {
        "fingerprint": current,
        "preset": preset,
        "changed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "event_id": result["event_id"],
    }
    remember(name, record)
    return {**result, "status": status}


@flow(name="rebuild-drafter")
def rebuild_drafter(
    preset: str = "tiny",
    data_fingerprint: dict[str, Any] | None = None,
    variants: list[Variant] | None = None,
) -> dict[str, Any]:
    """Rebuild the drafter and the speculative variants (default: the preset's), benchmark and track them.

    Everything else the variants need (checkpoint, calibration, FP8 weights) is an artifact cache hit.
    `data_fingerprint` is what the triggering event announced; if the data changed again since, the
    current data wins (the next watch run announces it, and that rebuild is all cache hits)."""
    log = get_run_logger()
    cfg = load_preset(preset)
    chosen = rebuild_variants(cfg, variants)
    data = normalized(resolve_drafter_data(cfg.drafter).fingerprint)
    if data_fingerprint is not None and normalized(data_fingerprint) != data:
        log.warning(
            "the drafter data changed again since the event (%s, now %s): building the current data",
            canonical_json(data_fingerprint),
            canonical_json(data),
        )
    # opened first: the drafter's training run (tasks/drafter.py) nests under it
    parent_run_id = start_rebuild_tracking(cfg.experiment, cfg.name, data, flow_run.get_id())
    try:
        started = time.monotonic()
        engines = build_engines.fn(preset, chosen)
        build_s = round(time.monotonic() - started, 2)
        store = default_store()
        drafters = {
            v: load_engine(store.path(store.resolve(ref))).get("drafter") for v, ref in engines.items()
        }
        run_name = f"{cfg.name}-drafter-{time.strftime('%Y%m%d-%H%M%S')}"
        rows, benches = measure_variants(cfg, engines, parent_run_id, run_name)
        url = compare(cfg.experiment, parent_run_id, rows, benches)  # closes the runs
    except BaseException:
        tracking.finish_run(parent_run_id, "FAILED")  # not left RUNNING in the MLflow UI
        raise
    return {
        "preset": cfg.name,
        "drafter_data": data,
        "engines": {v: ref.model_dump() for v, ref in engines.items()},
        "drafters": drafters,
        "build_s": build_s,
        "metrics": {row["variant"]: row["metrics"] for row in rows},
        "mlflow_parent_run_id": parent_run_id,
        "mlflow_compare_url": url,
    }
