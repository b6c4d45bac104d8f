"""The pipeline's plan without running it: `mathforge pipeline --dry-run`.

For a preset it lists, in the order a run executes them, every step: the artifact it produces with its
recipe key (computed by the very tasks that would run, from the same parameters), the external commands
it would run, or, when a key cannot be known yet, what it waits on (a Hub revision not in the local
cache, the content of an artifact not built yet, a drafter that does not exist). Nothing is built,
downloaded or started: Hub revisions resolve from the local Hugging Face cache only, and artifacts the
store already holds show as cached, with their paths in the commands.

`build_plan(preset, variants, store, resolver)` is pure apart from reading the store and local files;
tests inject a `Resolver`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.keys import ArtifactRef, recipe_key, split_arguments
from artifacts.store import ArtifactStore
from mathforge.backends.preflight import (
    REDRAFTER,
    TRTLLM_BF16_REDRAFTER,
    is_speculative,
    weights_of,
)
from mathforge.config import VARIANTS, Preset
from mathforge.errors import UserError

BUILD_DIR = "<build-dir>"  # the empty directory a build writes into (inside the store, named at run time)
_PLACEHOLDER = re.compile(r"<[\w:+.-]+>")
_SAFE = re.compile(r"^[\w/.+:-]+$")


def shell(command: Any) -> str:
    """A command line as a shell would take it; paths with `<placeholders>` stay unquoted, for reading."""
    argv = command.to_list() if hasattr(command, "to_list") else list(command)

    def word(a: str) -> str:
        if _PLACEHOLDER.search(a) and _SAFE.match(_PLACEHOLDER.sub("x", a)):
            return a
        return shlex.quote(a)

    return " ".join(word(a) for a in argv)


@dataclass(frozen=True)
class Pending:
    """An input whose identity is not known yet, and why."""

    reason: str


@dataclass
class Step:
    index: int
    title: str
    task: str
    produces: str | None = None  # artifact kind; None for serving
    key: str | None = None
    digest: str | None = None  # set when the store already holds the artifact
    waits_on: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # external commands, shell-quoted, in order
    does: str | None = None  # what the step does in Python (no external command)
    then: str | None = None  # what it does after its commands
    files: dict[str, str] = field(default_factory=dict)  # generated files: name -> content
    blocked: str | None = None  # this step cannot run as configured

    @property
    def status(self) -> str:
        if self.blocked:
            return "blocked"
        if self.produces is None:
            return "runs"
        if self.digest:
            return "cached"
        return "builds" if self.key else "waits"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "title": self.title,
            "task": self.task,
            "produces": self.produces,
            "status": self.status,
            "key": self.key,
            "digest": self.digest,
            "waits_on": self.waits_on,
            "commands": self.commands,
            "does": self.does,
            "then": self.then,
            "files": self.files,
            "blocked": self.blocked,
        }


@dataclass
class Plan:
    preset: str
    header: list[str]
    steps: list[Step]

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "header": self.header, "steps": [s.to_dict() for s in self.steps]}

    def commands(self) -> list[str]:
        return [c for s in self.steps for c in s.commands]

    def render(self) -> str:
        lines = [f"mathforge plan: preset {self.preset} (dry run: nothing is built, downloaded or started)"]
        lines += [f"  {h}" for h in self.header]
        for s in self.steps:
            lines.append("")
            lines.append(f"[{s.index}] {s.title}  ({s.status})")
            if s.produces:
                lines.append(f"    produces: {s.produces}")
                if s.key:
                    lines.append(f"    recipe key: {s.key}")
                else:
                    lines.append("    recipe key: not known yet; waits on:")
                    lines += [f"      - {w}" for w in s.waits_on]
                if s.digest:
                    lines.append(f"    stored as: {s.digest} (a run reuses it)")
            if s.blocked:
                lines.append(f"    blocked: {s.blocked}")
            if s.does:
                lines.append(f"    does: {s.does}")
            lines += [f"    $ {c}" for c in s.commands]
            if s.then:
                lines.append(f"    then: {s.then}")
            for name, content in s.files.items():
                lines.append(f"    {name}:")
                lines += [f"      | {line}" for line in content.rstrip().splitlines()]
        return "\n".join(lines)


@dataclass
class Resolver:
    """How the plan learns sources' identities: by default offline, from local files and caches only."""

    model: Callable[[Preset], Any]
    calibration: Callable[[Preset], Any]
    drafter: Callable[[str], Any]  # drafter.checkpoint -> its SourceSpec
    drafter_data: Callable[[Preset], Any] | None = None  # the drafter's training data -> its SourceSpec

    @staticmethod
    def offline() -> Resolver:
        from tasks.engine import resolve_drafter
        from tasks.sources import resolve_calibration, resolve_model

        def drafter_data(cfg: Preset) -> Any:
            from tasks.drafter import resolve_drafter_data

            return _offline(getattr(resolve_drafter_data, "fn", resolve_drafter_data), cfg.drafter)

        return Resolver(
            model=lambda cfg: _offline(resolve_model.fn, cfg.model),
            calibration=lambda cfg: _offline(resolve_calibration.fn, cfg.calibration),
            drafter=resolve_drafter,
            drafter_data=drafter_data,
        )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _offline(fn: Callable[[Any], Any], settings: Any) -> Any:
    with _hub_offline():
        return fn(settings)


@dataclass
class _Art:
    """An artifact of the plan: known (ref) or pending."""

    step: Step
    store: ArtifactStore

    def arg(self) -> ArtifactRef | Pending:
        s = self.step
        if s.digest and s.key and s.produces:
            return ArtifactRef(kind=s.produces, key=s.key, digest=s.digest)
        if s.blocked:
            return Pending(f"[{s.index}] {s.title}, which cannot be built as configured")
        return Pending(f"the content of [{s.index}] {s.title} (known once it is built)")

    def path(self, label: str) -> str:
        return str(self.store.path(self.step.digest)) if self.step.digest else f"<{label}>"


class _Planner:
    def __init__(self, preset: Preset, store: ArtifactStore, resolver: Resolver):
        self.cfg = preset
        self.store = store
        self.resolver = resolver
        self.steps: list[Step] = []

    def step(self, title: str, task: str, produces: str | None = None) -> Step:
        s = Step(index=len(self.steps) + 1, title=title, task=task, produces=produces)
        self.steps.append(s)
        return s

    def art(self, step: Step) -> _Art:
        return _Art(step, self.store)

    def key(self, step: Step, task: Any, *positional: Any, **arguments: Any) -> None:
        """The recipe key exactly as `task` (an artifact_task) computes it, or what it waits on."""
        if positional:  # bound by position, for tasks whose parameter names this module need not know
            names = [n for n in inspect.signature(task.fn).parameters if n != "out"]
            arguments = {**dict(zip(names, positional, strict=False)), **arguments}
        waits = [a.reason for a in arguments.values() if isinstance(a, Pending)]
        if waits:
            step.waits_on = waits
            return
        signature = inspect.signature(task.fn)
        bound = signature.bind(**arguments)
        bound.apply_defaults()
        refs, params = split_arguments(bound.arguments)
        step.key = recipe_key(
            task.fn.artifact_kind, task.fn.artifact_version, params, {n: r.digest for n, r in refs.items()}
        )
        hit = self.store.lookup(step.key, quiet=True)
        step.digest = hit.digest if hit else None

    def source(self, resolve: Callable[[], Any], what: str, repo: str, revision: str | None) -> Any:
        try:
            return resolve()
        except UserError as exc:
            if "offline" in str(exc):  # a Hub revision: resolved to a commit when the run starts
                return Pending(
                    f"the commit of {repo}@{revision or 'main'} (resolved when the run starts; it is not in "
                    "the local Hugging Face cache)"
                )
            return Pending(f"{what}: {exc}")


def build_plan(
    preset: Preset,
    variants: Sequence[str] | None = None,
    *,
    store: ArtifactStore | None = None,
    resolver: Resolver | None = None,
    evaluation: bool = True,
) -> Plan:
    """The steps of `mathforge pipeline` for this preset, in the order the flow runs them."""
    from artifacts.store import default_store

    chosen = list(variants or preset.variants)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    p = _Planner(preset, store or default_store(), resolver or Resolver.offline())
    engines = _build_steps(p, chosen)
    _serve_steps(p, engines, evaluation)
    return Plan(preset=preset.name, header=_header(p, chosen), steps=p.steps)


def _header(p: _Planner, variants: list[str]) -> list[str]:
    cfg = p.cfg
    lines = [f"variants: {', '.join(variants)}", f"artifact store: {p.store.root}"]
    t = cfg.engine.trtllm
    if cfg.engine.backend == "trtllm" and t is not None:
        runtime = "TensorRT engines" if t.runtime == "trt" else "PyTorch backend (no engine build)"
        lines.insert(0, f"backend: trtllm, {runtime}, TensorRT-LLM {t.version}, tensor parallel {t.tp_size}")
        lines.insert(
            1, f"runs on: a GPU worker with {t.tp_size} GPU(s) in {t.container_image} (docs/trtllm.md)"
        )
    else:
        lines.insert(0, f"backend: torch on {cfg.engine.device}")
    return lines


def _build_steps(p: _Planner, variants: list[str]) -> dict[str, tuple[_Art, _Art, _Art | None]]:
    """Per variant: (its engine, the checkpoint it serves from, its drafter or None)."""
    from tasks.calibration import calibration
    from tasks.engine import (
        build_engine,
        build_speculative_engine,
        build_trtllm_engine,
        import_drafter,
        trtllm_checkpoint,
    )
    from tasks.model import checkpoint
    from tasks.quantize import quantize_fp8

    cfg = p.cfg
    m, c = cfg.model, cfg.calibration

    s = p.step("checkpoint", "checkpoint", "checkpoint")
    source = p.source(lambda: p.resolver.model(cfg), f"model {m.source}", m.source, m.revision)
    p.key(s, checkpoint, source=source)
    where = m.source if m.revision is None else f"{m.source}@{m.revision}"
    s.does = f"put the checkpoint {where} (config, safetensors, tokenizer) into the store"
    ckpt = p.art(s)

    calib = None
    if any(weights_of(v) == "fp8" for v in variants):
        s = p.step("calibration", "calibration", "calibration")
        calib_source = p.source(
            lambda: p.resolver.calibration(cfg), f"dataset {c.source}", c.source, c.revision
        )
        p.key(
            s,
            calibration,
            checkpoint=ckpt.arg(),
            source=calib_source,
            num_samples=c.num_samples,
            seed=c.seed,
            split=c.split,
            text_field=c.text_field,
        )
        split = f" split {c.split}" if c.split else ""
        s.does = (
            f"render {c.num_samples} samples of {c.source}{split} with the checkpoint's chat template into "
            "data/calibration.parquet (one `text` column)"
        )
        calib = p.art(s)

    trt = (
        cfg.engine.backend == "trtllm"
        and cfg.engine.trtllm is not None
        and cfg.engine.trtllm.runtime == "trt"
    )
    if trt:
        return _tensorrt_steps(
            p, variants, ckpt, calib, trtllm_checkpoint, import_drafter, build_trtllm_engine
        )

    weights = {"bf16": ckpt}
    if calib is not None:
        s = p.step("fp8 checkpoint", "quantize-fp8", "fp8-checkpoint")
        p.key(
            s,
            quantize_fp8,
            checkpoint=ckpt.arg(),
            calibration=calib.arg(),
            num_samples=c.num_samples,
            max_seq_len=c.max_seq_len,
        )
        s.does = "calibrate per-tensor static FP8 scales; write the ModelOpt/HF-layout FP8 checkpoint"
        weights["fp8"] = p.art(s)
    on_torch = cfg.engine.backend == "torch"
    speculative = any(map(is_speculative, variants))
    drafter = _drafter_step(p, ckpt, import_drafter) if on_torch and speculative else None
    engines = {}
    for v in variants:
        w = weights[weights_of(v)]
        if not is_speculative(v):
            s = p.step(f"engine {v}", "build-engine", "engine")
            p.key(s, build_engine, weights=w.arg(), variant=v, settings=cfg.engine)
            s.does = "record the weights and serving settings in engine.json (nothing is compiled)"
            engines[v] = (p.art(s), w, None)
            continue
        s = p.step(f"engine {v}", "build-speculative-engine", "engine")
        if not on_torch:
            s.blocked = (
                TRTLLM_BF16_REDRAFTER
                if v != REDRAFTER
                else "fp8+redrafter needs TensorRT engines (engine.trtllm.runtime: trt)"
            )
        else:
            p.key(
                s,
                build_speculative_engine,
                weights=w.arg(),
                drafter=drafter.arg(),
                variant=v,
                settings=cfg.engine,
                draft_len=cfg.drafter.draft_len,
            )
            s.does = (
                f"record the weights, the drafter and draft_len {cfg.drafter.draft_len} in engine.json "
                "(serving decodes speculatively with the drafter)"
            )
        engines[v] = (p.art(s), w, drafter)
    return engines


def _drafter_step(p: _Planner, ckpt: _Art, import_drafter: Any) -> _Art:
    """The drafter, imported (drafter.checkpoint) or trained on the drafter data (either backend)."""
    d = p.cfg.drafter
    if d.checkpoint is not None:
        s = p.step("drafter", "import-drafter", "drafter")
        source = p.source(lambda: p.resolver.drafter(d.checkpoint), "drafter.checkpoint", "", None)
        p.key(s, import_drafter, source=source)
        s.does = f"check and copy the trained ReDrafter {d.checkpoint} into the store"
        return p.art(s)
    from tasks.drafter import train_drafter

    s = p.step("drafter", "train-drafter", "drafter")
    what = getattr(d, "data_source", "the drafter data")
    revision = getattr(d, "data_revision", None)
    if p.resolver.drafter_data is None:
        data: Any = Pending(f"the fingerprint of the drafter data {what}")
    else:
        data = p.source(lambda: p.resolver.drafter_data(p.cfg), f"drafter data {what}", what, revision)
    p.key(s, train_drafter, ckpt.arg(), data, d)
    s.does = (
        f"train a ReDrafter drafter (base frozen, {d.draft_len} heads, {d.num_draft_layers} ResBlocks) on "
        f"{what}; save it in Apple's layout"
    )
    return p.art(s)


def _tensorrt_steps(
    p: _Planner,
    variants: list[str],
    ckpt: _Art,
    calib: _Art | None,
    trtllm_checkpoint: Any,
    import_drafter: Any,
    build_trtllm_engine: Any,
) -> dict[str, tuple[_Art, _Art, _Art | None]]:
    from mathforge.backends.trtllm import commands as cmds
    from mathforge.backends.trtllm import recipes

    cfg = p.cfg
    trt_ckpt: dict[str, _Art] = {}
    for precision in ("bf16", "fp8"):
        if precision == "bf16" and "bf16" not in variants or precision == "fp8" and calib is None:
            continue
        recipe = recipes.checkpoint_recipe(cfg, precision)
        s = p.step(f"TensorRT-LLM checkpoint {precision}", "trtllm-checkpoint", "trtllm-checkpoint")
        calib_arg = None if precision == "bf16" else calib.arg()
        p.key(s, trtllm_checkpoint, checkpoint=ckpt.arg(), calibration=calib_arg, recipe=recipe)
        model_type = recipe.model_type
        if model_type is None and ckpt.step.digest:
            from mathforge.backends.trtllm.build import hf_model_type

            model_type = hf_model_type(p.store.path(ckpt.step.digest))
        calib_dir = None if precision == "bf16" else f"{calib.path('calibration')}/data"
        command = cmds.checkpoint_command(recipe, ckpt.path("checkpoint"), calib_dir, BUILD_DIR, model_type)
        s.commands = [shell(command)]
        trt_ckpt[precision] = p.art(s)

    drafter = _drafter_step(p, ckpt, import_drafter) if REDRAFTER in variants else None

    engines = {}
    for v in variants:
        if is_speculative(v) and v != REDRAFTER:
            s = p.step(f"engine {v}", "build-trtllm-engine", "engine")
            s.blocked = TRTLLM_BF16_REDRAFTER
            engines[v] = (p.art(s), ckpt, None)
            continue
        recipe = recipes.engine_recipe(cfg, v)
        base = trt_ckpt["bf16" if v == "bf16" else "fp8"]
        s = p.step(f"engine {v}", "build-trtllm-engine", "engine")
        p.key(
            s,
            build_trtllm_engine,
            checkpoint=ckpt.arg(),
            trtllm_checkpoint=base.arg(),
            drafter=drafter.arg() if v == REDRAFTER and drafter else None,
            recipe=recipe,
        )
        label = f"trtllm-checkpoint:{base.step.title.rsplit(' ', 1)[-1]}"
        commands = cmds.engine_commands(
            recipe,
            base.path(label),
            drafter.path("drafter") if v == REDRAFTER and drafter else None,
            BUILD_DIR,
            f"{BUILD_DIR}/.redrafter-checkpoint",
        )
        s.commands = [shell(c) for c in commands]
        s.then = "copy the tokenizer files beside the engine; write engine.json (with these commands)"
        engines[v] = (p.art(s), ckpt, None)
    return engines


def _serve_steps(p: _Planner, engines: dict[str, tuple[_Art, _Art, _Art | None]], evaluation: bool) -> None:
    cfg = p.cfg
    b, e = cfg.bench, cfg.evaluate
    tools = "with the code sandbox" if e.tools else "without tools"
    after = (
        f"benchmark {b.num_prompts} prompts at concurrency {', '.join(map(str, b.concurrency))} "
        f"(max_tokens {b.max_tokens}) over the OpenAI API"
        + (
            f"; evaluate {e.problems}/{e.split} {tools}, {e.samples} sample(s) per problem"
            if evaluation
            else ""
        )
        + "; log an MLflow child run"
    )
    for v, (art, weights, drafter) in engines.items():
        s = p.step(f"serve {v}", "benchmark, evaluate" if evaluation else "benchmark")
        if art.step.blocked:
            s.blocked = f"engine [{art.step.index}] cannot be built"
            continue
        s.does = after
        engine_path = art.path(f"engine:{v}")
        weights_path = weights.path(weights.step.title.replace(" ", "-"))
        if cfg.engine.backend == "torch":
            from tasks.serve import torch_serve_argv

            extra = []
            if drafter is not None:
                extra = ["--drafter", drafter.path("drafter"), "--draft-len", str(cfg.drafter.draft_len)]
            argv = torch_serve_argv(v, weights_path, "<port>", cfg.engine, extra)
            argv[0] = Path(sys.executable).name
            s.commands = [shell(argv)]
            continue
        _trtllm_serve_step(p, s, v, engine_path, weights_path)


def _trtllm_serve_step(p: _Planner, s: Step, variant: str, engine_path: str, weights_path: str) -> None:
    from mathforge.backends.trtllm import commands as cmds
    from mathforge.backends.trtllm.llmapi import llm_api_options_yaml

    t = p.cfg.engine.trtllm
    if t.runtime == "trt":
        command = cmds.serve(
            engine_path,
            runtime="trt",
            version=t.version,
            tp_size=t.tp_size,
            max_batch_size=t.max_batch_size,
            kv_cache_free_gpu_memory_fraction=t.kv_cache_free_gpu_memory_fraction,
            host="127.0.0.1",
            port="<port>",
            tokenizer=engine_path,
        )
    else:
        options = f"<logs>/trtllm-serve-{variant}-<port>.yaml"
        command = cmds.serve(
            weights_path,
            runtime="pytorch",
            version=t.version,
            tp_size=t.tp_size,
            max_batch_size=t.max_batch_size,
            max_num_tokens=t.max_num_tokens,
            max_seq_len=t.max_seq_len,
            kv_cache_free_gpu_memory_fraction=t.kv_cache_free_gpu_memory_fraction,
            host="127.0.0.1",
            port="<port>",
            extra_llm_api_options=options,
        )
        s.files = {options: llm_api_options_yaml(t)}
    s.commands = [shell(command)]
