"""Stop strings (SamplingParams.stop), applied by the router while it streams a
request's output to the client (braid.router.orchestrator `_stream`, for gRPC
and the HTTP API alike).

In a request's life: each chunk from the decode node is detokenized; the text
delta goes through `StopStrings.feed`, which matches the stop strings on the
decoded text (never on token ids, so a stop string spanning several tokens, or
part of one token, is found). Text that could still be the start of a stop
string is held back until it either completes a match or can no longer match;
on a match the stop string and everything after it are dropped, and the
orchestrator ends the request (finish_reason STOP) and aborts it on its nodes.
"""
from __future__ import annotations

MAX_STOP_STRINGS = 16
"""More stop strings than this are refused (OpenAI allows 4; vLLM any number)."""
MAX_STOP_CHARS = 256
"""A longer stop string is refused: every held-back tail is compared with each one."""


def check_stop(stops) -> None:
    """ValueError naming the problem when the stop strings cannot be served."""
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for s in stops:
        if not s:
            raise ValueError("stop: stop strings must be non-empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop: a stop string is longer than {MAX_STOP_CHARS} characters")


class StopStrings:
    """Matches stop strings on a stream of text deltas.

    `feed(delta)` returns (text that may go to the client now, matched). Text
    already returned never contains a stop string nor ends with the start of
    one, so a match always begins in the held-back tail or the new delta.
    """

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.emitted_chars = 0
        """Characters returned so far (the match position is counted from here)."""
        self.match_end = -1
        """After a match: its end in the whole output text, stop string included."""

    def feed(self, delta: str) -> tuple[str, bool]:
        buf = self.held + delta
        first, end = -1, -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first < 0 or i < first or (i == first and i + len(s) < end)):
                first, end = i, i + len(s)
        if first >= 0:
            self.held = ""
            self.match_end = self.emitted_chars + end
            self.emitted_chars += first
            return buf[:first], True
        keep = self._partial(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        out = buf[: len(buf) - keep]
        self.emitted_chars += len(out)
        return out, False

    def flush(self) -> str:
        """The held-back text, at the end of the output (no stop string can complete now)."""
        out, self.held = self.held, ""
        self.emitted_chars += len(out)
        return out

    def _partial(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


def ids_through(decode, before: list[int], chunk: list[int], text_end: int) -> int:
    """How many ids of `chunk` it takes, after `before`, for the decoded text to reach
    `text_end` characters (the end of a stop string match): the ids past the match are
    dropped. The token that completes the match is kept (as vLLM does); at least one."""
    for j in range(1, len(chunk)):
        if len(decode(before + chunk[:j])) >= text_end:
            return j
    return len(chunk)
