"""Identity of artifacts: content digests, recipe keys and the `ArtifactRef` that names an artifact.

Two hashes, both sha256 hex:

* **content digest** — what an artifact *is*. Computed from the sorted relative paths of its files and
  each file's sha256 (streamed in chunks); `manifest.json` at the top level is not part of it, nor are
  mtimes, permissions or empty directories. Two directories with the same files have the same digest.
* **recipe key** — how an artifact is *made*: sha256 of the canonical JSON of
  ``{"kind", "version", "params", "inputs": {name: content digest}}``. Never paths or mtimes, so the same
  recipe on another host (another store root) has the same key.

Parameters are canonicalized (dict keys sorted, tuples as lists, pydantic models dumped in JSON mode);
anything that has no stable JSON meaning (a `Path`, a set, a float NaN, an arbitrary object) is
rejected with a `RecipeParamError` that says where it was found.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from mathforge.errors import UserError

CHUNK_BYTES = 8 * 1024 * 1024
MANIFEST_NAME = "manifest.json"
DIGEST_PREFIX = b"mathforge-artifact-v1\n"
RECIPE_FORMAT = 1
_HEX = frozenset("0123456789abcdef")


class RecipeParamError(UserError, TypeError):
    """A recipe parameter that has no canonical, content-only JSON form."""


class ArtifactRef(BaseModel):
    """A small, host-independent name for an artifact: what it is (`kind`), how it was made (`key`,
    the recipe key) and its content (`digest`). The filesystem path is not stored — store roots differ
    between hosts; `ArtifactStore.path(ref)` computes it. Round-trips through Prefect's JSON serializer.
    """

    model_config = ConfigDict(frozen=True)

    kind: str
    key: str
    digest: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.digest[:12]}"


def is_hex_digest(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


# ---------------------------------------------------------------- canonical parameters


def canonicalize(value: Any, where: str = "params") -> Any:
    """Return a JSON-only structure (dict with str keys / list / str / int / float / bool / None) equal in
    meaning to `value`. Raises `RecipeParamError` for anything else."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, enum.Enum):
        return canonicalize(value.value, where)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):  # bool subclasses (numpy bools are not bool subclasses)
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RecipeParamError(
                f"{where}: {value!r} is not a finite number; recipe parameters must be JSON"
            )
        return float(value)
    if isinstance(value, ArtifactRef):
        raise RecipeParamError(
            f"{where}: an ArtifactRef inside a parameter; pass artifacts as top-level arguments (or a list of "
            "ArtifactRefs) so their content digests, not their names, key the recipe"
        )
    if isinstance(value, BaseModel):
        return canonicalize(value.model_dump(mode="json"), where)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeParamError(
                    f"{where}: dict key {k!r} is not a string; recipe parameters must be JSON"
                )
            out[str.__str__(k)] = canonicalize(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [canonicalize(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        raise RecipeParamError(
            f"{where}: {value!r} is a path; a recipe is keyed by content, never by paths. Put the directory "
            "into the store (ArtifactStore.put_dir) and pass the ArtifactRef, or pass a string identifier"
        )
    raise RecipeParamError(
        f"{where}: {type(value).__name__} is not a supported recipe parameter "
        "(use dict / list / str / int / float / bool / None / a pydantic model)"
    )


def canonical_json(value: Any) -> str:
    """Canonical JSON text of `value` (after `canonicalize`): sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        canonicalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def recipe_document(
    kind: str, version: int, params: Mapping[str, Any], input_digests: Mapping[str, str]
) -> dict:
    """The canonical recipe that a recipe key hashes (also recorded in manifests)."""
    if not isinstance(kind, str) or not kind:
        raise RecipeParamError(f"artifact kind must be a non-empty string, got {kind!r}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecipeParamError(f"recipe version must be an int, got {version!r}")
    for name, digest in input_digests.items():
        if not isinstance(digest, str) or not is_hex_digest(digest):
            raise RecipeParamError(f"input {name!r}: {digest!r} is not a sha256 content digest")
    return {
        "format": RECIPE_FORMAT,
        "kind": kind,
        "version": version,
        "params": canonicalize(dict(params), "params"),
        "inputs": {str(k): v for k, v in input_digests.items()},
    }


def key_of_recipe(doc: Mapping[str, Any]) -> str:
    """sha256 hex of a recipe document's canonical JSON."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def recipe_key(kind: str, version: int, params: Mapping[str, Any], input_digests: Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of (kind, recipe version, parameters, input content digests)."""
    return key_of_recipe(recipe_document(kind, version, params, input_digests))


# ---------------------------------------------------------------- content digests


def hash_file(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 hex of one file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def list_files(root: Path, *, follow_symlinks: bool = False) -> list[str]:
    """Relative POSIX paths of the regular files under `root`, sorted by their UTF-8 bytes; the top-level
    manifest.json is excluded. Inside a stored artifact symlinks and special files are errors (an artifact
    must be self-contained); `follow_symlinks=True` (for source directories such as a Hugging Face
    snapshot) treats a link as the file or directory it points to."""
    out: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(d: Path, prefix: str) -> None:
        st = d.stat()
        if (st.st_dev, st.st_ino) in seen_dirs:
            raise ValueError(f"{d}: directory symlink loop")
        seen_dirs.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            for entry in it:
                rel = prefix + entry.name
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"{d / entry.name}: file name is not valid UTF-8") from exc
                if entry.is_symlink():
                    if not follow_symlinks:
                        raise ValueError(f"{d / entry.name}: symlinks are not allowed inside an artifact")
                    if not os.path.exists(entry.path):
                        raise ValueError(f"{d / entry.name}: dangling symlink")
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    walk(Path(entry.path), rel + "/")
                elif entry.is_file(follow_symlinks=follow_symlinks):
                    if rel != MANIFEST_NAME:
                        out.append(rel)
                else:
                    raise ValueError(f"{d / entry.name}: not a regular file or directory")

    walk(Path(root), "")
    out.sort(key=lambda p: p.encode("utf-8"))
    return out


def hash_files(root: Path, rels: Iterable[str], max_workers: int | None = None) -> dict[str, str]:
    """sha256 of each file (threads: hashlib releases the GIL, so multi-shard checkpoints hash in parallel)."""
    rels = list(rels)
    if len(rels) <= 1:
        return {rel: hash_file(root / rel) for rel in rels}
    workers = max_workers or min(8, os.cpu_count() or 1, len(rels))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="artifact-hash") as pool:
        return dict(zip(rels, pool.map(lambda rel: hash_file(root / rel), rels), strict=True))


def digest_of(file_hashes: Mapping[str, str]) -> str:
    """Content digest from {relative path: file sha256}: independent of the mapping's order."""
    h = hashlib.sha256(DIGEST_PREFIX)
    for rel in sorted(file_hashes, key=lambda p: p.encode("utf-8")):
        h.update(rel.encode("utf-8") + b"\0" + file_hashes[rel].encode("ascii") + b"\n")
    return h.hexdigest()


def content_digest(root: str | os.PathLike, *, follow_symlinks: bool = True) -> str:
    """Content digest of a directory (sorted relative paths + each file's sha256; manifest.json excluded)."""
    root = Path(root)
    return digest_of(hash_files(root, list_files(root, follow_symlinks=follow_symlinks)))


# ---------------------------------------------------------------- task arguments


def split_arguments(arguments: Mapping[str, Any]) -> tuple[dict[str, ArtifactRef], dict[str, Any]]:
    """Split call arguments into artifact inputs and recipe parameters.

    An argument whose value is an `ArtifactRef` is an input under its own name; a non-empty list/tuple of
    ArtifactRefs becomes inputs ``name[0]``, ``name[1]``, ...; everything else is a parameter (and must
    canonicalize). Used identically by `artifact_task` and `ArtifactCachePolicy`, so both compute one key.
    """
    refs: dict[str, ArtifactRef] = {}
    params: dict[str, Any] = {}
    for name, value in arguments.items():
        if isinstance(value, ArtifactRef):
            refs[name] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, ArtifactRef) for v in value):
            for i, v in enumerate(value):
                refs[f"{name}[{i}]"] = v
        else:
            params[name] = value
    return refs, params


def join_arguments(arguments: Mapping[str, Any], refs: Mapping[str, ArtifactRef]) -> dict[str, Any]:
    """Inverse of `split_arguments`: `arguments` with its ArtifactRefs replaced by those in `refs`."""
    out = dict(arguments)
    for name, value in arguments.items():
        if isinstance(value, ArtifactRef):
            out[name] = refs[name]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, ArtifactRef) for v in value):
            out[name] = type(value)(refs[f"{name}[{i}]"] for i in range(len(value)))
    return out
