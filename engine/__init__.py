"""The engine shared by prefill and decode nodes: models, paged KV cache,
block manager, scheduler, sampler, the multi-rank executor and the KV
connector. It knows nothing of gRPC, protobuf (except the KV layout descriptor
it gets through braid.kv_transfer) or discovery.

A request's life in the engine: EngineCore.add_request (or, on a decode node,
reserve for KV pushed by a prefill node) -> the scheduler batches it -> the
executor runs the step on every rank -> the sampler picks tokens on rank 0 ->
TokenEvents go back to the caller (the offline LLM or braid.node).

    from braid.engine import LLM, SamplingParams
    llm = LLM(model_path, tensor_parallel_size=2, decode_context_parallel_size=2)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))

The package import is lazy: `import braid.engine.config` does not load torch.
"""
from __future__ import annotations

_EXPORTS = {
    "LLM": "braid.engine.llm",
    "RequestOutput": "braid.engine.llm",
    "SamplingParams": "braid.engine.sampling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'braid.engine' has no attribute {name!r}")
