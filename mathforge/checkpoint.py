"""Model sources: a local HF checkpoint directory or a Hub repo id at a revision, pinned to content.

`resolve_model_source` pins a source (local dir -> digest of its model files; Hub id -> the commit sha of the
revision, offline from the local HF cache), `materialize_checkpoint` puts the checkpoint's model files into a
directory (Hub: `huggingface_hub.snapshot_download` of that commit, only config/weights/tokenizer/generation
files), and `validate_checkpoint_dir` checks the HF layout: config.json, safetensors weights (one file or an
index whose shards all exist), and tokenizer files.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mathforge.errors import UserError
from mathforge.hub import hub_cache_dir, hub_offline, is_repo_id, looks_like_path, resolve_commit, tree_digest

# top-level files a checkpoint needs (Hub allow_patterns, and what is copied/digested from a local dir)
MODEL_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "hf_quant_config.json",
]
# what a derived checkpoint (FP8, int8) takes over unchanged from its source, besides config.json
_NON_WEIGHT_GLOBS = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template*",
    "generation_config.json",
)
TOKENIZER_FILE_SETS = [("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt")]
SAFETENSORS_INDEX = "model.safetensors.index.json"

CONVERT_HINT = (
    'mathforge requires safetensors weights; convert with: python -c "from transformers import '
    "AutoModelForCausalLM as M; M.from_pretrained('SRC').save_pretrained('DST', safe_serialization=True)\" "
    "(and copy the tokenizer files to DST)"
)


@dataclass(frozen=True)
class ModelSource:
    """A pinned model source. `fingerprint()` is what a cache key must depend on (never a path)."""

    kind: str  # "local" | "hub"
    source: str  # as the user gave it
    revision: str | None = None  # as the user gave it (hub)
    repo_id: str | None = None  # hub
    commit: str | None = None  # hub: the resolved commit sha
    path: Path | None = None  # local: the directory
    digest: str | None = None  # local: sha256 over the model files (names + contents)

    def fingerprint(self) -> dict:
        if self.kind == "hub":
            return {"kind": "hub", "repo_id": self.repo_id, "commit": self.commit}
        return {"kind": "local", "digest": self.digest}

    def to_dict(self) -> dict:
        """JSON-able record of the source (for manifests and run params)."""
        return {
            "kind": self.kind,
            "source": self.source,
            "revision": self.revision,
            "repo_id": self.repo_id,
            "commit": self.commit,
            "path": None if self.path is None else str(self.path),
            "digest": self.digest,
        }

    @property
    def label(self) -> str:
        """Human-readable identity: `org/name@<sha>` or `local:<digest prefix>`."""
        if self.kind == "hub":
            return f"{self.repo_id}@{self.commit}"
        return f"{self.path} (sha256:{(self.digest or '')[:12]})"


def model_files(directory: Path) -> list[str]:
    """Top-level files of `directory` that belong to the checkpoint, sorted."""
    return sorted(
        p.name
        for p in Path(directory).iterdir()
        if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in MODEL_FILE_PATTERNS)
    )


def validate_checkpoint_dir(directory: Path, *, what: str | None = None) -> None:
    """Raise a UserError unless `directory` is a usable HF checkpoint (config, safetensors, tokenizer)."""
    directory = Path(directory)
    what = what or str(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint {what} is not a directory")
    names = {p.name for p in directory.iterdir() if p.is_file()}
    if "config.json" not in names:
        raise UserError(f"checkpoint {what} has no config.json; expected a Hugging Face model directory")
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {what}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise UserError(f"checkpoint {what}: config.json is not a JSON object")

    if SAFETENSORS_INDEX in names:
        try:
            index = json.loads((directory / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise UserError(f"checkpoint {what}: {SAFETENSORS_INDEX} is damaged ({exc})") from exc
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise UserError(
                f"checkpoint {what}: shards listed in {SAFETENSORS_INDEX} are missing: {', '.join(missing)}"
            )
    elif not any(n.endswith(".safetensors") for n in names):
        bins = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        found = f" (found {', '.join(bins)})" if bins else ""
        raise UserError(f"checkpoint {what} has no safetensors weights{found}; {CONVERT_HINT}")
    elif "model.safetensors" not in names:
        others = sorted(n for n in names if n.endswith(".safetensors"))
        raise UserError(
            f"checkpoint {what}: found {', '.join(others)} but neither model.safetensors nor {SAFETENSORS_INDEX}; "
            "re-save it with transformers' save_pretrained(safe_serialization=True)"
        )

    if not any(all(f in names for f in fileset) for fileset in TOKENIZER_FILE_SETS):
        raise UserError(
            f"checkpoint {what} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt); "
            "copy the tokenizer files of the base model into it"
        )


def resolve_model_source(source: str, revision: str | None = None) -> ModelSource:
    """Pin a model source: a local checkpoint directory, or a Hub repo id at `revision` (default main)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise UserError(f"--revision applies to Hub ids, not to the local directory {path}")
        path = path.resolve()
        validate_checkpoint_dir(path)
        return ModelSource(
            kind="local", source=source, path=path, digest=tree_digest(path, model_files(path))
        )
    if path.exists():
        raise UserError(f"model source {source} is a file; pass a checkpoint directory or a Hub repo id")
    if looks_like_path(source) or not is_repo_id(source):
        raise UserError(
            f"model source {source!r}: no such directory, and not a Hugging Face repo id (org/name)"
        )
    commit = resolve_commit(source, revision, repo_type="model")
    return ModelSource(kind="hub", source=source, revision=revision, repo_id=source, commit=commit)


def materialize_checkpoint(source: ModelSource, out_dir: Path) -> None:
    """Write the checkpoint's model files into `out_dir` (plain files, no symlinks) and validate them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.kind == "local":
        src = Path(source.path)
        files = model_files(src)
        if tree_digest(src, files) != source.digest:
            raise UserError(
                f"checkpoint {src} changed since it was resolved; re-run to pick up the new content"
            )
        what = str(src)
    elif source.kind == "hub":
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        what = source.label
        try:
            snapshot = snapshot_download(
                source.repo_id,
                revision=source.commit,
                allow_patterns=MODEL_FILE_PATTERNS,
                cache_dir=str(hub_cache_dir()),
                local_files_only=hub_offline(),
            )
        except LocalEntryNotFoundError as exc:
            raise UserError(
                f"{what} is not (completely) in the local Hugging Face cache {hub_cache_dir()} and the Hub "
                "cannot be reached; download it once with network access"
            ) from exc
        except HfHubHTTPError as exc:
            raise UserError(f"downloading {what} failed: {exc}") from exc
        src = Path(snapshot)
        files = model_files(src)
    else:  # pragma: no cover - constructed only by resolve_model_source
        raise ValueError(f"unknown model source kind {source.kind!r}")
    validate_checkpoint_dir(src, what=what)
    for name in files:
        shutil.copyfile(src / name, out_dir / name)  # follows the cache's symlinks into blobs/
    validate_checkpoint_dir(out_dir, what=what)


def load_tokenizer(model_dir: str | Path):
    """A checkpoint's tokenizer, the way each process that serves or prepares data loads it.

    With a tokenizer.json (every Qwen2/Llama-family checkpoint we target) the tokenizers-backed fast class is
    built from it directly; AutoTokenizer first resolves the model's own class, which imports transformers'
    whole model registry: ~2 s of every server and CLI start on 2 cores, for the same tokenizer."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def copy_non_weight_files(checkpoint_dir: Path, out_dir: Path) -> None:
    """Tokenizer, chat template and generation config of a checkpoint, into a checkpoint derived from it."""
    for pattern in _NON_WEIGHT_GLOBS:
        for f in sorted(checkpoint_dir.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, out_dir / f.name)
