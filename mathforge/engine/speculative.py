"""Speculative decoding with a ReDrafter drafter: the pure, batched parts of one draft-and-verify step.

A step for a batch of rows, each with the base model's final-norm hidden state h of its last fed position p-1
and its last chosen token g0 (to be fed at position p):

1. the drafter proposes k tokens d_1..d_k per row from (h, g0): one beam, greedy (`Drafter.draft`);
2. the target verifies [g0, d_1..d_k] at positions p..p+k in ONE forward: logits at every position, so
   position p+j gives the target's distribution of the token after d_j (t_j);
3. `verify_greedy` / `speculative_sample` accept the longest prefix of drafts the target agrees with, and
   the row emits the accepted drafts plus one token of the target's own (the correction after the first
   rejected draft, or the bonus token after all k): 1..k+1 tokens per target forward;
4. the row's next h is the hidden state at the last accepted input position (index n_emit - 1), its next
   g0 the last emitted token.

KV "rollback" costs nothing with the engine's position-indexed static cache: the verify forward wrote keys
and values for positions p..p+k, the ones after the last accepted position hold rejected drafts, and no
query ever attends to them — a query at position q sees cache positions <= q only, and the next forward
starts at the first rejected position, overwriting each stale entry before (in the same layer) any query
at or after it reads it.

Exactness. Greedy rows emit exactly the target's argmax chain (a draft is accepted only when it IS the
argmax). Sampled rows use speculative sampling for a deterministic draft (q = a point mass on d): accept d
with probability p(d), else draw from p with d removed and renormalised; after k accepted drafts draw the
bonus token from p. The emitted tokens are then distributed exactly as plain sampling from p, where p is the
warped distribution (temperature, top-k, top-p, min-p) of `mathforge.engine.sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mathforge.engine.sampling import SamplingBatch, sample, to_device, warped_probs

MAX_DRAFT_LEN = 16


def verify_positions(first: Sequence[int], width: int, limit: int) -> list[list[int]]:
    """Positions of a verify forward: row i feeds first[i] .. first[i] + width - 1, clamped to `limit`
    (max_model_len - 1) so the static cache is never indexed past its end.

    Clamping is safe: a request's last needed input position is at most n_prompt + max_tokens - 2
    <= limit - 1 (the engine validates n_prompt + max_tokens <= max_model_len), so only columns whose
    outputs are never emitted are clamped; they write only cache position `limit`, which no needed query
    (position < limit) attends to.
    """
    return [[min(p + j, limit) for j in range(width)] for p in first]


def accepted_prefix(accept: torch.Tensor) -> torch.Tensor:
    """[B, k] bool (draft j accepted on its own) -> [B] int64: drafts accepted before the first rejection."""
    return accept.long().cumprod(dim=1).sum(dim=1)


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, k+1, V], drafts [B, k] -> (tokens [B, k+1], n_emit [B]).

    The emitted tokens are tokens[:, :n_emit]: the target's argmax chain, which equals the accepted
    drafts followed by the target's token after them."""
    target = logits.argmax(dim=-1)
    k = drafts.shape[1]
    n_accept = accepted_prefix(drafts == target[:, :k])
    return target, n_accept + 1


def speculative_sample(
    probs: torch.Tensor, drafts: torch.Tensor, uniforms: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling against a deterministic (greedy) draft.

    probs [B, k+1, V]: the target's warped distributions at the k+1 verify positions; drafts [B, k];
    uniforms [B, k] in [0, 1); noise [B, k+1, V] Exponential(1) draws. Returns (tokens [B, k+1],
    n_emit [B]); the emitted tokens are tokens[:, :n_emit].

    Draft j is accepted when u_j < p_j(d_j) (min(1, p/q) with q = 1 at d_j). At the first rejected
    position j the row emits a sample of p_j with d_j removed (the residual max(0, p - q), normalised);
    when all k are accepted, a sample of p_k (the bonus). Sampling is Gumbel-max on unnormalised
    probabilities, `argmax(p / noise)`, as in `sampling.sample`.
    """
    B, K1, _ = probs.shape
    k = K1 - 1
    p_draft = probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    n_accept = accepted_prefix(uniforms < p_draft)
    residual = probs.clone()
    residual[:, :k].scatter_(-1, drafts[..., None], 0.0)
    candidates = (residual / noise.clamp_min(1e-20)).argmax(dim=-1)  # [B, k+1]
    cols = torch.arange(K1, device=probs.device)[None, :]
    padded = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)
    tokens = torch.where(cols < n_accept[:, None], padded, candidates)
    return tokens, n_accept + 1


def draw_randoms(
    rows: Sequence[int],
    generators: Sequence[torch.Generator | None],
    batch: int,
    k: int,
    vocab: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sampled row, from its own generator: k uniforms then (k+1) x V exponentials. Every step draws
    the same amount whatever the batch holds, so a seeded request is reproducible in any batch."""
    uniforms = torch.ones(batch, k, device=device)  # 1.0 never accepts: harmless for rows not drawn
    noise = torch.ones(batch, k + 1, vocab, device=device)
    for i in rows:
        uniforms[i].uniform_(generator=generators[i])
        noise[i].exponential_(generator=generators[i])
    return uniforms, noise


class SpecBatch:
    """The per-composition constants of a speculative decode batch (built once, reused while the batch's
    requests do not change). `plain` rows do not speculate: repetition-penalty rows, whose penalty
    would change within an accepted run; they emit one token per step, chosen by `sampling.sample`."""

    def __init__(self, params: list, vocab_size: int, k: int, device: torch.device):
        """`params[i]` is row i's SamplingParams, or None for a padding row."""
        self.k = k
        plain = [p is not None and p.repetition_penalty != 1.0 for p in params]
        greedy = [p is None or p.greedy for p in params]
        self.plain_rows = [i for i, x in enumerate(plain) if x]
        self.sampled_rows = [i for i, (g, x) in enumerate(zip(greedy, plain, strict=True)) if not g and not x]
        self.all_greedy = not self.plain_rows and not self.sampled_rows
        self.greedy = to_device(torch.tensor(greedy, dtype=torch.bool), device)
        self.plain = to_device(torch.tensor(plain, dtype=torch.bool), device)
        # the warping of every verify position: each row's parameters repeated k+1 times
        self.flat = (
            SamplingBatch.build([p for p in params for _ in range(k + 1)], vocab_size, device)
            if self.sampled_rows
            else None
        )
        # plain rows choose their one token with the normal sampler (others: greedy padding, no noise)
        self.plain_sb = (
            SamplingBatch.build(
                [p if x else None for p, x in zip(params, plain, strict=True)], vocab_size, device
            )
            if self.plain_rows
            else None
        )

    def verify(
        self,
        logits: torch.Tensor,
        drafts: torch.Tensor,
        generators: Sequence[torch.Generator | None],
        seen: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, k+1, V] float32, drafts [B, k] -> (tokens [B, k+1], n_emit [B]) on the device.

        `seen` [B, V] is the presence mask of the rows (needed when a plain row has a repetition penalty)."""
        tokens, n_emit = verify_greedy(logits, drafts)
        if self.all_greedy:
            return tokens, n_emit
        if self.sampled_rows:
            B, K1, V = logits.shape
            probs = warped_probs(logits.reshape(B * K1, V), self.flat).view(B, K1, V)
            uniforms, noise = draw_randoms(self.sampled_rows, generators, B, self.k, V, logits.device)
            s_tokens, s_emit = speculative_sample(probs, drafts, uniforms, noise)
            tokens = torch.where(self.greedy[:, None], tokens, s_tokens)
            n_emit = torch.where(self.greedy, n_emit, s_emit)
        if self.plain_sb is not None:
            first = sample(logits[:, 0], self.plain_sb, generators, seen)
            tokens = tokens.clone()
            tokens[:, 0] = torch.where(self.plain, first, tokens[:, 0])
            n_emit = torch.where(self.plain, torch.ones_like(n_emit), n_emit)
        return tokens, n_emit
