"""Model source resolution (local dir / Hub id, offline from a fake HF cache), materialization, validation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mathforge import checkpoint as ck
from mathforge.errors import UserError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _model_file_names(model_dir: Path) -> list[str]:
    """The shipped model's files without its model card (README.md is not a model file)."""
    return sorted(p.name for p in model_dir.iterdir() if p.name != "README.md")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fake_hub_cache(
    hf_home: Path, repo_id: str, model_dir: Path, commit: str = COMMIT, extra: dict | None = None
):
    """huggingface_hub's cache layout: refs/main -> commit, snapshots/<commit>/<file> -> ../../blobs/<hash>."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    files.update(extra or {})
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / name)
    return repo


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_local_source_is_content_addressed(tmp_path, tiny_model_dir):
    src = ck.resolve_model_source(str(tiny_model_dir))
    assert src.kind == "local" and src.path == tiny_model_dir.resolve()
    assert src.fingerprint() == {"kind": "local", "digest": src.digest} and len(src.digest) == 64
    assert json.loads(json.dumps(src.to_dict()))["path"] == str(tiny_model_dir.resolve())
    # same content elsewhere, plus a file that is not part of the model: same key
    copy = _copy_model(tiny_model_dir, tmp_path / "copy")
    (copy / "README.md").write_text("notes")
    assert ck.resolve_model_source(str(copy)).fingerprint() == src.fingerprint()
    # changed content: new key
    cfg = json.loads((copy / "generation_config.json").read_text())
    cfg["do_sample"] = True
    (copy / "generation_config.json").write_text(json.dumps(cfg))
    assert ck.resolve_model_source(str(copy)).fingerprint() != src.fingerprint()


def test_materialize_local(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    copy = _copy_model(tiny_model_dir, tmp_path / "copy")
    (copy / "README.md").write_text("notes")
    src = ck.resolve_model_source(str(copy))
    out = tmp_path / "out"
    ck.materialize_checkpoint(src, out)
    assert sorted(p.name for p in out.iterdir()) == _model_file_names(tiny_model_dir)
    for name in _model_file_names(tiny_model_dir):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    AutoTokenizer.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)
    # the directory changed after it was resolved: refuse rather than build from the wrong content
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(UserError, match="changed since it was resolved"):
        ck.materialize_checkpoint(src, tmp_path / "out2")


def test_hub_source_offline_from_cache(tmp_path, offline_hf, tiny_model_dir):
    _fake_hub_cache(
        offline_hf,
        "acme/tiny-qwen",
        tiny_model_dir,
        extra={"README.md": b"card", "pytorch_model.bin": b"old"},
    )
    src = ck.resolve_model_source("acme/tiny-qwen", None)
    assert (src.kind, src.repo_id, src.commit) == ("hub", "acme/tiny-qwen", COMMIT)
    assert src.fingerprint() == {"kind": "hub", "repo_id": "acme/tiny-qwen", "commit": COMMIT}
    assert ck.resolve_model_source("acme/tiny-qwen", "main").commit == COMMIT
    assert ck.resolve_model_source("acme/tiny-qwen", COMMIT).commit == COMMIT
    out = tmp_path / "out"
    ck.materialize_checkpoint(src, out)  # the real snapshot_download, served from the cache
    assert sorted(p.name for p in out.iterdir()) == _model_file_names(tiny_model_dir)
    for p in out.iterdir():
        assert not p.is_symlink()
        assert p.read_bytes() == (tiny_model_dir / p.name).read_bytes()


def test_hub_source_offline_errors(offline_hf, tiny_model_dir):
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        ck.resolve_model_source("acme/absent", None)
    _fake_hub_cache(offline_hf, "acme/tiny-qwen", tiny_model_dir)
    with pytest.raises(UserError, match="revision 'v2'.*not in the local Hugging Face cache"):
        ck.resolve_model_source("acme/tiny-qwen", "v2")
    # a pinned commit whose snapshot files are gone
    src = ck.ModelSource(kind="hub", source="acme/tiny-qwen", repo_id="acme/tiny-qwen", commit="f" * 40)
    with pytest.raises(UserError, match="not \\(completely\\) in the local Hugging Face cache"):
        ck.materialize_checkpoint(src, offline_hf / "out")


def test_hub_network_failure_falls_back_to_cache(offline_hf, tiny_model_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def down(self, *args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", down)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub"):
        ck.resolve_model_source("acme/tiny-qwen", None)
    _fake_hub_cache(offline_hf, "acme/tiny-qwen", tiny_model_dir)
    assert ck.resolve_model_source("acme/tiny-qwen", None).commit == COMMIT


def test_validation_errors(tmp_path, tiny_model_dir):
    def broken(name: str) -> Path:
        return _copy_model(tiny_model_dir, tmp_path / name)

    d = broken("noconfig")
    (d / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        ck.resolve_model_source(str(d))

    d = broken("binonly")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(
        UserError, match=r"no safetensors weights \(found pytorch_model.bin\).*safe_serialization=True"
    ):
        ck.resolve_model_source(str(d))

    d = broken("sharded")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="missing: model-00002-of-00002.safetensors"):
        ck.resolve_model_source(str(d))

    d = broken("notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer"):
        ck.resolve_model_source(str(d))

    with pytest.raises(UserError, match="applies to Hub ids"):
        ck.resolve_model_source(str(tiny_model_dir), "main")
    with pytest.raises(UserError, match="no such directory"):
        ck.resolve_model_source("./no/such/dir")
    with pytest.raises(UserError, match="is a file"):
        ck.resolve_model_source(str(tiny_model_dir / "config.json"))
    with pytest.raises(UserError, match="not a Hugging Face repo id"):
        ck.resolve_model_source("bad id with spaces")


def test_load_tokenizer_equals_autotokenizer(tiny_model_dir):
    """The fast path (straight from tokenizer.json) tokenizes and renders chats exactly like AutoTokenizer."""
    from transformers import AutoTokenizer

    ours, auto = ck.load_tokenizer(tiny_model_dir), AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = [
        "What is 2 + 3? Put the answer in \\boxed{}.",
        "<tool_call>\nprint(7 * 6)\n</tool_call>\n```output\n42\n```",
        "<|im_start|>user\nhi<|im_end|>\n  trailing   spaces\t",
    ]
    for text in texts:
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
        ids = auto(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": texts[0]}]
    kw = {"tokenize": False, "add_generation_prompt": True}
    assert ours.apply_chat_template(chat, **kw) == auto.apply_chat_template(chat, **kw)
    assert (ours.eos_token, ours.pad_token, len(ours)) == (auto.eos_token, auto.pad_token, len(auto))
    assert ours.convert_tokens_to_ids(["<tool_call>", "</tool_call>"]) == auto.convert_tokens_to_ids(
        ["<tool_call>", "</tool_call>"]
    )
