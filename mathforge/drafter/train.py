"""Train a ReDrafter drafter on a frozen base: Apple's recipe, as NeMo-Skills' train_redrafter runs it.

The base is mathforge's own `Transformer` (what the engine serves), in bf16 and frozen; the drafter conditions
on its final-norm last hidden state (`forward(..., return_hidden=True)`, exactly what the engine hands the
drafter at inference) and reuses its token embedding table. Teacher forcing: with hidden h_t and the
embeddings of the true next tokens, head i at position t predicts token t + i + 2 (token t + 1 is the base's
own). Loss: sum_i CE(logits[i, :, :-(i+2)], labels[:, i+2:]) with -100 ignored; AdamW, linear warm-up over
`warmup_ratio` of the steps, cosine decay to 0, gradients clipped at 1 (the HF Trainer defaults NeMo-Skills
runs with). Metrics `redrafter{i}_top{k}` (top-k accuracy of head i) and `redrafter{i}_loss` every step.

When the base's hidden states for all training rows fit in memory (the tiny preset: a few hundred MB) they are
computed once and reused every epoch; otherwise (a 14B base) each batch runs the base.

After training, the drafter is saved in Apple's layout (bf16, one model.safetensors) and evaluated, as saved,
on held-out problems: the same metric names (`eval_` prefixed in MLflow, as HF Trainer names eval metrics),
and a greedy speculative-decoding simulation on the text the base writes (`accepted_drafts_mean`: drafted tokens
accepted per target step, of `draft_len`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mathforge.config import DrafterSettings
from mathforge.drafter.data import Row
from mathforge.drafter.model import Drafter, DrafterConfig
from mathforge.errors import UserError

IGNORE = -100
GRAD_CLIP = 1.0
HIDDEN_CACHE_BYTES = 3 * 2**30  # precompute the base's hidden states when they fit in this much memory
SUMMARY_FILE = "training_summary.json"
LOSS_LOG = "loss.jsonl"
FORMAT_VERSION = 1


def metric_names(n: int, top_k: int) -> list[str]:
    """Every per-head metric name, in Apple's/NeMo-Skills' spelling."""
    return [f"redrafter{i}_top{k}" for i in range(n) for k in range(1, top_k + 1)] + [
        f"redrafter{i}_loss" for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------- loss


def head_stats(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> list[dict[str, torch.Tensor]]:
    """Per head i: summed CE, number of scored tokens and top-1..top_k hit counts (label index t + i + 2)."""
    n, V = logits.shape[0], logits.shape[-1]
    out = []
    for i in range(n):
        lg = logits[i, :, : -(i + 2)].float().reshape(-1, V)
        y = labels[:, i + 2 :].reshape(-1)
        valid = y != IGNORE
        ce = F.cross_entropy(lg, y, ignore_index=IGNORE, reduction="sum")
        with torch.no_grad():
            top = lg.topk(min(top_k, V), dim=-1).indices
            hit = (top == y[:, None]).cumsum(dim=-1).clamp(max=1) & valid[:, None]
            hits = hit.sum(dim=0)
        out.append({"ce": ce, "count": valid.sum(), "hits": hits})
    return out


def drafter_loss(
    logits: torch.Tensor, labels: torch.Tensor, top_k: int = 5
) -> tuple[torch.Tensor, dict[str, float]]:
    """Apple's drafter_loss: logits [n, B, T, V], labels [B, T] (-100 ignored) -> (sum over heads of the mean
    CE, {redrafter{i}_top{k}, redrafter{i}_loss})."""
    stats = head_stats(logits, labels, top_k)
    loss = logits.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    for i, s in enumerate(stats):
        count = s["count"].clamp(min=1)
        head = s["ce"] / count
        loss = loss + head
        metrics[f"redrafter{i}_loss"] = float(head.detach())
        for k in range(top_k):
            metrics[f"redrafter{i}_top{k + 1}"] = float(s["hits"][min(k, len(s["hits"]) - 1)]) / float(count)
    return loss, metrics


# ---------------------------------------------------------------------------------------------- base


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base(base_dir: str | Path, device: torch.device):
    """The frozen base as the engine serves it (bf16), its tokenizer and its eos ids."""
    from mathforge.checkpoint import load_tokenizer
    from mathforge.engine.engine import load_eos_token_ids
    from mathforge.engine.model import Transformer

    base = Transformer.from_pretrained(Path(base_dir), device=device, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(base_dir)
    return base, tokenizer, load_eos_token_ids(base_dir, tokenizer)


@torch.no_grad()
def base_hidden(base, ids: torch.Tensor, shared: int = 0) -> torch.Tensor:
    """Final-norm last hidden states [B, T, H] of the base for right-padded ids [B, T] (rows in slots
    0..B-1 of its KV cache, positions 0..T-1); no logits are computed beyond one per row.

    `shared`: the first `shared` tokens are the same in every row (a prompt template): they run once, their
    keys/values are copied to the other rows' slots and only the rest runs batched. Causal attention makes
    that the same computation."""
    B, T = ids.shape
    if base.max_slots < B or base.max_seq_len < T:
        base.setup_cache(max(B, base.max_slots), max(T, base.max_seq_len))
    dev = ids.device
    P = shared if B > 1 and 0 < shared < T else 0
    parts = []
    if P:
        pos = torch.arange(P, device=dev)[None]
        at = torch.zeros(1, 1, dtype=torch.long, device=dev)
        _, h = base(ids[:1, :P], pos, torch.zeros(1, dtype=torch.long, device=dev), P, True, logits_at=at)
        for layer in base.layers:
            attn = layer.self_attn
            attn.k_cache[1:B, :, :P] = attn.k_cache[0:1, :, :P]
            attn.v_cache[1:B, :, :P] = attn.v_cache[0:1, :, :P]
        parts.append(h.expand(B, P, h.shape[-1]))
    pos = torch.arange(P, T, device=dev).expand(B, T - P)
    at = torch.zeros(B, 1, dtype=torch.long, device=dev)
    _, h = base(ids[:, P:], pos, torch.arange(B, device=dev), T, True, logits_at=at)
    parts.append(h)
    return torch.cat(parts, dim=1) if P else h


def common_prefix(rows: Sequence[Row]) -> int:
    """Length of the token prefix every row shares (shorter than the shortest row)."""
    first = rows[0].ids
    n = min(len(r) for r in rows) - 1
    for r in rows[1:]:
        k = 0
        while k < n and r.ids[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def pad_batch(rows: Sequence[Row], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) [B, T]: right-padded; labels = ids on every real token, -100 on padding."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        t = torch.tensor(r.ids, dtype=torch.long)
        ids[b, : len(r)] = t
        labels[b, : len(r)] = t
    return ids.to(device), labels.to(device)


def next_embeddings(embed: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """next_embs[:, t] = E(ids[:, t + 1]); the last column (never scored) is zero."""
    e = embed(ids[:, 1:]).to(dtype)
    return torch.cat([e, e.new_zeros(e.shape[0], 1, e.shape[2])], dim=1)


class HiddenStates:
    """The base's hidden states for a list of rows: precomputed once when they fit, else per batch."""

    def __init__(
        self,
        base,
        rows: Sequence[Row],
        pad_id: int,
        device: torch.device,
        *,
        cache: bool,
        chunk: int = 32,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.base, self.rows, self.pad_id, self.device = base, rows, pad_id, device
        self.cached: list[torch.Tensor] | None = None
        if cache:
            self.cached = [None] * len(rows)  # type: ignore[list-item]
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
            for start in range(0, len(order), chunk):
                idx = order[start : start + chunk]
                chunk_rows = [rows[i] for i in idx]
                ids, _ = pad_batch(chunk_rows, pad_id, device)
                h = base_hidden(base, ids, shared=common_prefix(chunk_rows))
                for j, i in enumerate(idx):
                    self.cached[i] = h[j, : len(rows[i])].clone()
                if progress is not None:
                    progress(min(start + chunk, len(order)), len(order))

    def batch(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, hidden [B, T, H]) for these rows."""
        rows = [self.rows[i] for i in idx]
        ids, labels = pad_batch(rows, self.pad_id, self.device)
        if self.cached is None:
            return ids, labels, base_hidden(self.base, ids, shared=common_prefix(rows))
        H = self.cached[idx[0]].shape[-1]
        hidden = self.cached[idx[0]].new_zeros(len(idx), ids.shape[1], H)
        for b, i in enumerate(idx):
            hidden[b, : len(self.rows[i])] = self.cached[i]
        return ids, labels, hidden


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within windows of 16 batches (little padding),
    then the batches shuffled."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (HF's cosine schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    drafter: Drafter, hidden: HiddenStates, embed: torch.nn.Module, n: int, top_k: int, batch_size: int = 16
) -> dict[str, float]:
    """Teacher-forced held-out metrics over all rows, token-weighted: the training metric names plus `loss`."""
    dtype = next(drafter.parameters()).dtype
    sums = [{"ce": 0.0, "count": 0, "hits": torch.zeros(top_k)} for _ in range(n)]
    order = sorted(range(len(hidden.rows)), key=lambda i: len(hidden.rows[i]))
    for start in range(0, len(order), batch_size):
        ids, labels, h = hidden.batch(order[start : start + batch_size])
        logits = drafter(h.to(dtype), next_embeddings(embed, ids, dtype), n)
        for acc, s in zip(sums, head_stats(logits, labels, top_k), strict=True):
            acc["ce"] += float(s["ce"])
            acc["count"] += int(s["count"])
            hits = s["hits"].float().cpu()
            acc["hits"][: len(hits)] += hits
    out: dict[str, float] = {}
    for i, acc in enumerate(sums):
        count = max(1, acc["count"])
        out[f"redrafter{i}_loss"] = acc["ce"] / count
        for k in range(top_k):
            out[f"redrafter{i}_top{k + 1}"] = float(acc["hits"][k]) / count
    out["loss"] = sum(out[f"redrafter{i}_loss"] for i in range(n))
    return out


def accepted_run(drafts: Sequence[int], actual: Sequence[int]) -> int:
    """How many leading draft tokens equal the tokens the base really writes next."""
    a = 0
    for d, x in zip(drafts, actual, strict=False):
        if d != x:
            break
        a += 1
    return a


@torch.no_grad()
def simulate_acceptance(
    drafter: Drafter, hidden: HiddenStates, embed: torch.nn.Module, k: int
) -> dict[str, Any]:
    """Greedy speculative decoding replayed on the text the base writes (each row's `generated` segments):
    a step at position t has the base's token x[t+1] (g0) and the drafter's k drafts from h_t; the drafts
    matching x[t+2..] are accepted (never past the segment's end, where the served request stops) and the
    next step starts after them. Returns accepted drafted tokens per step (mean and histogram)."""
    dtype = next(drafter.parameters()).dtype
    hist = [0] * (k + 1)
    for i, row in enumerate(hidden.rows):
        ids, _, h = hidden.batch([i])
        L = len(row)
        if L < 2:
            continue
        drafts = drafter.draft(h[0, : L - 1].to(dtype), ids[0, 1:L], embed, k).tolist()  # row t: from h_t
        segments, t = [], 0
        while t < L:
            if row.generated[t]:
                s = t
                while t < L and row.generated[t]:
                    t += 1
                segments.append((s, t))
            else:
                t += 1
        for a, b in segments:
            t = a - 1  # the step that writes x[a] starts from the hidden state of the token before it
            while t + 1 < b:
                if t < 0:  # a row that starts with generated text: no hidden state before it
                    t += 1
                    continue
                acc = accepted_run(drafts[t], row.ids[t + 2 : b])
                hist[acc] += 1
                t += 1 + acc
    steps = sum(hist)
    accepted = sum(a * c for a, c in enumerate(hist))
    return {
        "accepted_drafts_mean": accepted / max(1, steps),
        "tokens_per_step": 1 + accepted / max(1, steps),
        "steps": steps,
        "accept_hist": hist,
    }


# ---------------------------------------------------------------------------------------------- training


def _rows(
    settings: DrafterSettings,
    base,
    tokenizer,
    eos: Sequence[int],
    out: Path,
    locator: str | None,
    commit: str | None,
    show: Callable[[str, int], Any],
) -> tuple[list[Row], list[Row], dict[str, Any]]:
    from mathforge.drafter import data

    examples = data.load_examples(settings, commit=commit, locator=locator)
    eval_examples = data.load_eval_examples(settings)
    info: dict[str, Any] = {"train_examples": len(examples), "eval_examples": len(eval_examples)}
    if settings.data_mode == "solutions":
        rows, cut = data.encode_solutions(tokenizer, settings, examples)
        eval_rows, eval_cut = data.encode_solutions(tokenizer, settings, eval_examples)
    else:
        out_data = out / "data"
        out_data.mkdir(parents=True, exist_ok=True)
        with show("base generations (training problems)", len(examples)) as p:
            rows, records, cut = data.generate_rows(
                base, tokenizer, settings, examples, eos_token_ids=eos, progress=p
            )
        with show("base generations (held-out problems)", len(eval_examples)) as p:
            eval_rows, eval_records, eval_cut = data.generate_rows(
                base, tokenizer, settings, eval_examples, eos_token_ids=eos, progress=p
            )
        for name, recs in (("generations.jsonl", records), ("eval_generations.jsonl", eval_records)):
            (out_data / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    rows = [r for r in rows if len(r) > 2]
    if not rows:
        raise UserError("the drafter's training data has no row longer than 2 tokens")
    info.update(
        train_rows=len(rows),
        train_tokens=sum(len(r) for r in rows),
        truncated=cut,
        eval_rows=len(eval_rows),
        eval_tokens=sum(len(r) for r in eval_rows),
        eval_generated_tokens=sum(sum(r.generated) for r in eval_rows),
        eval_truncated=eval_cut,
    )
    return rows, eval_rows, info


class _Quiet:
    def __init__(self, *_: Any) -> None:
        pass

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *_: Any) -> None:
        pass

    def __call__(self, *_: Any) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


def train_drafter(
    base_dir: str | Path,
    out: str | Path,
    settings: DrafterSettings,
    *,
    locator: str | None = None,
    commit: str | None = None,
    on_record: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a drafter for the checkpoint in `base_dir` and write it to `out` (Apple layout, bf16) with
    `training_summary.json` (held-out metrics) and `loss.jsonl` (every record `on_record` receives: `start`,
    one per step, `eval`, `end`). `locator`/`commit`: where the data source is and a hub dataset's resolved
    commit (default: `settings.data_source`, resolved now). Returns the summary."""
    from mathforge.progress import Progress

    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    show = Progress if progress else _Quiet
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)
    base, tokenizer, eos = load_base(base_dir, device)
    embed = base.embed_tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, eval_rows, data_info = _rows(settings, base, tokenizer, eos, out, locator, commit, show)

    n, top_k = settings.draft_len, settings.top_k
    H = base.config.hidden_size
    cache = sum(len(r) for r in rows) * H * 2 <= HIDDEN_CACHE_BYTES
    prep = time.monotonic()
    if cache:
        with show("base hidden states", len(rows)) as p:
            train_hidden = HiddenStates(base, rows, pad_id, device, cache=True, progress=p)
    else:  # each batch runs the base
        train_hidden = HiddenStates(base, rows, pad_id, device, cache=False)
    hidden_s = time.monotonic() - prep

    torch.manual_seed(settings.seed)
    drafter = Drafter(DrafterConfig.for_base(base.config, settings.num_draft_layers, settings.rnn)).to(device)
    drafter.train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = math.ceil(len(rows) / settings.batch_size)
    total = settings.steps or max(1, math.ceil(settings.epochs * per_epoch))
    warmup = math.ceil(settings.warmup_ratio * total)
    amp = device.type == "cuda"
    rng = random.Random(settings.seed)
    lengths = [len(r) for r in rows]

    log_file = (out / LOSS_LOG).open("w")

    def emit(record: dict) -> None:
        log_file.write(json.dumps(record, sort_keys=True) + "\n")
        if on_record is not None:
            on_record(record)

    emit(
        {
            "event": "start",
            "config": settings.model_dump(mode="json"),
            "drafter": DrafterConfig.for_base(base.config, settings.num_draft_layers, settings.rnn).to_json(),
            "parameters": sum(p.numel() for p in params),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "steps": total,
            "warmup_steps": warmup,
            **data_info,
        }
    )
    train_start = time.monotonic()
    queue: list[list[int]] = []
    last: dict[str, float] = {}
    try:
        with show("drafter training", total) as bar:
            for step in range(total):
                if not queue:
                    queue = length_batches(lengths, settings.batch_size, rng)
                idx = queue.pop()
                ids, labels, hidden = train_hidden.batch(idx)
                lr = lr_at(step, total, warmup, settings.lr)
                for group in optim.param_groups:
                    group["lr"] = lr
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = drafter(hidden.float(), next_embeddings(embed, ids, torch.float32), n)
                loss, metrics = drafter_loss(logits, labels, top_k)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                optim.step()
                last = {"loss": float(loss.detach()), **metrics}
                emit(
                    {
                        "step": step + 1,
                        **last,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": int((labels != IGNORE).sum()),
                        "elapsed_s": round(time.monotonic() - train_start, 3),
                    }
                )
                bar.advance()
        train_s = time.monotonic() - train_start

        drafter.save_pretrained(out)  # bf16, one model.safetensors
        saved = Drafter.from_pretrained(
            out, device=device, dtype=torch.bfloat16
        )  # evaluated as the engine loads it
        eval_start = time.monotonic()
        eval_hidden = HiddenStates(base, eval_rows, pad_id, device, cache=True)
        heldout = evaluate(saved, eval_hidden, embed, n, top_k)
        heldout.update(simulate_acceptance(saved, eval_hidden, embed, n))
        eval_s = time.monotonic() - eval_start
        emit(
            {
                "event": "eval",
                "step": total,
                **{f"eval_{k}": v for k, v in heldout.items() if k != "accept_hist"},
            }
        )
        summary = {
            "format_version": FORMAT_VERSION,
            "drafter": saved.config.to_json(),
            "settings": settings.model_dump(mode="json"),
            "data": data_info,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "steps": total,
            "epochs": round(total * settings.batch_size / len(rows), 3),
            "parameters": sum(p.numel() for p in params),
            "final_train": last,
            "heldout": heldout,
            "timing_s": {
                "data_and_base": round(prep - started, 2),
                "hidden_states": round(hidden_s, 2),
                "train": round(train_s, 2),
                "eval": round(eval_s, 2),
                "total": round(time.monotonic() - started, 2),
            },
        }
        emit(
            {
                "event": "end",
                "step": total,
                "train_time_s": train_s,
                "total_time_s": summary["timing_s"]["total"],
            }
        )
    finally:
        log_file.close()
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def evaluate_drafter(
    base_dir: str | Path, drafter_dir: str | Path, settings: DrafterSettings, *, device: str | None = None
) -> dict[str, Any]:
    """Held-out metrics and simulated acceptance of a saved drafter (e.g. one trained elsewhere)."""
    dev = pick_device(device or settings.device)
    base, tokenizer, eos = load_base(base_dir, dev)
    drafter = Drafter.from_pretrained(drafter_dir, device=dev, dtype=torch.bfloat16)
    if (
        drafter.config.hidden_size != base.config.hidden_size
        or drafter.config.vocab_size != base.config.vocab_size
    ):
        raise UserError(
            f"drafter {drafter_dir} (hidden {drafter.config.hidden_size}, vocab {drafter.config.vocab_size}) does "
            f"not fit the base {base_dir} (hidden {base.config.hidden_size}, vocab {base.config.vocab_size})"
        )
    from mathforge.drafter import data

    examples = data.load_eval_examples(settings)
    if settings.data_mode == "solutions":
        rows, _ = data.encode_solutions(tokenizer, settings, examples)
    else:
        rows, _, _ = data.generate_rows(base, tokenizer, settings, examples, eos_token_ids=eos)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hidden = HiddenStates(base, rows, pad_id, dev, cache=True)
    out = evaluate(drafter, hidden, base.embed_tokens, settings.draft_len, settings.top_k)
    out.update(simulate_acceptance(drafter, hidden, base.embed_tokens, settings.draft_len))
    return out
