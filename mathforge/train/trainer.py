"""Supervised training of a small Qwen2-architecture model on the synthetic tool-integrated solutions.

Plain PyTorch over transformers' `Qwen2ForCausalLM` (no Prefect, no MLflow: `python -m mathforge.train fit`
runs it anywhere torch does, a GPU host without either included). The run starts from a *skeleton*
checkpoint directory (config + tokenizer, e.g. the shipped `tiny_model/` or a `make_tiny` build) with fresh
seeded weights, trains with AdamW (warm-up, cosine decay), bf16 autocast on CUDA, and writes:

* `out/` — a standard HF checkpoint: model.safetensors (bf16), the skeleton's config.json,
  generation_config.json and tokenizer files, copied byte for byte;
* the loss log (JSONL): a `start` record (settings, parameter count, device), one record per step
  (`step`, `loss`, `lr`, `grad_norm`, `tokens`, `elapsed_s`), `eval` records every `eval_every` steps and at
  the end (`val_loss`, `val_token_acc`, `val_exact`: the share of validation solutions that greedy decoding
  would reproduce token for token under teacher forcing), and an `end` record with the summary.

`on_record(record)` receives every record as it is written (the Prefect task forwards them to MLflow).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mathforge.train.data import IGNORE, Encoded

SKELETON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass
class TrainConfig:
    """Everything that decides the result (the Prefect task keys its artifact on these). The defaults are the
    recipe of the shipped model (benchmarks/results/train-tiny-h200.json: 4481 steps is where its time
    budget put the end)."""

    steps: int = 4481
    batch_size: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0
    generic_prompt_fraction: float = 0.25
    max_len: int = 768
    eval_every: int = 500
    eval_batch_size: int = 64
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_hidden_layers": 2} for tests


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_model(skeleton: Path, overrides: dict[str, Any], seed: int):
    """A freshly initialised float32 model from the skeleton's config (plus overrides), seeded."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(str(skeleton))
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown model setting {key!r}")
        setattr(config, key, value)
    if "num_hidden_layers" in overrides:
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        config.max_window_layers = config.num_hidden_layers
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    return model, config


class Batches:
    """Seeded random batches (epochs of a shuffled order), from the examples packed once into int32 tensors;
    each batch is cut to its longest example, rounded up to a multiple of 16."""

    def __init__(self, examples: Sequence[Encoded], batch_size: int, pad_id: int, seed: int):
        if not examples:
            raise ValueError("no training examples")
        self.ids, self.labels, self.lengths = pack(examples, pad_id)
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.lengths)))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out

    def collate(self, indices: Sequence[int]):
        import torch

        idx = torch.tensor(indices)
        lengths = self.lengths[idx]
        width = (int(lengths.max()) + 15) // 16 * 16
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return self.ids[idx, :width].long(), self.labels[idx, :width].long(), mask


def pack(examples: Sequence[Encoded], pad_id: int):
    """(ids, labels) as right-padded int32 [N, L] tensors and the lengths [N]."""
    import torch

    width = (max(len(e.ids) for e in examples) + 15) // 16 * 16
    ids = torch.full((len(examples), width), pad_id, dtype=torch.int32)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.int32)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.int32)
        labels[row, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.int32)
    return ids, labels, torch.tensor([len(e.ids) for e in examples])


def collate(examples: Sequence[Encoded], pad_id: int):
    """One padded batch of these examples: (ids, labels, attention mask), int64."""
    import torch

    ids, labels, lengths = pack(examples, pad_id)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids.long(), labels.long(), mask


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, cosine decay to `lr * min_lr_ratio` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _loss_terms(model, ids, labels, mask, amp: bool):
    """Summed token loss, number of trained tokens, correct argmax tokens, per-row all-correct flags."""
    import torch

    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    trained = target != IGNORE
    correct = (logits.argmax(-1) == target) & trained
    row_exact = (correct | ~trained).all(dim=1)
    return loss, trained.sum(), correct.sum(), row_exact


def evaluate(
    model, examples: Sequence[Encoded], pad_id: int, device: str, batch_size: int
) -> dict[str, float]:
    """Teacher-forced validation: mean token loss, token accuracy, exact-solution rate."""
    import torch

    model.eval()
    loss_sum, tokens, correct, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, labels, mask = (t.to(device) for t in collate(examples[start : start + batch_size], pad_id))
            loss, n, c, rows = _loss_terms(model, ids, labels, mask, amp=device.startswith("cuda"))
            loss_sum += loss.item()
            tokens += int(n.item())
            correct += int(c.item())
            exact += int(rows.sum().item())
    model.train()
    return {
        "val_loss": loss_sum / max(1, tokens),
        "val_token_acc": correct / max(1, tokens),
        "val_exact": exact / max(1, len(examples)),
    }


def save_checkpoint(model, skeleton: Path, out: Path, overrides: dict[str, Any]) -> None:
    """bf16 safetensors + the skeleton's config/tokenizer files (config rewritten only for overrides)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in SKELETON_FILES:
        shutil.copyfile(skeleton / name, out / name)
    if overrides:
        cfg = json.loads((skeleton / "config.json").read_text())
        cfg.update(overrides)
        if "num_hidden_layers" in overrides:
            cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
            cfg["max_window_layers"] = cfg["num_hidden_layers"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


class LossLog:
    """The JSONL loss log; every record also goes to `on_record`."""

    def __init__(self, path: Path | None, on_record: Callable[[dict], None] | None):
        self.path, self.on_record = path, on_record
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = path.open("w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, sort_keys=True) + "\n")
            self._fh.flush()
        if self.on_record is not None:
            self.on_record(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def train(
    train_examples: Sequence[Encoded],
    val_examples: Sequence[Encoded],
    skeleton: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    device: str = "auto",
    loss_log: str | Path | None = None,
    on_record: Callable[[dict], None] | None = None,
    extra_start: dict[str, Any] | None = None,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Train, write the checkpoint to `out`, return the summary (also the loss log's `end` record).

    `time_budget_s`: time the first steps, then lower `cfg.steps` (the cosine schedule's length too) so the
    run ends within about that many seconds of training; the `budget` record says what was chosen."""
    import torch

    skeleton, out = Path(skeleton), Path(out)
    device = pick_device(device)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, config = init_model(skeleton, cfg.model_overrides, cfg.seed)
    model.to(device).train()
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, cfg.beta2),
        eps=1e-8,
        fused=device.startswith("cuda"),
    )
    batches = Batches(train_examples, cfg.batch_size, pad_id, cfg.seed)
    amp = device.startswith("cuda")
    log = LossLog(Path(loss_log) if loss_log else None, on_record)
    hardware = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    log.write(
        {
            "event": "start",
            "config": asdict(cfg),
            "params": params,
            "device": device,
            "hardware": hardware,
            "torch": torch.__version__,
            "num_train": len(train_examples),
            "num_validation": len(val_examples),
            "train_tokens_trained": sum(sum(1 for x in e.labels if x != IGNORE) for e in train_examples),
            **(extra_start or {}),
        }
    )
    started = time.monotonic()
    pending: list[tuple[int, float, int, Any, Any]] = []  # (step, lr, tokens, loss tensor, grad-norm tensor)
    tokens_seen = 0
    last: dict[str, float] = {}

    def flush() -> None:
        nonlocal last
        if not pending:
            return
        values = torch.stack([torch.stack([p[3], p[4]]) for p in pending]).float().cpu().tolist()
        elapsed = round(time.monotonic() - started, 3)
        for (step, lr, toks, _, _), (loss, gnorm) in zip(pending, values, strict=True):
            last = {"loss": loss, "grad_norm": gnorm}
            log.write(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "tokens": toks,
                    "elapsed_s": elapsed,
                }
            )
        pending.clear()

    def run_eval(step: int) -> dict[str, float]:
        flush()
        metrics = evaluate(model, val_examples, pad_id, device, cfg.eval_batch_size) if val_examples else {}
        if metrics:
            log.write(
                {"event": "eval", "step": step, **metrics, "elapsed_s": round(time.monotonic() - started, 3)}
            )
        return metrics

    metrics: dict[str, float] = {}
    probe = (10, 40)  # with a time budget: steps timed (after the warm-up of kernels) to fix the total
    probe_started = 0.0
    try:
        step = 0
        while step < cfg.steps:
            step += 1
            if time_budget_s is not None and step in (probe[0] + 1, probe[1] + 1):
                flush()  # synchronises, so the wall time is real
                now = time.monotonic()
                if step == probe[0] + 1:
                    probe_started = now
                else:
                    per_step = (now - probe_started) / (probe[1] - probe[0])
                    left = time_budget_s - (now - started)
                    fitted = max(probe[1] + 1, probe[1] + int(left / per_step))
                    if fitted < cfg.steps:
                        cfg = replace(cfg, steps=fitted)
                    log.write(
                        {"event": "budget", "step": probe[1], "per_step_s": per_step, "steps": cfg.steps}
                    )
            lr = lr_at(step - 1, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            cpu_batch = batches.collate(batches.next_indices())
            tokens_seen += int(cpu_batch[2].sum())
            ids, labels, mask = (t.to(device, non_blocking=True) for t in cpu_batch)
            loss_sum, n_tokens, _, _ = _loss_terms(model, ids, labels, mask, amp)
            loss = loss_sum / n_tokens.clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            pending.append((step, lr, tokens_seen, loss.detach(), gnorm.detach()))
            if len(pending) >= 25:
                flush()
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                run_eval(step)
        metrics = run_eval(cfg.steps)
        flush()
        train_time = time.monotonic() - started
        save_checkpoint(model, skeleton, out, cfg.model_overrides)
        summary = {
            "event": "end",
            "steps": cfg.steps,
            "final_loss": last.get("loss"),
            "train_time_s": round(train_time, 2),
            "params": params,
            "device": device,
            "hardware": hardware,
            "weights_bytes": (out / "model.safetensors").stat().st_size,
            **metrics,
        }
        log.write(summary)
        return summary
    finally:
        log.close()


def read_loss_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
