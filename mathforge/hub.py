"""Hugging Face Hub revision resolution that also works offline, plus the content digests sources are keyed by.

A hub source is keyed by the commit sha its revision resolves to: online via the Hub API, offline (HF_HUB_OFFLINE=1
or no network) from the local cache's `refs/<revision>` (the layout `huggingface_hub` writes:
`<cache>/<models|datasets>--org--name/{refs/<rev>, snapshots/<sha>/..., blobs/...}`).
The cache directory and offline flag are read from the environment at call time (HF_HUB_CACHE, HF_HOME,
XDG_CACHE_HOME, HF_HUB_OFFLINE), not when huggingface_hub was imported.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from mathforge.errors import UserError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def looks_like_path(source: str) -> bool:
    """A string the user meant as a local path (so "not found" is a path error, not a Hub lookup)."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or source in (".", "..")
        or source.lower().endswith((".jsonl", ".json", ".parquet", ".safetensors"))
        or source.count("/") > 1
    )


def is_repo_id(source: str) -> bool:
    return bool(REPO_ID_RE.match(source)) and ".." not in source and not source.endswith((".", "-"))


def repo_cache_folder(repo_id: str, repo_type: str) -> Path:
    return hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def cached_commit(repo_id: str, revision: str | None, repo_type: str) -> str | None:
    """The commit a revision points to in the local cache, or None."""
    folder = repo_cache_folder(repo_id, repo_type)
    rev = revision or "main"
    if COMMIT_RE.match(rev):
        return rev if (folder / "snapshots" / rev).is_dir() else None
    ref = folder / "refs" / rev
    if ref.is_file():
        sha = ref.read_text().strip()
        if COMMIT_RE.match(sha) and (folder / "snapshots" / sha).is_dir():
            return sha
    return None


def resolve_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The commit sha of `revision` (default: main) of a Hub repo; offline from the local cache."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    what = f"{repo_type} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if hub_offline():
        sha = cached_commit(repo_id, revision, repo_type)
        if sha is None:
            raise UserError(
                f"cannot resolve {what} offline (HF_HUB_OFFLINE=1): it is not in the local Hugging Face cache "
                f"{hub_cache_dir()}; download it once with network access, or pass a local directory"
            )
        return sha
    api = HfApi()
    try:
        info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, revision=revision)
    except GatedRepoError as exc:
        raise UserError(f"{what} is gated: accept its terms on the Hub and set HF_TOKEN") from exc
    except RevisionNotFoundError as exc:
        raise UserError(f"{what}: no such revision on the Hub") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(
            f"{what} not found on the Hub (or private: set HF_TOKEN); a local path must exist to be used as one"
        ) from exc
    except Exception as exc:  # network down, Hub error: fall back to the cache
        sha = cached_commit(repo_id, revision, repo_type)
        if sha is None:
            raise UserError(
                f"cannot reach the Hugging Face Hub to resolve {what} ({type(exc).__name__}: {exc}) "
                f"and it is not in the local cache {hub_cache_dir()}"
            ) from exc
        return sha
    if not info.sha:
        raise UserError(f"the Hub returned no commit for {what}")
    return info.sha


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path, files: list[str] | None = None) -> str:
    """sha256 over sorted relative paths and file digests (all regular files under root, or `files`)."""
    root = Path(root)
    if files is None:
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + file_sha256(root / rel).encode() + b"\n")
    return h.hexdigest()
