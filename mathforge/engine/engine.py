"""The synchronous engine core: request slots, a continuous-batching scheduler and one `step()`.

Each running request owns one slot of the model's static KV cache. A step

1. admits waiting requests into free slots and prefills them (short prompts batched together, long
   ones chunked) — their first token comes from the prefill logits;
2. decodes one token for every request that was already running, as one batch padded to a bucket
   size (1, 2, 4, 8, ... max_slots) with kv_len rounded up to a multiple of `kv_block`, so the decode
   forward has one static shape per (batch bucket, kv_len bucket) — what a CUDA graph needs;
3. fetches the chosen token ids to the host once (the step's only sync), then runs the stop checks
   and incremental detokenization, and frees the slot of every request that finished.

With a ReDrafter drafter (`Engine(..., drafter=, draft_len=k)`), step 2 is speculative: the drafter
proposes k tokens per running request from the base's final-norm hidden state of its last fed position
(kept per slot in a [slots + 1, H] device buffer, written by the prefill and by every verify), the target
verifies them in one forward of k + 1 positions (static shape per (batch bucket, k + 1, kv_len bucket)),
and each request emits 1..k+1 tokens; see `mathforge.engine.speculative` for the algorithm, why rejected
positions need no KV rollback, and why sampled requests keep their exact distribution.

Padding rows of a decode batch write into a scratch slot (the cache has max_slots + 1 slots), so
they never touch a live request's cache. The engine is single-threaded; `AsyncEngine` runs it on a
background thread.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mathforge.engine.api import EngineInputError, RequestOutput, SamplingParams
from mathforge.engine.detok import IncrementalDetokenizer
from mathforge.engine.graphs import GraphedFunction
from mathforge.engine.sampling import SamplingBatch, make_generator, sample, to_device
from mathforge.engine.speculative import MAX_DRAFT_LEN, SpecBatch, verify_positions
from mathforge.errors import UserError

log = logging.getLogger("mathforge.engine")

FINISH_REASONS = ("stop", "length", "abort")
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def decode_buckets(max_slots: int) -> list[int]:
    """Decode batch sizes: powers of two below max_slots, then max_slots itself."""
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return out + [max_slots]


def load_eos_token_ids(model_dir: str | Path, tokenizer=None) -> list[int]:
    """eos ids from generation_config.json (int or list), else the tokenizer's eos token."""
    f = Path(model_dir) / "generation_config.json"
    if f.is_file():
        eos = json.loads(f.read_text()).get("eos_token_id")
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    return []


class Engine:
    """Continuous-batching generation over a `Transformer` with a static per-slot KV cache."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_slots: int = 8,
        max_model_len: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        kv_block: int = 128,
        prefill_chunk: int = 1024,
        max_prefill_tokens: int = 4096,
        runner: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]] | None = None,
        drafter: torch.nn.Module | None = None,
        draft_len: int = 3,
        verify_rows: bool | None = None,
    ):
        """`runner` replaces `model(...)` for every forward (same signature): e.g. a CUDA-graph runner.
        `drafter` (a `mathforge.drafter.model.Drafter` for this base) turns decoding speculative, drafting
        `draft_len` tokens per step.

        `verify_rows` picks the layout of the verify forward. True: k + 1 single-token rows per request
        ([B * (k + 1), 1]; row j writes its position's KV before any row attends, so it sees the drafts
        before it) — each row is exactly the computation of a non-speculative decode step, so greedy
        output is token for token the same wherever the kernels are batch-invariant; but each row reads
        the request's KV cache again. False: one [B, k + 1] query block per request (the KV cache read
        once), whose attention kernels may round differently from single-token decode (measured on CPU:
        PyTorch's flash kernel differs by 1 bf16 ulp between query lengths 4 and 1, enough to flip a tied
        argmax). Default: rows on CPU (exactness), block on CUDA (bandwidth)."""
        cfg = model.config
        if max_slots < 1:
            raise UserError(f"max_slots must be at least 1, got {max_slots}")
        limit = cfg.max_position_embeddings
        self.max_model_len = int(max_model_len or limit)
        if not 2 <= self.max_model_len <= limit:
            raise UserError(
                f"max_model_len must be between 2 and the model's max_position_embeddings "
                f"({limit}), got {self.max_model_len}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_model_len = self._fit_kv_cache(
            model, max_slots, self.max_model_len, explicit=bool(max_model_len), kv_block=kv_block
        )
        self.vocab_size = cfg.vocab_size
        self.max_slots = max_slots
        self.kv_block = kv_block
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max(max_prefill_tokens, prefill_chunk)
        self.eos_token_ids = frozenset(
            eos_token_ids if eos_token_ids is not None else (cfg.eos_token_id or [tokenizer.eos_token_id])
        ) - {None}
        self.buckets = decode_buckets(max_slots)
        self.scratch_slot = max_slots
        model.setup_cache(max_slots + 1, self.max_model_len)
        self._runner = runner or model
        self.drafter, self.draft_len = self._check_drafter(drafter, draft_len, cfg)
        self.verify_rows = self.device.type != "cuda" if verify_rows is None else bool(verify_rows)
        # per slot: the final-norm hidden state of the request's last fed position (the drafter's input)
        self._hidden = (
            torch.zeros(max_slots + 1, cfg.hidden_size, dtype=model.dtype, device=self.device)
            if self.drafter is not None
            else None
        )
        self._spec_batch: tuple[tuple, SpecBatch] | None = None
        # the drafting steps as graphs per batch bucket (`use_draft_graphs`), like the runner's forwards
        self.draft_graphs: GraphedFunction | None = None

        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._by_id: dict[str, _Request] = {}
        self._free: list[int] = list(range(max_slots))
        heapq.heapify(self._free)
        self._seen: torch.Tensor | None = None  # [slots, V] presence mask for repetition penalty
        self._decode_sb: tuple[tuple, SamplingBatch] | None = None

        # counters (read by stats() from other threads: plain ints, swapped atomically under the GIL)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_total = 0
        self.finished_total: Counter[str] = Counter()
        self.steps_total = 0
        self.running_peak = 0
        # speculative decoding (per request and verify forward): drafts proposed / accepted, tokens emitted
        self.spec_verify_total = 0
        self.spec_draft_tokens_total = 0
        self.spec_accepted_tokens_total = 0
        self.spec_emitted_tokens_total = 0

    # ------------------------------------------------------------------ construction
    def _check_drafter(self, drafter, draft_len: int, cfg) -> tuple[torch.nn.Module | None, int]:
        if drafter is None:
            return None, draft_len
        if (
            isinstance(draft_len, bool)
            or not isinstance(draft_len, int)
            or not 1 <= draft_len <= MAX_DRAFT_LEN
        ):
            raise UserError(f"draft_len must be an integer in [1, {MAX_DRAFT_LEN}], got {draft_len!r}")
        dc = drafter.config
        if (dc.hidden_size, dc.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
            raise UserError(
                f"the drafter was made for a base with hidden_size {dc.hidden_size} and vocab_size "
                f"{dc.vocab_size}, but this model has {cfg.hidden_size} and {cfg.vocab_size}: train a drafter "
                f"for this base model"
            )
        if self.max_model_len < draft_len + 2:
            raise UserError(f"max_model_len {self.max_model_len} is too short for draft_len {draft_len}")
        return drafter.to(device=self.device, dtype=self.model.dtype).eval(), draft_len

    @staticmethod
    def _fit_kv_cache(model, max_slots: int, max_model_len: int, *, explicit: bool, kv_block: int) -> int:
        """Check the KV cache ((max_slots + 1 scratch) x max_model_len) fits in 90% of free memory. An
        explicit max_model_len that does not fit is an error; the default one is lowered to fit."""
        cfg = model.config
        device = next(model.parameters()).device
        elsize = torch.empty((), dtype=model.dtype).element_size()
        per_token = (
            2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elsize * (max_slots + 1)
        )
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        budget = int(free * 0.9)
        need = per_token * max_model_len
        if need <= budget:
            return max_model_len
        fits = budget // per_token // kv_block * kv_block
        gib = 2**30
        if explicit or fits < 2:
            raise UserError(
                f"the KV cache for {max_slots} slots x {max_model_len} tokens needs {need / gib:.1f} GiB but only "
                f"{free / gib:.1f} GiB of {device.type} memory is free; "
                + (
                    f"lower --max-model-len (at most {fits} fits) or --max-slots"
                    if fits >= 2
                    else "lower --max-slots"
                )
            )
        log.warning(
            "max_model_len lowered from %d to %d so the KV cache of %d slots fits in %.1f GiB free memory",
            max_model_len,
            fits,
            max_slots,
            free / gib,
        )
        return int(fits)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        max_slots: int = 8,
        max_model_len: int | None = None,
        dtype: torch.dtype | str = torch.bfloat16,
        device: str | torch.device = "cpu",
        drafter: str | Path | torch.nn.Module | None = None,
        cuda_graphs: bool | None = None,
        **kwargs,
    ) -> Engine:
        """`drafter`: a ReDrafter directory (Apple layout) or a loaded Drafter; `draft_len` goes in kwargs.
        `cuda_graphs` (default: on for CUDA): decode and verify steps replay CUDA graphs
        (`mathforge.engine.graphs.CUDAGraphRunner`), and so do the drafter's steps (`use_draft_graphs`),
        captured here for every decode batch bucket."""
        from mathforge.checkpoint import load_tokenizer
        from mathforge.engine.model import Transformer

        model_dir = Path(model_dir)
        if isinstance(dtype, str):
            dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
        model = Transformer.from_pretrained(model_dir, device=device, dtype=dtype)
        if isinstance(drafter, str | Path):
            from mathforge.drafter.model import Drafter

            drafter = Drafter.from_pretrained(drafter, device=device, dtype=dtype)
        tokenizer = load_tokenizer(model_dir)
        eos = load_eos_token_ids(model_dir, tokenizer)
        on_cuda = torch.device(device).type == "cuda"
        if cuda_graphs and not on_cuda:
            raise UserError("CUDA graphs need device cuda")
        runner = None
        if (on_cuda if cuda_graphs is None else cuda_graphs) and kwargs.get("runner") is None:
            from mathforge.engine.graphs import CUDAGraphRunner

            kwargs.pop("runner", None)
            runner = CUDAGraphRunner(model, batch_sizes=decode_buckets(max_slots))
            kwargs["runner"] = runner
        engine = cls(
            model,
            tokenizer,
            max_slots=max_slots,
            max_model_len=max_model_len,
            eos_token_ids=eos or None,
            drafter=drafter,
            **kwargs,
        )
        if runner is not None:
            if engine.drafter is None:
                runner.warmup(slot=engine.scratch_slot)
            else:  # the verify forward (returns hidden states): [B, k + 1], or [B * (k + 1), 1] rows
                k1 = engine.draft_len + 1
                if engine.verify_rows:
                    runner.batch_sizes |= {b * k1 for b in engine.buckets}
                else:
                    runner.token_counts.add(k1)
                runner.warmup(slot=engine.scratch_slot, return_hidden=True)
                engine.use_draft_graphs(runner.backend)
        return engine

    # ------------------------------------------------------------------ requests
    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise EngineInputError (a clear, user-facing message) for a request this engine cannot run.

        Pure: reads only configuration, so it may be called from any thread.
        """
        n, ctx, V = len(prompt_ids), self.max_model_len, self.vocab_size
        if n == 0:
            raise EngineInputError("the prompt is empty: send at least one token")
        bad = next(
            (t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V), None
        )
        if bad is not None:
            raise EngineInputError(f"prompt token id {bad!r} is not a valid token id (0 <= id < {V})")
        mt = params.max_tokens
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise EngineInputError(f"max_tokens must be a positive integer, got {mt!r}")
        if n >= ctx:
            raise EngineInputError(
                f"the prompt has {n} tokens, which leaves no room for output within this "
                f"model's maximum context length of {ctx} tokens; shorten the prompt"
            )
        if n + mt > ctx:
            raise EngineInputError(
                f"this model's maximum context length is {ctx} tokens, but {n + mt} were requested "
                f"({n} in the prompt, {mt} in max_tokens); reduce max_tokens to at most {ctx - n}"
            )
        t = params.temperature
        if not isinstance(t, int | float) or math.isnan(t) or t < 0 or t > 1e4:
            raise EngineInputError(f"temperature must be a number >= 0, got {t!r}")
        if not isinstance(params.top_p, int | float) or not 0.0 < params.top_p <= 1.0:
            raise EngineInputError(f"top_p must be in (0, 1], got {params.top_p!r}")
        if not isinstance(params.top_k, int) or isinstance(params.top_k, bool) or params.top_k < -1:
            raise EngineInputError(
                f"top_k must be an integer >= -1 (0 or -1 disables it), got {params.top_k!r}"
            )
        if not isinstance(params.min_p, int | float) or not 0.0 <= params.min_p <= 1.0:
            raise EngineInputError(f"min_p must be in [0, 1], got {params.min_p!r}")
        rp = params.repetition_penalty
        if not isinstance(rp, int | float) or math.isnan(rp) or not 0.0 < rp <= 1e4:
            raise EngineInputError(f"repetition_penalty must be > 0, got {rp!r}")
        if params.seed is not None and (
            not isinstance(params.seed, int) or not _SEED_MIN <= params.seed <= _SEED_MAX
        ):
            raise EngineInputError(f"seed must be an integer in [-2**63, 2**64), got {params.seed!r}")
        if any(not isinstance(s, str) or not s for s in params.stop):
            raise EngineInputError("stop strings must be non-empty strings")
        bad = next((t for t in params.stop_token_ids if not isinstance(t, int) or not 0 <= t < V), None)
        if bad is not None:
            raise EngineInputError(f"stop_token_ids entry {bad!r} is not a valid token id (0 <= id < {V})")

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a request (validated first); it is admitted at the next step with a free slot."""
        if request_id in self._by_id:
            raise EngineInputError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params)
        prompt_ids = [int(t) for t in prompt_ids]
        req = _Request(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, stop=params.stop),
            generator=None if params.greedy else make_generator(params.seed, self.device),
            stop_ids=frozenset(params.stop_token_ids)
            | (frozenset() if params.ignore_eos else self.eos_token_ids),
            arrival=time.monotonic(),
        )
        self._by_id[request_id] = req
        self.waiting.append(req)
        self.requests_total += 1

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a waiting or running request and free its slot now. Returns its final output
        (finish_reason "abort"), or None when the id is unknown or already finished."""
        req = self._by_id.get(request_id)
        if req is None:
            return None
        if req.slot < 0:
            self.waiting.remove(req)
            self._by_id.pop(request_id, None)
            self.finished_total["abort"] += 1
        else:
            self._finish(req, "abort")
        return RequestOutput(
            request_id,
            [],
            "",
            finished=True,
            finish_reason="abort",
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
        )

    def abort_all(self) -> list[str]:
        """Abort every request (after an internal error); returns their ids."""
        ids = list(self._by_id)
        for rid in ids:
            self.abort_request(rid)
        return ids

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        running, waiting = len(self.running), len(self.waiting)
        return {
            "running": running,
            "waiting": waiting,
            "free_slots": self.max_slots - running,
            "max_slots": self.max_slots,
            "max_model_len": self.max_model_len,
            "running_peak": self.running_peak,
            "requests_total": self.requests_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "finished_total": {r: self.finished_total.get(r, 0) for r in FINISH_REASONS},
            "steps_total": self.steps_total,
            "speculative": None
            if self.drafter is None
            else {
                "draft_len": self.draft_len,
                "verify_steps_total": self.spec_verify_total,
                "draft_tokens_total": self.spec_draft_tokens_total,
                "accepted_tokens_total": self.spec_accepted_tokens_total,
                "emitted_tokens_total": self.spec_emitted_tokens_total,
            },
        }

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit + prefill new requests, decode one token for the running ones; return the increments."""
        admitted: list[_Request] = []
        while self.waiting and self._free:
            req = self.waiting.popleft()
            req.slot = heapq.heappop(self._free)
            self._on_admit(req)
            admitted.append(req)
        decoding = list(self.running)
        # (requests, chosen tokens): [n] one token each, or [n, 1 + k + 1] (count, tokens) when speculative
        results: list[tuple[list[_Request], torch.Tensor]] = []
        if decoding:
            spec = self.drafter is not None
            results.append((decoding, self._spec_decode(decoding) if spec else self._decode(decoding)))
        for group in self._prefill_groups(admitted):
            results.append((group, self._prefill(group)))
        self.running.extend(admitted)
        self.running_peak = max(self.running_peak, len(self.running))
        if not results:
            return []
        self.steps_total += 1
        flat = torch.cat([t.reshape(-1) for _, t in results]).tolist()  # the step's one host sync
        now = time.monotonic()
        outputs, at = [], 0
        for group, t in results:
            width = 1 if t.dim() == 1 else t.shape[1]
            for req in group:
                row, at = flat[at : at + width], at + width
                if width == 1:
                    outputs.append(self._append(req, row, now))
                else:
                    outputs.append(self._append_verified(req, row[1 : 1 + row[0]], now))
        return outputs

    def _on_admit(self, req: _Request) -> None:
        self.prompt_tokens_total += len(req.prompt_ids)
        if req.params.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = torch.zeros(
                    self.max_slots + 1, self.vocab_size, dtype=torch.bool, device=self.device
                )
            self._seen[req.slot].zero_()
            self._seen[req.slot, self._tensor(req.prompt_ids)] = True

    def _append(self, req: _Request, tokens: list[int], now: float) -> RequestOutput:
        """Add tokens in order until one finishes the request (eos / stop token id, stop string,
        max_tokens): the rest of a speculative run after it is dropped."""
        if req.first_token_time is None:
            req.first_token_time = now
        finish, added, parts = None, [], []
        for tok in tokens:
            req.output_ids.append(tok)
            added.append(tok)
            self.generation_tokens_total += 1
            if tok in req.stop_ids:
                finish = "stop"
                parts.append(req.detok.flush())  # the stop/eos token's own text is not returned
                break
            parts.append(req.detok.add(tok))
            if req.detok.stopped:
                finish = "stop"
                break
            if len(req.output_ids) >= req.params.max_tokens:
                finish = "length"
                parts.append(req.detok.flush())
                break
        if finish:
            self._finish(req, finish)
        return RequestOutput(
            req.request_id,
            added,
            "".join(parts),
            finished=finish is not None,
            finish_reason=finish,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
        )

    def _append_verified(self, req: _Request, tokens: list[int], now: float) -> RequestOutput:
        """The tokens one verify forward gave a request; its acceptance is the number it kept."""
        plain = req.params.repetition_penalty != 1.0
        out = self._append(req, tokens, now)
        n = len(out.token_ids)
        out.accept_lens = [n]
        self.spec_verify_total += 1
        self.spec_emitted_tokens_total += n
        if not plain:
            self.spec_draft_tokens_total += self.draft_len
            self.spec_accepted_tokens_total += len(tokens) - 1
        return out

    def _finish(self, req: _Request, reason: str) -> None:
        self.running.remove(req)
        heapq.heappush(self._free, req.slot)
        req.slot = -2
        self._by_id.pop(req.request_id, None)
        self.finished_total[reason] += 1

    # ------------------------------------------------------------------ model calls
    def _kv_len(self, n: int) -> int:
        return min(-(-n // self.kv_block) * self.kv_block, self.max_model_len)

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int,
        return_hidden: bool = False,
        *,
        logits_at: torch.Tensor | None = None,
    ):
        """The one place the engine calls the model (Transformer.forward's contract)."""
        return self._runner(input_ids, positions, slots, kv_len, return_hidden, logits_at=logits_at)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(values, dtype=torch.int64), self.device)

    def _sample(
        self,
        rows: list[_Request | None],
        logits: torch.Tensor,
        slots: torch.Tensor,
        sb: SamplingBatch | None = None,
    ) -> torch.Tensor:
        if sb is None:
            sb = SamplingBatch.build([r.params if r else None for r in rows], self.vocab_size, self.device)
        gens = [r.generator if r else None for r in rows]
        seen = self._seen[slots] if sb.repetition_penalty is not None else None
        tokens = sample(logits, sb, gens, seen)
        if sb.repetition_penalty is not None:
            self._seen[slots, tokens] = True
        return tokens

    def _decode(self, reqs: list[_Request]) -> torch.Tensor:
        n = len(reqs)
        B = next(b for b in self.buckets if b >= n)
        pad = B - n
        ids = [r.output_ids[-1] for r in reqs] + [0] * pad
        pos = [r.num_tokens - 1 for r in reqs] + [0] * pad
        slots = [r.slot for r in reqs] + [self.scratch_slot] * pad
        kv_len = self._kv_len(max(pos) + 1)
        rows: list[_Request | None] = [*reqs, *([None] * pad)]
        key = tuple(r.request_id if r else None for r in rows)
        if self._decode_sb is None or self._decode_sb[0] != key:
            sb = SamplingBatch.build([r.params if r else None for r in rows], self.vocab_size, self.device)
            self._decode_sb = (key, sb)
        slots_t = self._tensor(slots)
        logits = self._forward(self._tensor(ids).view(B, 1), self._tensor(pos).view(B, 1), slots_t, kv_len)
        return self._sample(rows, logits[:, -1, :], slots_t, self._decode_sb[1])[:n]

    def _draft(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The one place the engine calls the drafter: hidden [B, H], tokens [B] -> drafts [B, k]."""
        if self.draft_graphs is not None:
            return self.draft_graphs(hidden, tokens)
        return self._draft_eager(hidden, tokens)

    def _draft_eager(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.drafter.draft(hidden, tokens, self.model.embed_tokens, self.draft_len)

    @torch.inference_mode()
    def use_draft_graphs(self, backend: str = "cuda") -> None:
        """Draft from graphs captured now for every decode batch bucket (largest first); "none": eagerly."""
        if self.drafter is None or backend == "none":
            self.draft_graphs = None
            return
        self.draft_graphs = GraphedFunction(self._draft_eager, backend=backend)
        for B in sorted(self.buckets, reverse=True):
            hidden = torch.zeros(
                B, self.model.config.hidden_size, dtype=self._hidden.dtype, device=self.device
            )
            self.draft_graphs(hidden, torch.zeros(B, dtype=torch.long, device=self.device))

    def _spec_decode(self, reqs: list[_Request]) -> torch.Tensor:
        """Draft k tokens per request, verify them in one forward, accept; -> [n, 1 + k + 1] int64 rows of
        (number of tokens emitted, the k + 1 tokens of which the first that many are emitted)."""
        n, k = len(reqs), self.draft_len
        B = next(b for b in self.buckets if b >= n)
        pad = B - n
        rows: list[_Request | None] = [*reqs, *([None] * pad)]
        key = tuple(r.request_id if r else None for r in rows)
        if self._spec_batch is None or self._spec_batch[0] != key:
            sp = SpecBatch([r.params if r else None for r in rows], self.vocab_size, k, self.device)
            self._spec_batch = (key, sp)
        sp = self._spec_batch[1]
        first = [r.num_tokens - 1 for r in reqs] + [0] * pad  # where g0, the last chosen token, goes
        pos = verify_positions(first, k + 1, self.max_model_len - 1)
        kv_len = self._kv_len(max(row[-1] for row in pos) + 1)
        slots_t = self._tensor([r.slot for r in reqs] + [self.scratch_slot] * pad)
        g0 = self._tensor([r.output_ids[-1] for r in reqs] + [0] * pad)
        drafts = self._draft(self._hidden[slots_t], g0)
        ids = torch.cat([g0[:, None], drafts], dim=1)
        pos_t = self._tensor([p for row in pos for p in row]).view(B, k + 1)
        if self.verify_rows:  # every (request, position) its own single-token row: see __init__
            logits, hidden = self._forward(
                ids.reshape(-1, 1), pos_t.reshape(-1, 1), slots_t.repeat_interleave(k + 1), kv_len, True
            )
            logits, hidden = logits.view(B, k + 1, -1), hidden.view(B, k + 1, -1)
        else:
            logits, hidden = self._forward(ids, pos_t, slots_t, kv_len, True)
        seen = self._seen[slots_t] if sp.plain_sb is not None and self._seen is not None else None
        tokens, n_emit = sp.verify(logits, drafts, [r.generator if r else None for r in rows], seen)
        if seen is not None:
            plain = self._tensor(sp.plain_rows)
            self._seen[slots_t[plain], tokens[plain, 0]] = True
        # the next draft conditions on the hidden state of the last accepted input position
        last = (n_emit - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])
        self._hidden[slots_t] = hidden.gather(1, last).squeeze(1).to(self._hidden.dtype)
        return torch.cat([n_emit[:, None], tokens], dim=1)[:n]

    def _prefill_groups(self, reqs: list[_Request]) -> list[list[_Request]]:
        """Short prompts are batched (padded to the longest, <= max_prefill_tokens in all); a prompt longer
        than prefill_chunk is prefilled alone, in chunks."""
        groups: list[list[_Request]] = []
        cur: list[_Request] = []
        for r in reqs:
            n = len(r.prompt_ids)
            if n > self.prefill_chunk:
                groups.append([r])
                continue
            longest = max([n] + [len(c.prompt_ids) for c in cur])
            if cur and (len(cur) + 1) * longest > self.max_prefill_tokens:
                groups.append(cur)
                cur = []
            cur.append(r)
        if cur:
            groups.append(cur)
        return groups

    def _prefill(self, group: list[_Request]) -> torch.Tensor:
        slots_t = self._tensor([r.slot for r in group])
        spec = self.drafter is not None  # keep each prompt's last hidden state for the first draft
        if len(group) == 1 and len(group[0].prompt_ids) > self.prefill_chunk:
            ids, C = group[0].prompt_ids, self.prefill_chunk
            for start in range(0, len(ids), C):
                chunk = ids[start : start + C]
                last = self._tensor([len(chunk) - 1]).view(1, 1)
                out = self._forward(
                    self._tensor(chunk).view(1, -1),
                    self._tensor(list(range(start, start + len(chunk)))).view(1, -1),
                    slots_t,
                    self._kv_len(start + len(chunk)),
                    spec,
                    logits_at=last,
                )
        else:
            T = max(len(r.prompt_ids) for r in group)
            # padding columns continue the positions: they write past the prompt in the request's own
            # slot, where each position is overwritten before any query can attend to it
            ids = [r.prompt_ids + [0] * (T - len(r.prompt_ids)) for r in group]
            flat_ids = [t for row in ids for t in row]
            pos = list(range(T)) * len(group)
            last = self._tensor([len(r.prompt_ids) - 1 for r in group]).view(-1, 1)
            out = self._forward(
                self._tensor(flat_ids).view(len(group), T),
                self._tensor(pos).view(len(group), T),
                slots_t,
                self._kv_len(T),
                spec,
                logits_at=last,
            )
        logits = out[0] if spec else out
        if spec:
            h = out[1].gather(1, last[..., None].expand(-1, -1, out[1].shape[-1])).squeeze(1)
            self._hidden[slots_t] = h.to(self._hidden.dtype)
        return self._sample(list(group), logits[:, -1, :], slots_t)

    # ------------------------------------------------------------------ offline use
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[RequestOutput]:
        """Run prompts to completion (continuously batched); one aggregated RequestOutput per prompt,
        in order: all token ids, the full text, finish_reason, usage and (speculative) accept_lens."""
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [f"offline-{self.requests_total + i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        acc = {rid: RequestOutput(rid, [], "") for rid in ids}
        pending = set(ids)
        while pending:
            for out in self.step():
                a = acc.get(out.request_id)
                if a is None:
                    continue
                a.token_ids += out.token_ids
                a.text += out.text
                a.accept_lens += out.accept_lens
                a.prompt_tokens, a.completion_tokens = out.prompt_tokens, out.completion_tokens
                if out.finished:
                    a.finished, a.finish_reason = True, out.finish_reason
                    pending.discard(out.request_id)
        return [acc[rid] for rid in ids]
