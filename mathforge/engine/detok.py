"""Incremental detokenization with stop strings (OpenAI semantics: the stop text is not returned).

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for
tokenizers that drop a word's leading space when decoded alone, so, as vLLM does, each new token is
decoded inside a small window of the preceding tokens (starting with the prompt's last few) and only
the text the window gained is emitted; a trailing U+FFFD (an incomplete UTF-8 sequence) waits for the
next token.

Stop strings are searched across token boundaries. While streaming, the longest tail of the text that
could still grow into a stop string is held back, so text that is handed out is never taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

# prompt tokens kept as left context for the first decoded output tokens
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # the output text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found
        self.stop_str: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one output token; return the text that can be handed out now (maybe "").

        After a stop string is found `stopped` is True, the text is cut before it and further tokens
        are ignored.
        """
        if self.stopped:
            return ""
        self.tokens.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the request: hand out whatever was held back (an incomplete UTF-8 sequence at
        the very end comes out as U+FFFD, as a full decode would show it)."""
        if self.stopped:
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset < len(self.tokens):
            prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            new_text = self._decode(self.tokens[self.prefix_offset :])
            if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
                delta = new_text[len(prefix_text) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
                search_from = max(0, len(self.text) - self.max_stop + 1)
                self.text += delta
                if self.stop:
                    hit = self._find_stop(search_from)
                    if hit is not None:
                        self.text = self.text[:hit]
                        self.stopped = True
                        return self._release(final=True)
        return self._release(final=final)

    def _find_stop(self, start: int) -> int | None:
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best):
                best, self.stop_str = i, s
        return best

    def _holdback(self) -> int:
        """Length of the longest tail of the unreleased text that is a proper prefix of a stop string."""
        pending = len(self.text) - self.emitted
        for k in range(min(self.max_stop - 1, pending), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _release(self, final: bool) -> str:
        end = len(self.text) if final or not self.stop else len(self.text) - self._holdback()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
