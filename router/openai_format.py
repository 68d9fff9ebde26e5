"""Generate responses -> OpenAI response bodies (the HTTP API's output side).

In a request's life: braid.router.http_api feeds each GenerateResponse of a
choice to its `Choice` (`add`), which turns it into the text and logprob entries
the client sees: echo's prompt text (and prompt logprobs) before the first
chunk, nothing at all for echo with max_tokens 0, the output cut at the context
budget of a chat request without max_tokens. The builders below then shape
whole responses (`completion_body`, `chat_body`) or SSE chunks
(`completion_chunk`, `chat_chunk`, `usage_chunk`) from them.
"""
from __future__ import annotations

import time

from braid.proto import common_pb2
from braid.router.openai_protocol import Job, OpenAIRequest

FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's bytes_to_unicode) -> the bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


BYTE_DECODER = _byte_decoder()


class TokenText:
    """Token id -> its text and bytes, as the logprobs show them (cached: ids recur).

    The text is the token decoded alone; where that is not whole UTF-8 (part of a
    multi-byte character, which decodes to U+FFFD) or is empty (a special token), it
    is the vocabulary's own token string, so that two such tokens never share a key
    of a completions top_logprobs dict. The bytes are the token's true bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._inner = getattr(tokenizer, "_tok", None)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def bytes(self, token_id: int) -> bytes:
        return self.get(token_id)[1]

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._make(token_id)
            if len(self._cache) < 65536:
                self._cache[token_id] = hit
        return hit

    def _make(self, token_id: int) -> tuple[str, bytes]:
        if self.tokenizer is None:
            s = f"token_id:{token_id}"
            return s, s.encode()
        s = self.tokenizer.decode([token_id])
        raw = (self._inner.id_to_token(token_id) if self._inner is not None else None) or ""
        if s and "\ufffd" not in s or not raw:
            return s, s.encode()
        # part of a character, or a special token: its bytes from the vocabulary's string
        if raw.startswith("<0x") and raw.endswith(">") and len(raw) == 6:  # SentencePiece byte fallback
            data = bytes([int(raw[3:5], 16)])
        elif all(c in BYTE_DECODER for c in raw):  # byte-level BPE stand-ins
            data = bytes(BYTE_DECODER[c] for c in raw)
        else:
            data = raw.encode()
        return raw, data


class Choice:
    """One choice's output as the client sees it, built chunk by chunk."""

    def __init__(self, job: Job, req: OpenAIRequest, tokenizer, max_model_len: int):
        self.job, self.req, self.tokenizer = job, req, tokenizer
        self.index = job.index
        self.text: list[str] = []
        self.ids: list[int] = []
        self.entries: list = []
        """Logprob entries (token_id, logprob or None, top alternatives or None)."""
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        """Prompt tokens the nodes took from a prefix cache (the last chunk says)."""
        self.started = False
        self.max_model_len = max_model_len
        self.budget: int | None = None
        """Chat without max_tokens: output tokens allowed (context left after the prompt)."""

    def add(self, msg) -> tuple[str, list, bool]:
        """(new text, new logprob entries, cut): `cut` when the context budget ended the
        output here (the request must be cancelled on its nodes)."""
        text, entries = "", []
        if msg.finished:
            self.cached_tokens = msg.cached_prompt_tokens
        if not self.started:
            self.started = True
            self.prompt_tokens = msg.prompt_tokens
            text, entries = self._echo(msg)
            if self.req.context_budget and self.max_model_len > 0:
                self.budget = max(1, self.max_model_len - msg.prompt_tokens)
        if self.req.drop_output:
            if msg.finished:
                self.finish = "length"
            self.text.append(text)
            return text, entries, False
        ids, lps, out_text, cut = list(msg.token_ids), list(msg.logprobs), msg.text, False
        over = len(self.ids) + len(ids) - self.budget if self.budget is not None else -1
        if over > 0 or (over == 0 and not msg.finished):  # the context is full: cut here, stop the nodes
            keep = self.budget - len(self.ids)
            ids, lps, cut = ids[:keep], lps[:keep], True
            out_text = self.tokenizer.decode(self.ids + ids)[len(self._output_text()):] if self.tokenizer else ""
        self.ids += ids
        entries += [(lp.token_id, lp.logprob, list(lp.top)) for lp in lps]
        text += out_text
        self.text.append(text)
        self.entries += entries
        if cut:
            self.finish = "length"
        elif msg.finished:
            self.finish = FINISH.get(msg.finish_reason, "stop")
        return text, entries, cut

    def _output_text(self) -> str:
        full = "".join(self.text)
        return full[len(self.job.echo_text):] if self.req.echo else full

    def _echo(self, msg) -> tuple[str, list]:
        if not self.req.echo:
            return "", []
        entries = []
        if self.req.logprobs is not None and msg.prompt_token_ids:
            entries = [(msg.prompt_token_ids[0], None, None)]
            entries += [(lp.token_id, lp.logprob, list(lp.top)) for lp in msg.prompt_logprobs]
            self.entries += entries
        return self.job.echo_text, entries


# -- logprobs ------------------------------------------------------------------


def completion_logprobs(tt: TokenText, entries: list, offset: int) -> dict:
    """The completions `logprobs` object; text offsets count from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, logprob, top in entries:
        s = tt(token_id)
        out["tokens"].append(s)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if top is None else {tt(t.token_id): t.logprob for t in top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def chat_logprobs(tt: TokenText, entries: list) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        s, data = tt.get(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(data)}

    return {"content": [
        dict(one(token_id, logprob), top_logprobs=[one(t.token_id, t.logprob) for t in top or ()])
        for token_id, logprob, top in entries
    ]}


# -- bodies --------------------------------------------------------------------


def usage(choices: list[Choice]) -> dict:
    """Prompt tokens once per prompt; completion tokens of every choice; cached prompt
    tokens (`prompt_tokens_details.cached_tokens`, as OpenAI reports them) once per
    prompt: the fewest any of its choices found cached (the prompt as computed once)."""
    prompts = {c.job.prompt_index: c.prompt_tokens for c in choices}
    cached: dict[int, int] = {}
    for c in choices:
        cached[c.job.prompt_index] = min(cached.get(c.job.prompt_index, c.cached_tokens), c.cached_tokens)
    prompt = sum(prompts.values())
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}


def _envelope(req: OpenAIRequest, obj: str, model: str, choices: list, usage_: dict | None) -> dict:
    return {"id": req.id, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage_}


def completion_body(req: OpenAIRequest, model: str, choices: list[Choice], tt: TokenText) -> dict:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        lp = completion_logprobs(tt, c.entries, 0) if req.logprobs is not None else None
        out.append({"index": c.index, "text": "".join(c.text), "logprobs": lp, "finish_reason": c.finish})
    return _envelope(req, "text_completion", model, out, usage(choices))


def chat_body(req: OpenAIRequest, model: str, choices: list[Choice], tt: TokenText) -> dict:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        out.append({
            "index": c.index,
            "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": chat_logprobs(tt, c.entries) if req.logprobs is not None else None,
            "finish_reason": c.finish,
        })
    return _envelope(req, "chat.completion", model, out, usage(choices))


def completion_chunk(req: OpenAIRequest, model: str, c: Choice, text: str, entries: list, tt: TokenText,
                     offset: int) -> dict:
    lp = completion_logprobs(tt, entries, offset) if req.logprobs is not None else None
    choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish}
    return _envelope(req, "text_completion", model, [choice], None)


def chat_chunk(req: OpenAIRequest, model: str, c: Choice, delta: dict, entries: list, tt: TokenText,
               finish: str | None) -> dict:
    lp = chat_logprobs(tt, entries) if req.logprobs is not None and entries else None
    choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
    return _envelope(req, "chat.completion.chunk", model, [choice], None)


def usage_chunk(req: OpenAIRequest, model: str, choices: list[Choice]) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return _envelope(req, obj, model, [], usage(choices))
