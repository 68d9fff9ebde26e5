"""The offline API: `LLM(model_path, ...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

from braid.engine.config import EngineConfig
from braid.engine.core import EngineCore
from braid.engine.sampling import SamplingParams
from braid.engine.scheduler import RequestRejected


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    """Generated token ids only."""
    text: str = ""
    finish_reason: str | None = None
    """stop, length, abort or error."""
    error: str | None = None
    """Why the request was rejected, when it was."""
    logprobs: list | None = None
    """One TokenLogprob (braid.engine.logprobs) per generated token, when SamplingParams.logprobs was set."""
    prompt_logprobs: list | None = None
    """One TokenLogprob per prompt token after the first, when SamplingParams.prompt_logprobs was set."""


class LLM:
    def __init__(self, model_path: str, **settings):
        """`settings` are EngineConfig's fields by name, flat (`tensor_parallel_size=2,
        block_size=16, dtype="bfloat16"`): see braid.engine.config."""
        cfg = EngineConfig.build(model_path, **settings)
        self.engine = EngineCore(cfg)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def generate(
        self,
        prompts: Seq[str] | Seq[list[int]] | str,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        outputs: list[RequestOutput] = []
        live: dict[str, RequestOutput] = {}
        for prompt, p in zip(prompts, params):
            try:
                seq = self.engine.add_request(prompt, p)
            except RequestRejected as e:
                ids = prompt if isinstance(prompt, list) else []
                outputs.append(RequestOutput("", list(ids), finish_reason="error", error=str(e)))
                continue
            out = RequestOutput(seq.request_id, seq.prompt_token_ids)
            if p.logprobs is not None:
                out.logprobs = []
            outputs.append(out)
            live[seq.request_id] = out
        try:
            while self.engine.has_unfinished():
                for ev in self.engine.step():
                    out = live[ev.request_id]
                    if ev.token_id is not None:  # an error event ends a request without a token
                        out.token_ids.append(ev.token_id)
                        if out.logprobs is not None:
                            out.logprobs.append(ev.logprobs)
                    if ev.prompt_logprobs is not None:
                        out.prompt_logprobs = ev.prompt_logprobs
                    if ev.finished:
                        out.finish_reason = ev.finish_reason
                        out.error = ev.error or out.error
        except BaseException:
            for rid in live:
                self.engine.abort(rid)
            raise
        if self.engine.tokenizer is not None:
            for out in live.values():
                out.text = self.engine.tokenizer.decode(out.token_ids)
        return outputs

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
