"""Prometheus text exposition (format 0.0.4) for `/metrics`, without a client library.

Gauges and token/request counters come from the engine's `stats()` (with a drafter also the speculative
decoding counters `mathforge_spec_decode_*`); the server adds latency histograms (time to first token,
end-to-end) and counters of HTTP errors by status code.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self, name: str, help_: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        with self._lock:
            cum = 0
            for le, c in zip(self.buckets, self.counts, strict=False):
                cum += c
                lines.append(f'{name}_bucket{{le="{_fmt(le)}"}} {cum}')
            lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
            lines.append(f"{name}_sum {_fmt(self.sum)}")
            lines.append(f"{name}_count {self.count}")
        return lines


def _fmt(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"


class ServerMetrics:
    """What the HTTP layer measures itself."""

    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.http_errors: Counter[int] = Counter()
        self.requests_started: Counter[str] = Counter()  # by endpoint

    def render(self, engine_stats: dict, model_name: str) -> str:
        s = engine_stats
        label = f'model_name="{_escape(model_name)}"'
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(x for x in (label, labels) if x)
                out.append(f"{name}{{{lab}}} {value}")

        metric(
            "mathforge_requests_running", "gauge", "Requests holding a KV-cache slot.", [("", s["running"])]
        )
        metric(
            "mathforge_requests_waiting", "gauge", "Requests queued for a free slot.", [("", s["waiting"])]
        )
        metric("mathforge_slots_free", "gauge", "Free KV-cache slots.", [("", s["free_slots"])])
        metric(
            "mathforge_slots_total",
            "gauge",
            "KV-cache slots (max concurrently running requests).",
            [("", s["max_slots"])],
        )
        metric(
            "mathforge_requests_running_peak",
            "gauge",
            "Most requests ever running at once.",
            [("", s["running_peak"])],
        )
        metric(
            "mathforge_max_model_len",
            "gauge",
            "Context length (prompt + output tokens).",
            [("", s["max_model_len"])],
        )
        metric(
            "mathforge_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            [("", s["prompt_tokens_total"])],
        )
        metric(
            "mathforge_generation_tokens_total",
            "counter",
            "Tokens generated.",
            [("", s["generation_tokens_total"])],
        )
        metric("mathforge_engine_steps_total", "counter", "Engine steps run.", [("", s["steps_total"])])
        metric(
            "mathforge_requests_finished_total",
            "counter",
            "Requests finished, by finish reason.",
            [(f'finish_reason="{r}"', n) for r, n in sorted(s["finished_total"].items())],
        )
        metric(
            "mathforge_engine_step_errors_total",
            "counter",
            "Engine steps that raised.",
            [("", s.get("step_errors", 0))],
        )
        metric(
            "mathforge_http_requests_total",
            "counter",
            "Generation requests received, by endpoint.",
            [(f'endpoint="{e}"', n) for e, n in sorted(self.requests_started.items())]
            or [('endpoint="none"', 0)],
        )
        metric(
            "mathforge_http_errors_total",
            "counter",
            "Error responses, by HTTP status.",
            [(f'status="{c}"', n) for c, n in sorted(self.http_errors.items())] or [('status="400"', 0)],
        )
        spec = s.get("speculative")
        if spec:
            verify = spec["verify_steps_total"]
            metric(
                "mathforge_spec_decode_draft_len",
                "gauge",
                "Tokens the drafter proposes per request and step (speculative decoding).",
                [("", spec["draft_len"])],
            )
            metric(
                "mathforge_spec_decode_verify_steps_total",
                "counter",
                "Verify forwards, counted per request (each emits 1 to draft_len + 1 tokens).",
                [("", verify)],
            )
            metric(
                "mathforge_spec_decode_draft_tokens_total",
                "counter",
                "Draft tokens proposed.",
                [("", spec["draft_tokens_total"])],
            )
            metric(
                "mathforge_spec_decode_accepted_tokens_total",
                "counter",
                "Draft tokens the target accepted.",
                [("", spec["accepted_tokens_total"])],
            )
            metric(
                "mathforge_spec_decode_emitted_tokens_total",
                "counter",
                "Tokens emitted by verify forwards (accepted drafts plus the target's own token).",
                [("", spec["emitted_tokens_total"])],
            )
            metric(
                "mathforge_spec_decode_accept_len_mean",
                "gauge",
                "Mean tokens emitted per verify forward since start (1 = no draft accepted).",
                [("", round(spec["emitted_tokens_total"] / verify, 6) if verify else 0.0)],
            )
        out += self.ttft.render(
            "mathforge_time_to_first_token_seconds", "Time from request arrival to its first generated token."
        )
        out += self.e2e.render(
            "mathforge_e2e_request_latency_seconds", "Time from request arrival to its last generated token."
        )
        return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
