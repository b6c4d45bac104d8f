"""CUDA-graph runner: decode (and speculative verify) forwards replayed from captured CUDA graphs.

At batch 1 a 14B decode step is ~400 kernel launches; launched one by one from Python the GPU idles
between them. A captured graph replays them back to back with no Python and no host synchronisation.

`CUDAGraphRunner(model, batch_sizes=..., token_counts=(1,))` has `Transformer.forward`'s signature and is
passed to `Engine(..., runner=...)`. A call whose batch size is in `batch_sizes` and whose tokens per row
are in `token_counts` (1 for decode, k+1 for a speculative verify) is served from a graph keyed on
(B, T, kv_len, return_hidden, logits_at shape); kv_len drops out of the key when the model's forward
does not depend on it (`Transformer.uses_kv_len`: the fast path's decode attention reads positions on
the device), so one graph per batch bucket serves every context length. Anything else (prefill) runs
eagerly. The first call of a new key runs eagerly (its result is returned: the warm-up that compiles
Triton kernels and checks them) and captures the graph, which later calls replay after copying their
inputs into the graph's static buffers.

Outputs are the graph's static tensors: valid until the next call with the same key (the engine consumes
them before that, in stream order). Graphs share one memory pool, captured largest batch first.
Why a manual graph and not torch.compile(mode="reduce-overhead"): the fused Triton kernels already do
what Inductor would fuse, the capture takes milliseconds instead of minutes of compilation on the 14B
shape, and the runner's keys are exactly the engine's shapes (see benchmarks/results for the comparison).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

log = logging.getLogger("mathforge.engine.graphs")

Key = tuple[int, int, int | None, bool, tuple[int, ...] | None]


class _CudaGraph:
    """torch.cuda.CUDAGraph behind capture(fn) -> outputs / replay()."""

    def __init__(self, pool):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], object]):
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()

    def pool_handle(self):
        return self.graph.pool()


class _EagerReplayGraph:
    """Stand-in for tests without a GPU: "replay" re-runs the captured function on the static buffers and
    writes into the captured outputs, so buffer plumbing is exercised exactly as with a CUDA graph."""

    def __init__(self, pool):
        self.fn: Callable[[], object] | None = None
        self.outputs = None

    def capture(self, fn):
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self) -> None:
        fresh = self.fn()
        for dst, src in zip(_flat(self.outputs), _flat(fresh), strict=True):
            dst.copy_(src)

    def pool_handle(self):
        return None


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


class _Captured:
    def __init__(self, graph, static: dict, outputs):
        self.graph = graph
        self.static = static
        self.outputs = outputs

    def replay(self, inputs: dict):
        """Copy the call's tensors into the static buffers (None: an input this graph does not take), replay."""
        for name, value in inputs.items():
            if value is not None:
                self.static[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.outputs


BACKENDS = ("cuda", "eager-replay", "none")


class _GraphPool:
    """Records graphs of one owner with its backend, all in one memory pool (the first graph's)."""

    def __init__(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be cuda, eager-replay or none, got {backend!r}")
        self.backend = backend
        self.handle = None

    def capture(self, fn: Callable[[], object], static: dict) -> _Captured:
        """`fn` reads its inputs from `static` (tensors cloned from a call that has just run eagerly)."""
        graph = (_CudaGraph if self.backend == "cuda" else _EagerReplayGraph)(self.handle)
        outputs = graph.capture(fn)
        if self.handle is None:
            self.handle = graph.pool_handle()
        return _Captured(graph, static, outputs)


class CUDAGraphRunner:
    """Replays captured graphs for decode/verify shapes; eager for everything else."""

    def __init__(
        self,
        model,
        *,
        batch_sizes: Iterable[int],
        token_counts: Iterable[int] = (1,),
        max_graphs: int = 64,
        backend: str | None = None,
    ):
        """backend: "cuda" (default on a CUDA model), "eager-replay" (tests), or "none" (always eager)."""
        self.model = model
        self.batch_sizes = set(batch_sizes)
        self.token_counts = set(token_counts)
        self.max_graphs = max_graphs
        if backend is None:
            backend = "cuda" if model.device.type == "cuda" else "none"
        self._pool = _GraphPool(backend)
        if backend == "cuda" and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        self.backend = backend
        self.graphs: dict[Key, _Captured] = {}
        self._kv_dependent: dict[int, bool] = {}
        self.replays = 0
        self.eager_calls = 0

    # ---------------------------------------------------------------------------------------- keys
    def _kv_key(self, T: int, kv_len: int) -> int | None:
        dep = self._kv_dependent.get(T)
        if dep is None:
            dep = bool(self.model.uses_kv_len(T))
        return kv_len if dep else None

    def key(self, input_ids, kv_len: int, return_hidden: bool, logits_at) -> Key:
        B, T = input_ids.shape
        la = None if logits_at is None else tuple(logits_at.shape)
        return (B, T, self._kv_key(T, kv_len), bool(return_hidden), la)

    def captures(self, B: int, T: int) -> bool:
        """Whether calls of this shape are served from graphs."""
        return self.backend != "none" and B in self.batch_sizes and T in self.token_counts

    # -------------------------------------------------------------------------------------- calling
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int,
        return_hidden: bool = False,
        *,
        logits_at: torch.Tensor | None = None,
    ):
        B, T = input_ids.shape
        if not self.captures(B, T):
            self.eager_calls += 1
            return self.model(input_ids, positions, slots, kv_len, return_hidden, logits_at=logits_at)
        g = self.graphs.get(self.key(input_ids, kv_len, return_hidden, logits_at))
        if g is None:
            self.eager_calls += 1
            out = self.model(input_ids, positions, slots, kv_len, return_hidden, logits_at=logits_at)
            if len(self.graphs) < self.max_graphs:
                self._capture(input_ids, positions, slots, kv_len, return_hidden, logits_at)
            elif len(self.graphs) == self.max_graphs:
                log.warning("CUDA graph limit (%d) reached: new shapes run eagerly", self.max_graphs)
            return out
        self.replays += 1
        return g.replay(
            {"input_ids": input_ids, "positions": positions, "slots": slots, "logits_at": logits_at}
        )

    def _capture(self, input_ids, positions, slots, kv_len, return_hidden, logits_at) -> None:
        """Record a graph for this call's key (after an eager run of the same call warmed everything up)."""
        T = input_ids.shape[1]
        # decided after the warm-up: kernel checks may have switched the fast attention off
        self._kv_dependent[T] = bool(self.model.uses_kv_len(T))
        key = self.key(input_ids, kv_len, return_hidden, logits_at)
        static = {
            "input_ids": input_ids.clone(),
            "positions": positions.clone(),
            "slots": slots.clone(),
            "logits_at": None if logits_at is None else logits_at.clone(),
        }

        def fn():
            return self.model(
                static["input_ids"],
                static["positions"],
                static["slots"],
                kv_len,
                return_hidden,
                logits_at=static["logits_at"],
            )

        self.graphs[key] = self._pool.capture(fn, static)
        log.debug("captured %s graph for key %s", self.backend, key)

    @torch.inference_mode()
    def warmup(
        self,
        batch_sizes: Sequence[int] | None = None,
        token_counts: Sequence[int] | None = None,
        *,
        slot: int | None = None,
        kv_len: int | None = None,
        return_hidden: bool = False,
    ) -> int:
        """Capture the decode graphs now (largest batch first, so smaller ones reuse its pool memory).

        The warm-up forwards write position 0 of `slot` (default: the cache's last slot, the engine's
        scratch slot for padding rows). Returns the number of graphs captured. Only kv_len-free shapes
        are captured ahead (a kv_len-dependent one would need one graph per context bucket)."""
        if self.backend == "none":
            return 0
        dev = self.model.device
        slot = self.model.max_slots - 1 if slot is None else slot
        if slot < 0:
            raise RuntimeError("set up the model's KV cache before warming up graphs")
        kv_len = kv_len or min(128, self.model.max_seq_len)
        n = 0
        for T in sorted(token_counts or self.token_counts, reverse=True):
            for B in sorted(batch_sizes or self.batch_sizes, reverse=True):
                ids = torch.zeros((B, T), dtype=torch.long, device=dev)
                pos = (
                    torch.arange(T, device=dev)
                    .clamp_max(self.model.max_seq_len - 1)
                    .expand(B, T)
                    .contiguous()
                )
                slots = torch.full((B,), slot, dtype=torch.long, device=dev)
                if self.key(ids, kv_len, return_hidden, None) in self.graphs:
                    continue
                self.model(ids, pos, slots, kv_len, return_hidden)  # warm-up: compiles and checks kernels
                if self.model.uses_kv_len(T):
                    continue
                self._capture(ids, pos, slots, kv_len, return_hidden, None)
                n += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return n

    def stats(self) -> dict:
        return {
            "backend": self.backend,
            "graphs": len(self.graphs),
            "replays": self.replays,
            "eager_calls": self.eager_calls,
            "batch_sizes": sorted(self.batch_sizes),
            "token_counts": sorted(self.token_counts),
        }


class GraphedFunction:
    """`fn(*tensors)` replayed from a graph captured per input shapes, as `CUDAGraphRunner` does for the
    model's forward: for the ReDrafter's drafting, k greedy steps of ~12 small kernels each (embedding,
    RNN, ResBlocks, lm_head, argmax), which launched one by one from Python cost about as much as the
    verify forward itself at batch 1.

    The first call of new shapes runs eagerly and captures; later calls copy their inputs into the static
    buffers and replay. Outputs are static tensors, valid until the next call with the same shapes."""

    def __init__(self, fn: Callable[..., object], *, backend: str = "cuda", max_graphs: int = 16):
        self._pool = _GraphPool(backend)
        self.fn, self.backend, self.max_graphs = fn, backend, max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.replays = self.eager_calls = 0

    def __call__(self, *args: torch.Tensor):
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        g = self.graphs.get(key)
        if g is None:
            self.eager_calls += 1
            out = self.fn(*args)  # the warm-up run before a capture
            if self.backend != "none" and len(self.graphs) < self.max_graphs:
                static = dict(enumerate(a.clone() for a in args))
                self.graphs[key] = self._pool.capture(lambda: self.fn(*static.values()), static)
            return out
        self.replays += 1
        return g.replay(dict(enumerate(args)))
