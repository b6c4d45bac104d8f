"""ReDrafter training: the saved layout TensorRT-LLM's converter reads, the loss indexing, draft()/forward()
agreement, the data fingerprint, a short real training run (MLflow per-step metrics) and clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mathforge.config import DrafterSettings, load_preset
from mathforge.drafter import data
from mathforge.drafter.model import Drafter, DrafterConfig
from mathforge.drafter.train import (
    HiddenStates,
    base_hidden,
    common_prefix,
    drafter_loss,
    metric_names,
    next_embeddings,
    simulate_acceptance,
)
from mathforge.errors import UserError

H, V = 16, 32


def _drafter(layers: int = 2, rnn: bool = True, seed: int = 0) -> Drafter:
    torch.manual_seed(seed)
    d = Drafter(DrafterConfig(H, V, 2 * H, layers, rnn))
    with torch.no_grad():  # the ResBlocks start at zero: randomize so every tensor matters
        for p in d.parameters():
            p.normal_(0, 0.3)
    return d


# ------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("rnn", [True, False])
def test_saved_layout_is_what_the_trtllm_converter_reads(tmp_path, rnn):
    from mathforge.backends.trtllm.build import check_drafter

    d = _drafter(layers=2, rnn=rnn)
    d.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["exit_dim"], cfg["num_draft_layers"], cfg["rnn"]) == (H, 2 * H, 2, rnn)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    expected = {
        "lm_head.0.linear.weight": (2 * H, 2 * H),
        "lm_head.0.linear.bias": (2 * H,),
        "lm_head.1.linear.weight": (2 * H, 2 * H),
        "lm_head.1.linear.bias": (2 * H,),
        "lm_head.2.weight": (V, 2 * H),  # the vocab projection: lm_head.{num_draft_layers}, no bias
    }
    if rnn:
        expected |= {"rnn_u.weight": (H, H), "rnn_u.bias": (H,), "rnn_w.weight": (H, H)}
    assert shapes == expected
    assert dtypes == {"BF16"}
    assert check_drafter(tmp_path, 2, rnn)["exit_dim"] == 2 * H
    back = Drafter.from_pretrained(tmp_path, dtype=torch.float32)
    for k, v in d.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------------------- loss


def test_loss_scores_position_t_against_token_t_plus_i_plus_2():
    B, T, n = 2, 9, 3
    labels = torch.randint(0, V, (B, T))
    labels[1, 7:] = -100  # padding: never scored
    right = torch.full((n, B, T, V), -30.0)
    for i in range(n):
        for t in range(T - i - 2):
            right[i, :, t].scatter_(-1, labels[:, t + i + 2].clamp(min=0)[:, None], 30.0)
    loss, m = drafter_loss(right, labels, top_k=2)
    assert set(m) == set(metric_names(n, 2))
    assert loss.item() < 1e-6
    assert all(m[f"redrafter{i}_top1"] == 1.0 for i in range(n))
    # logits that predict t + i + 1 instead score nothing where neighbouring labels differ
    labels = (torch.arange(T) % V).expand(B, T).clone()
    late = torch.full_like(right, -30.0)
    for i in range(n):
        for t in range(T - i - 1):
            late[i, :, t, (t + i + 1) % V] = 30.0
    _, m_late = drafter_loss(late, labels, top_k=2)
    assert all(m_late[f"redrafter{i}_top1"] == 0.0 for i in range(n))
    assert all(m_late[f"redrafter{i}_loss"] > 10 for i in range(n))


PERM = torch.randperm(V, generator=torch.Generator().manual_seed(1))


def _cycle_rows(count: int, T: int, seed: int) -> torch.Tensor:
    """Sequences that follow a fixed permutation, x[t+1] = PERM[x[t]], from random first tokens."""
    rows = torch.empty(count, T, dtype=torch.long)
    rows[:, 0] = torch.randint(0, V, (count,), generator=torch.Generator().manual_seed(seed))
    for t in range(1, T):
        rows[:, t] = PERM[rows[:, t - 1]]
    return rows


@pytest.fixture(scope="module")
def cycle_drafter():
    """A drafter trained on zero hidden states and the true next embeddings of a deterministic sequence."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(V, H).requires_grad_(False)
    d = Drafter(DrafterConfig(H, V, 2 * H, 1, True))
    opt = torch.optim.AdamW(d.parameters(), lr=3e-2)
    first = None
    for step in range(150):
        ids = _cycle_rows(16, 12, seed=step)
        hidden = torch.zeros(16, 12, H)
        loss, m = drafter_loss(d(hidden, next_embeddings(embed, ids, torch.float32), 3), ids, top_k=1)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return d.eval(), embed, first, loss.item(), m


def test_drafter_learns_a_deterministic_sequence_from_the_next_embeddings(cycle_drafter):
    d, embed, first, last, m = cycle_drafter
    assert last < 0.05 * first
    assert all(m[f"redrafter{i}_top1"] == 1.0 for i in range(3))
    ids = _cycle_rows(4, 6, seed=1000)
    drafts = d.draft(torch.zeros(4, H), ids[:, 1], embed, 3)  # from position 0, g0 = ids[1]
    assert torch.equal(drafts, ids[:, 2:5])


def test_draft_agrees_with_teacher_forced_forward():
    d = _drafter(layers=2, rnn=True, seed=3).eval()
    embed = torch.nn.Embedding(V, H)
    B, k = 5, 4
    h = torch.randn(B, H)
    g0 = torch.randint(0, V, (B,))
    drafts = d.draft(h, g0, embed, k)
    ids = torch.cat([torch.randint(0, V, (B, 1)), g0[:, None], drafts], dim=1)  # position 0 is the step's
    hidden = torch.randn(B, ids.shape[1], H)
    hidden[:, 0] = h
    with torch.no_grad():
        logits = d(hidden, next_embeddings(embed, ids, torch.float32), k)
    assert torch.equal(logits[:, :, 0].argmax(-1).T, drafts)


def test_simulated_acceptance_counts_steps_over_generated_segments(cycle_drafter):
    d, embed, *_ = cycle_drafter
    ids = _cycle_rows(1, 20, seed=1001)[0].tolist()
    generated = [False] * 5 + [True] * 10 + [False] * 2 + [True] * 3  # two served segments: 10 and 3 tokens
    row = data.Row(ids, generated)

    class Fixed(HiddenStates):
        def __init__(self):
            self.rows, self.cached = [row], None

        def batch(self, idx):
            t = torch.tensor([ids])
            return t, t, torch.zeros(1, len(ids), H)

    out = simulate_acceptance(d, Fixed(), embed, 3)
    # all drafts right, cut at each segment's end: 10 tokens take 3 steps (3 + 3 + 1 drafts accepted), 3 tokens
    # one step (2 accepted)
    assert out["steps"] == 4 and out["accept_hist"] == [0, 1, 1, 2]
    assert out["accepted_drafts_mean"] == pytest.approx(9 / 4)


# ------------------------------------------------------------------------------------------- base hidden


def test_shared_prefix_hidden_states_equal_the_plain_forward(tiny_model_dir):
    from mathforge.engine.model import Transformer

    base = Transformer.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [data.Row([5, 6, 7, 8, 9, 10 + i, 11, 12][: 6 + i], [True] * (6 + i)) for i in range(3)]
    assert common_prefix(rows) == 5
    ids = torch.tensor([r.ids + [0] * (8 - len(r)) for r in rows])
    shared = base_hidden(base, ids, shared=5)
    plain = torch.stack([base_hidden(base, ids[b : b + 1])[0] for b in range(3)])
    for b, r in enumerate(rows):
        torch.testing.assert_close(shared[b, : len(r)], plain[b, : len(r)], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- data


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fingerprint_follows_file_content_not_path_or_mtime(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"problem": "1+1?", "generated_solution": "2"}])
    s = DrafterSettings(data_source=str(f))
    before = data.fingerprint(s)
    assert before["train"]["kind"] == "file" and str(tmp_path) not in json.dumps(before)
    os.utime(f, (1, 1))
    assert data.fingerprint(s) == before
    moved = tmp_path / "sub" / "b.jsonl"
    moved.parent.mkdir()
    shutil.move(f, moved)
    assert data.fingerprint(s.model_copy(update={"data_source": str(moved)})) == before
    _jsonl(moved, [{"problem": "1+1?", "generated_solution": "two"}])
    assert data.fingerprint(s.model_copy(update={"data_source": str(moved)})) != before

    from artifacts.keys import canonicalize
    from tasks.drafter import resolve_data

    spec = resolve_data(s.model_copy(update={"data_source": str(moved)}))
    assert "locator" not in spec.model_dump() and spec.locator == str(moved.resolve())
    # decoding-only and location settings stay out of the drafter's recipe parameters
    other = s.model_copy(
        update={"num_beams": 4, "greedy_search": False, "device": "cuda", "checkpoint": "/x"}
    )
    assert canonicalize(other) == canonicalize(s) and "num_beams" not in canonicalize(s)
    assert canonicalize(s.model_copy(update={"lr": 0.01})) != canonicalize(s)


def test_fingerprint_of_tiny_and_hub_sources(tmp_path, monkeypatch):
    tiny = data.fingerprint(DrafterSettings(data_nrows=100))
    assert tiny["train"]["kind"] == "tiny-generator" and len(tiny["train"]["generator"]) == 64
    assert data.fingerprint(DrafterSettings(data_nrows=101))["train"] != tiny["train"]
    assert tiny["eval"]["kind"] == "tiny-problems" and tiny["eval"]["split"] == "test"
    # a hub dataset is its resolved commit (offline: from the local HF cache)
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "datasets--nvidia--OpenMathReasoning"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fp = data.fingerprint(DrafterSettings(data_source="nvidia/OpenMathReasoning", data_split="tir"))
    assert fp["train"] == {
        "kind": "hub",
        "repo_id": "nvidia/OpenMathReasoning",
        "revision": None,
        "commit": sha,
        "split": "tir",
        "nrows": None,
    }


def test_tiny_rows_mark_what_the_base_writes():
    from transformers import AutoTokenizer

    from mathforge.data.problems import TINY_PROBLEMS_FILE

    tok = AutoTokenizer.from_pretrained(str(TINY_PROBLEMS_FILE.parents[1] / "tiny_model"))
    s = DrafterSettings()
    ex = data.tiny_examples(3)
    assert all("```output\n" in e.solution for e in ex)
    rows, cut = data.encode_solutions(tok, s, ex)
    assert cut == 0
    written = tok.decode([t for t, g in zip(rows[0].ids, rows[0].generated, strict=True) if g])
    assert written.startswith(ex[0].solution.split("<tool_call>")[0]) and written.endswith("<|im_end|>")
    assert "```output" not in written and "Solve the following" not in written
    assert tok.decode(rows[0].ids).startswith(
        "<|im_start|>user\nSolve the following math problem, integrating"
    )


def test_bad_settings_and_data_are_user_errors(tmp_path):
    bad = [
        (DrafterSettings(data_source="no such thing"), "not 'tiny'"),
        (DrafterSettings(data_source=str(_jsonl(tmp_path / "x.txt", []))), "unsupported file type"),
        (DrafterSettings(data_split="train"), "data_split"),
        (DrafterSettings(data_source=str(tmp_path)), "directory"),
        (DrafterSettings(eval_source="org/name"), "eval_source"),
    ]
    f = _jsonl(tmp_path / "p.jsonl", [{"problem": "1+1?", "split": "a"}])
    bad += [
        (DrafterSettings(data_source=str(f)), "no solution column"),
        (DrafterSettings(data_source=str(f), data_revision="main"), "data_revision"),
        (DrafterSettings(data_source=str(f), data_mode="generations", data_split="b"), "unknown split"),
    ]
    for settings, message in bad:
        with pytest.raises(UserError, match=message):
            data.load_examples(settings)
    assert (
        data.load_examples(DrafterSettings(data_source=str(f), data_mode="generations"))[0].solution is None
    )
    preset = tmp_path / "bad.yaml"
    preset.write_text("name: bad\nmodel: {source: 'embedded:tiny'}\ndrafter: {lr: -1, epochs: 1}\n")
    with pytest.raises(UserError, match="drafter.lr"):
        load_preset(str(preset))
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="not a ReDrafter directory"):
        Drafter.from_pretrained(tmp_path / "d")


# ------------------------------------------------------------------------------------------- training


SHORT = {
    "data_nrows": 8,
    "eval_nrows": 2,
    "steps": 8,
    "batch_size": 2,
    "lr": 0.003,
    "num_draft_layers": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def short_preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "drafter-short.yaml"
    path.write_text(
        "name: drafter-short\nmodel: {source: 'embedded:tiny'}\ntracking: {experiment: drafter-tests}\n"
        f"drafter: {json.dumps(SHORT)}\n"
    )
    return path


def test_short_training_lowers_the_loss_and_logs_every_step_to_mlflow(short_preset):
    from artifacts.store import default_store
    from mathforge import tracking
    from mathforge.backends.trtllm.build import check_drafter
    from mathforge.drafter.train import SUMMARY_FILE
    from tasks.drafter import drafter_tracking, resolve_data, train_drafter
    from tasks.model import checkpoint
    from tasks.sources import resolve_model

    cfg = load_preset(str(short_preset))
    ckpt = checkpoint.fn(resolve_model.fn(cfg.model))
    parent = tracking.start_parent_run("drafter-tests", "pipeline-test", {})
    with drafter_tracking(parent_run_id=parent):
        ref = train_drafter.fn(ckpt, resolve_data(cfg.drafter), cfg.drafter)
    root = default_store().path(ref)
    check_drafter(root, 1, True)
    summary = json.loads((root / SUMMARY_FILE).read_text())
    names = metric_names(3, 5)
    assert set(names) <= set(summary["heldout"]) and summary["heldout"]["steps"] > 0
    assert summary["data"]["train_rows"] == 8 and summary["data"]["eval_rows"] == 2

    client = tracking._client()
    (run,) = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert run.info.run_name == "drafter" and run.info.status == "FINISHED"
    for name in names:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, 9)), name
        assert run.data.metrics[f"eval_{name}"] == pytest.approx(summary["heldout"][name])
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 8 and sum(loss[-2:]) < 0.8 * sum(loss[:2])
    assert "eval_accepted_drafts_mean" in run.data.metrics and run.data.params["train.draft_len"] == "3"

    # the same recipe again: the stored drafter, no training
    assert train_drafter.fn(ckpt, resolve_data(cfg.drafter), cfg.drafter) == ref


def test_cli_trains_or_reuses_and_copies_out(short_preset, tmp_path, capsys):
    from mathforge.cli import main

    assert main(["drafter", "train", "--preset", str(short_preset), "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "head 2" in out and "drafted tokens accepted per step" in out
    assert json.loads(out.strip().splitlines()[-1])["heldout"]["redrafter2_top1"] >= 0
    assert {"config.json", "model.safetensors", "training_summary.json"} <= {
        p.name for p in (tmp_path / "d").iterdir()
    }
    assert main(["drafter", "train", "--preset", "no-such-preset"]) == 2


def test_generations_mode_rows_are_the_base_greedy_tokens(tiny_model_dir):
    from mathforge.drafter.train import load_base

    base, tok, eos = load_base(tiny_model_dir, torch.device("cpu"))
    s = DrafterSettings(data_mode="generations", generation_max_tokens=12)
    problems = data.load_eval_examples(DrafterSettings(eval_nrows=2))
    rows, records, cut = data.generate_rows(base, tok, s, problems, eos_token_ids=eos, max_slots=2)
    assert cut == 0 and len(rows) == len(records) == 2
    for row, rec, p in zip(rows, records, problems, strict=True):
        prompt = tok(data.render_prompt(tok, s, p.problem), add_special_tokens=False)["input_ids"]
        assert row.ids[: len(prompt)] == prompt and not any(row.generated[: len(prompt)])
        written = row.ids[len(prompt) :]
        assert len(written) == 12 and all(row.generated[len(prompt) :])
        # the tiny model writes its reference solution, token for token
        assert (
            p.solution.startswith(rec["generated_solution"])
            and tok.decode(written) == rec["generated_solution"]
        )


def test_drafter_run_nests_under_the_pipeline_run_of_its_flow_run(monkeypatch):
    from prefect.runtime import flow_run

    from mathforge import tracking
    from tasks.drafter import drafter_tracking, open_drafter_run

    parent = tracking.start_parent_run("drafter-nesting", "pipeline-x", {"prefect.flow_run_id": "fr-123"})
    client = tracking._client()
    monkeypatch.setattr(flow_run, "get_id", lambda: "fr-123")
    nested = client.get_run(open_drafter_run({"checkpoint.digest": "abc"}))
    assert nested.data.tags["mlflow.parentRunId"] == parent and nested.info.run_name == "drafter"
    monkeypatch.setattr(flow_run, "get_id", lambda: None)
    with drafter_tracking(experiment="drafter-standalone"):
        alone = client.get_run(open_drafter_run({}))
    assert "mlflow.parentRunId" not in alone.data.tags
    assert client.get_experiment(alone.info.experiment_id).name == "drafter-standalone"
    for run in (nested, alone):
        tracking.finish_run(run.info.run_id)
