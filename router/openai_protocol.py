"""OpenAI request bodies -> Generate requests (the HTTP API's input side).

In a request's life: braid.router.http_api reads the JSON body of
POST /v1/completions or /v1/chat/completions and hands it to `parse_completion`
or `parse_chat`. They check every field's type and range (ApiError 400 naming
the field), refuse what braid cannot do (penalties, logit_bias, tools, suffix)
instead of silently ignoring it, and return an `OpenAIRequest`: one
`router_pb2.GenerateRequest` per output choice (`n` choices per prompt, seed+i
for choice i when a seed is given), each then run by the Orchestrator exactly
as a gRPC Generate call would be. Range rules the engine owns (temperature,
top_p, max_tokens) are checked again by the orchestrator with the gRPC rules.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from braid.proto import common_pb2, router_pb2

MAX_LOGPROBS = 20
"""Most alternatives per position (vLLM's default max_logprobs)."""
MAX_N = 64
"""Most choices per prompt (each is an orchestrator request)."""
MAX_CHOICES = 256
"""Most choices of one request over all its prompts: one HTTP request never floods admission."""
DEFAULT_MAX_TOKENS = 16
"""Completions' max_tokens when the request leaves it out (OpenAI and vLLM)."""
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class ApiError(Exception):
    """Ends an HTTP request with an OpenAI error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One orchestrator request: one choice of one prompt."""

    index: int
    """The choice's index in the response."""
    prompt_index: int
    request: router_pb2.GenerateRequest
    echo_text: str = ""
    """Completions with echo: the prompt text put before the output."""


@dataclass
class OpenAIRequest:
    kind: str
    """"completion" or "chat"."""
    model: str | None
    stream: bool
    include_usage: bool
    jobs: list[Job] = field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None
    """Alternatives per position when logprobs were asked for, else None."""
    drop_output: bool = False
    """echo with max_tokens 0: one token is generated (the nodes need one) and none returned."""
    context_budget: bool = False
    """Chat without max_tokens: the output may fill the context (see http_api)."""
    id: str = ""


# -- field readers -------------------------------------------------------------


_JSON_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _json_name(value) -> str:
    return "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)


def _get(body: dict, name: str, kinds: tuple, default=None):
    """body[name] when of one of `kinds` (null counts as absent), else ApiError naming it."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):  # true is no number here
        want = " or ".join(dict.fromkeys("number" if k in (int, float) and float in kinds else _JSON_NAMES[k]
                                         for k in kinds))
        raise ApiError(400, f"{name}: expected {want}, got {_json_name(value)}", name)
    return value


def _int(body: dict, name: str, lo: int, hi: int, default=None):
    value = _get(body, name, (int,), default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"{name}: must be in [{lo}, {hi}], got {value}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    return float(_get(body, name, (int, float), default))


def _stop(body: dict) -> list[str]:
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop: expected a string or a list of strings", "stop")
    return stop


def _ids(value, name: str) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= UINT32_MAX for t in value):
        raise ApiError(400, f"{name}: expected token ids (integers >= 0)", name)
    return list(value)


_NEUTRAL = {  # the values of unsupported fields that ask for nothing
    "suffix": ("",), "best_of": (1,), "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,),
    "tools": ([],), "functions": ([],), "response_format": ({"type": "text"},), "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"), "repetition_penalty": (1,),
}


def _refuse_unsupported(body: dict, names: tuple[str, ...]) -> None:
    """Fields braid cannot honour are refused, never silently ignored."""
    for name in names:
        value = body.get(name)
        if value is not None and value not in _NEUTRAL[name]:
            raise ApiError(400, f"{name}: not supported by braid", name)


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    include = _get(options, "include_usage", (bool,), False) if options else False
    if options and not stream:
        raise ApiError(400, "stream_options: only allowed with stream=true", "stream_options")
    return stream, include


def _sampling(body: dict, max_tokens: int, stop: list[str], logprobs: int | None) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_k=_int(body, "top_k", -(2**31), 2**31 - 1, 0),
        top_p=_number(body, "top_p", 1.0),
        stop_token_ids=_ids(_get(body, "stop_token_ids", (list,), []), "stop_token_ids"),
        ignore_eos=_get(body, "ignore_eos", (bool,), False),
        stop=stop,
    )
    if logprobs is not None:
        sp.logprobs = logprobs
    # braid's extension: speculative decoding on the decode node (unset: the node's setting)
    k = _int(body, "num_speculative_tokens", 0, UINT32_MAX)
    if k is not None:
        sp.num_speculative_tokens = k
    method = _get(body, "speculative_method", (str,), None)
    if method is not None:
        sp.speculative_method = method
    return sp


def _fan_out(out: OpenAIRequest, body: dict, prompts: list, sp: common_pb2.SamplingParams, set_prompt) -> None:
    """n jobs per prompt; choice i of a seeded request samples with seed + i."""
    n = _int(body, "n", 1, MAX_N, 1)
    seed = _int(body, "seed", -(2**63), UINT64_MAX)
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} is over {MAX_CHOICES} choices in one request",
                       "prompt" if n == 1 else "n")
    for p, prompt in enumerate(prompts):
        for i in range(n):
            req = router_pb2.GenerateRequest(request_id=f"{out.id}-{p * n + i}")
            req.sampling.CopyFrom(sp)
            if seed is not None:
                req.sampling.seed = (seed + i) % 2**64  # negative seeds wrap: the wire field is unsigned
            set_prompt(req, prompt)
            out.jobs.append(Job(index=p * n + i, prompt_index=p, request=req))


# -- completions ---------------------------------------------------------------


def _prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [_ids(prompt, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [_ids(p, "prompt") for p in prompt]
    else:
        raise ApiError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of "
                            "token id lists", "prompt")
    if any(len(p) == 0 for p in prompts):
        raise ApiError(400, "prompt: empty", "prompt")
    return prompts


def parse_completion(body: dict, decode_ids) -> OpenAIRequest:
    """POST /v1/completions; `decode_ids(ids) -> str` gives echo's text for id prompts."""
    # vLLM's extension repetition_penalty: `vllm bench serve` sends the neutral 1.0 with every request
    _refuse_unsupported(body, ("suffix", "logit_bias", "presence_penalty", "frequency_penalty", "best_of",
                               "repetition_penalty"))
    stream, include = _stream_options(body)
    out = OpenAIRequest("completion", _get(body, "model", (str,)), stream, include, id=f"cmpl-{uuid.uuid4().hex}")
    prompts = _prompts(body)
    out.echo = _get(body, "echo", (bool,), False)
    out.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    max_tokens = _int(body, "max_tokens", 0, UINT32_MAX, DEFAULT_MAX_TOKENS)
    if max_tokens == 0:
        if not out.echo:
            raise ApiError(400, "max_tokens: must be >= 1 (0 only with echo)", "max_tokens")
        out.drop_output, max_tokens = True, 1
    sp = _sampling(body, max_tokens, _stop(body), out.logprobs)
    if out.echo and out.logprobs is not None:
        sp.prompt_logprobs = out.logprobs

    def set_prompt(req, prompt):
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)

    _fan_out(out, body, prompts, sp, set_prompt)
    if out.echo:
        for job in out.jobs:
            prompt = prompts[job.prompt_index]
            job.echo_text = prompt if isinstance(prompt, str) else decode_ids(prompt)
    return out


# -- chat ----------------------------------------------------------------------


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}]: only text parts
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content: expected a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> router_pb2.Chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", "messages")
    chat = router_pb2.Chat()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(400, f"messages[{i}]: expected an object with a string role", f"messages[{i}]")
        chat.messages.add(role=m["role"], content=_content(m, i))
    return chat


def parse_chat(body: dict, default_max_tokens: int) -> OpenAIRequest:
    """POST /v1/chat/completions. Without max_tokens/max_completion_tokens the output may
    fill the context: the nodes get `default_max_tokens` (the smallest decode node's
    max_model_len) and http_api cuts the output at that minus the prompt's length."""
    _refuse_unsupported(body, ("tools", "functions", "response_format", "logit_bias", "presence_penalty",
                               "frequency_penalty", "tool_choice", "function_call", "repetition_penalty"))
    stream, include = _stream_options(body)
    out = OpenAIRequest("chat", _get(body, "model", (str,)), stream, include, id=f"chatcmpl-{uuid.uuid4().hex}")
    chat = _messages(body)
    max_tokens = _int(body, "max_completion_tokens", 1, UINT32_MAX)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, UINT32_MAX)
    if max_tokens is None:
        out.context_budget, max_tokens = True, default_max_tokens
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if _get(body, "logprobs", (bool,), False):
        out.logprobs = top or 0
    elif top is not None:
        raise ApiError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
    sp = _sampling(body, max_tokens, _stop(body), out.logprobs)
    _fan_out(out, body, [chat], sp, lambda req, c: req.chat.CopyFrom(c))
    return out
