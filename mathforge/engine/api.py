"""The engine's public contract: what the server, the benchmark and the solver rely on.

Kept in one small module so the serving side and the model side can evolve independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class EngineInputError(ValueError):
    """A request the engine cannot run (prompt too long, bad sampling value): the caller's fault."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass
class RequestOutput:
    """One streamed increment of a request: the tokens and text added since the last one."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # speculative decoding: tokens accepted per target forward (absent without a drafter)
    accept_lens: list[int] = field(default_factory=list)
