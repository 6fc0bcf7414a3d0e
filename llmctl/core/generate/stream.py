"""Turning token ids into text as they arrive.

- `Detokenizer`: incremental decoding that only ever emits whole characters (a byte-level
  token that ends inside a UTF-8 sequence decodes to U+FFFD and is held back until the
  character completes) and keeps the spacing a token gets from its left context.
- `StopMatcher`: stop strings found across token boundaries; text that could still be the
  start of a stop string is held back until it is resolved.
- `Sequence`: one prompt's output — tokens, text, finish reason, EOS / length / stop rules —
  which every search strategy feeds token by token.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first generated token


class Detokenizer:
    """Incremental decoding: `push(id)` returns the newly completed text (maybe '')."""

    def __init__(self, decode: Callable[[list[int]], str], context: list[int] = ()):
        self.decode = decode
        self.ids = list(context)[-CONTEXT_TOKENS:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT) and text.startswith(prefix):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else ""


class StopMatcher:
    """`push(text) -> (safe_text, stopped)`: text before a stop string is released only once
    it can no longer be the beginning of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = self._held_suffix()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def _held_suffix(self) -> int:
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Sequence:
    """One prompt's generation: accepts tokens until EOS, a stop string or the length limit."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        eos_ids: list[int] = (),
        stops: list[str] = (),
        on_text: Callable[[str], None] | None = None,
    ):
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.detok = Detokenizer(decode, prompt_ids)
        self.stop = StopMatcher(list(stops))
        self.on_text = on_text
        self.pieces: list[str] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token: int) -> bool:
        """Add a generated token; returns True once the sequence is finished."""
        if self.done:
            return True
        self.tokens.append(token)
        if token in self.eos_ids:
            return self._finish("eos")
        text, stopped = self.stop.push(self.detok.push(token))
        self._emit(text)
        if stopped:
            self.finish_reason = "stop"
            return True
        if len(self.tokens) >= self.max_new_tokens:
            return self._finish("length")
        return False

    def _finish(self, reason: str) -> bool:
        text, stopped = self.stop.push(self.detok.flush())
        self._emit(text if stopped else text + self.stop.flush())
        self.finish_reason = "stop" if stopped else reason
        return True

    def close(self) -> None:
        """Finish a sequence whose search ended without a decision (reason `length`)."""
        if not self.done:
            self._finish("length")

    def _emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            if self.on_text is not None:
                self.on_text(text)
