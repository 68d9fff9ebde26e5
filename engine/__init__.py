"""The engine shared by prefill and decode nodes: models, paged KV cache,
scheduler, sampler, and the multi-rank executor.

    from braid.engine import LLM, SamplingParams
    llm = LLM(model_path, tensor_parallel_size=2, decode_context_parallel_size=2)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
"""
from braid.engine.llm import LLM, RequestOutput
from braid.engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
