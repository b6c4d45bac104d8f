"""Batched next-token selection: repetition penalty, temperature, top-k, top-p, min-p, greedy/sampled.

Order and semantics follow transformers' `generate` (RepetitionPenalty -> Temperature -> TopK -> TopP ->
MinP), so a greedy or seeded request can be compared with the reference implementation.

Everything stays on the model's device: sampling draws Exponential(1) noise from each request's own
`torch.Generator` and takes `argmax(probs / noise)` (the Gumbel-max trick, as in gpt-fast), so there is
no `torch.multinomial` host sync and a seeded request draws the same numbers whatever else is in the
batch. The only host sync of a step is the caller fetching the chosen token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mathforge.engine.api import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one decode/prefill batch, as device tensors (built once per batch
    composition and reused while it does not change)."""

    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B, 1] float32 (1.0 on greedy rows)
    top_k: torch.Tensor  # [B, 1] int64 (V when disabled)
    top_p: torch.Tensor  # [B, 1] float32
    min_p: torch.Tensor  # [B, 1] float32
    repetition_penalty: torch.Tensor | None  # [B, 1] float32, None when every row is 1.0
    all_greedy: bool
    any_greedy: bool
    need_sort: bool  # some row uses top-k or top-p
    need_min_p: bool
    sampled_rows: list[int]  # rows that draw noise (in row order)

    @classmethod
    def build(
        cls, params: list[SamplingParams | None], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        """`params[i] is None` marks a padding row (treated as greedy, never penalised)."""
        greedy = [p is None or p.greedy for p in params]
        temp = [1.0 if g else float(p.temperature) for g, p in zip(greedy, params, strict=True)]
        top_k = [vocab_size if (p is None or p.top_k <= 0) else min(int(p.top_k), vocab_size) for p in params]
        top_p = [1.0 if p is None else float(p.top_p) for p in params]
        min_p = [0.0 if p is None else float(p.min_p) for p in params]
        rep = [1.0 if p is None else float(p.repetition_penalty) for p in params]
        sampled = [i for i, g in enumerate(greedy) if not g]
        sampled_set = set(sampled)

        def col(values, dtype):
            return to_device(torch.tensor(values, dtype=dtype).view(-1, 1), device)

        return cls(
            greedy=to_device(torch.tensor(greedy, dtype=torch.bool), device),
            temperature=col(temp, torch.float32),
            top_k=col(top_k, torch.int64),
            top_p=col(top_p, torch.float32),
            min_p=col(min_p, torch.float32),
            repetition_penalty=col(rep, torch.float32) if any(r != 1.0 for r in rep) else None,
            all_greedy=not sampled,
            any_greedy=len(sampled) < len(params),
            need_sort=any(k < vocab_size for i, k in enumerate(top_k) if i in sampled_set)
            or any(top_p[i] < 1.0 for i in sampled),
            need_min_p=any(min_p[i] > 0.0 for i in sampled),
            sampled_rows=sampled,
        )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a stream sync (pinned + non_blocking on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor over a presence mask: tokens already in the prompt
    or output get logit/penalty when positive, logit*penalty when negative. logits, seen: [B, V]."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on [B, V] float32 logits; removed tokens become -inf."""
    x = logits / sb.temperature
    if sb.need_sort:
        sorted_x, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(x.shape[-1], device=x.device)
        sorted_x = sorted_x.masked_fill(ranks[None, :] >= sb.top_k, float("-inf"))
        probs = sorted_x.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the best one never)
        before = probs.cumsum(dim=-1) - probs
        sorted_x = sorted_x.masked_fill(before >= sb.top_p, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    if sb.need_min_p:
        probs = x.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * sb.min_p
        x = x.masked_fill(probs < threshold, float("-inf"))
    return x


def warped_probs(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """The distribution a sampled row draws from: softmax of the filtered logits [B, V] (float32)."""
    return filter_logits(logits, sb).softmax(dim=-1)


def sample(
    logits: torch.Tensor,
    sb: SamplingBatch,
    generators: list[torch.Generator | None],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose one token per row of `logits` [B, V] (float32). Returns int64 [B] on the same device.

    `generators[i]` is row i's generator (used only for sampled rows); `seen` [B, V] bool is the
    presence mask for the repetition penalty (needed only when `sb.repetition_penalty` is set).
    """
    if sb.repetition_penalty is not None:
        if seen is None:
            raise ValueError("repetition penalty needs the presence mask `seen`")
        logits = apply_repetition_penalty(logits, sb.repetition_penalty, seen)
    if sb.all_greedy:
        return logits.argmax(dim=-1)
    probs = warped_probs(logits, sb)
    noise = torch.ones_like(probs)
    for i in sb.sampled_rows:
        noise[i].exponential_(generator=generators[i])
    # a zero draw would turn a removed token's 0/0 into NaN (which argmax prefers)
    chosen = (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)
    if sb.any_greedy:
        chosen = torch.where(sb.greedy, logits.argmax(dim=-1), chosen)
    return chosen


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own generator: seeded for reproducible sampling, else from fresh OS entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
