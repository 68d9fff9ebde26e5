"""A tiny checkpoint on which n-gram speculation both hits and misses.

Random checkpoints produce near-random text: prompt lookup rarely proposes a
token the model agrees with, so acceptance would go untested. `loop_checkpoint`
takes the session's random "kv1" checkpoint (one KV head: tp 2 with dcp 2 can
shard it), shrinks what the layers add to the residual stream (o_proj, down_proj
x 0.06) and sets the LM head to the embeddings of a permutation made of 7-cycles:
token t is then most likely followed by the next token of its cycle, so greedy
text loops with period 7 (n-gram drafts are accepted) while attention still moves
the argmax now and then (drafts are rejected; the outputs still depend on the
whole context, so a wrong cache or mask changes them). Transformers loads it as
it is: it is the reference for every output.
"""
from __future__ import annotations

import os

import torch

from conftest import VOCAB, save_tokenizer

CYCLE = 7
LAYER_SCALE = 0.06


def cycles(n: int, length: int) -> list[int]:
    """A permutation of range(n) made of consecutive cycles of `length` (the last may be shorter)."""
    nxt = list(range(n))
    for start in range(0, n, length):
        group = list(range(start, min(n, start + length)))
        for a, b in zip(group, group[1:] + group[:1]):
            nxt[a] = b
    return nxt


def loop_checkpoint(checkpoints, name: str = "kv1", scale: float = LAYER_SCALE) -> str:
    """See the module's docstring; scale 0 gives a model that only follows the cycles (a
    draft that agrees with the default one where it loops and not where it jumps)."""
    path = os.path.join(checkpoints.root, f"{name}-loop" if scale == LAYER_SCALE else f"{name}-loop-{scale}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(checkpoints.get(name)).eval()
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(scale)
        nxt = torch.tensor(cycles(VOCAB, CYCLE))
        # logit of token j = <embedding of the token j follows, h>: t is followed by nxt[t]
        m.lm_head.weight.copy_(m.model.embed_tokens.weight[torch.argsort(nxt)])
    m.save_pretrained(path)
    save_tokenizer(path, VOCAB)
    return path


def quoting_prompt(seed: int, length: int) -> list[int]:
    """A prompt that already holds part of a cycle once (n-gram drafts from the start)."""
    g = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, VOCAB // CYCLE, (), generator=g)) * CYCLE
    loop = [start + (i % CYCLE) for i in range(CYCLE + 3)]
    noise = torch.randint(2, VOCAB, (max(0, length - len(loop)),), generator=g).tolist()
    return noise + loop


_REFS: dict = {}
_MODELS: dict = {}


def hf_model(path: str):
    if path not in _MODELS:
        from transformers import AutoModelForCausalLM

        _MODELS[path] = AutoModelForCausalLM.from_pretrained(path).eval()
    return _MODELS[path]


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt` by the checkpoint at `path`, n tokens, EOS ignored."""
    key = (path, tuple(prompt), n)
    if key not in _REFS:
        m = hf_model(path)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        _REFS[key] = out[0, len(prompt):].tolist()
    return _REFS[key]


def hf_next_probs(path: str, prompts: list[list[int]], temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """transformers' next-token distribution after each prompt (equal lengths) at `temperature`,
    restricted to the `top_k` most likely tokens (0: all), [N, V] fp64."""
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor(prompts)).logits[:, -1].double()
    logits = logits / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


def mtp_loop_checkpoint(root: str) -> str:
    """A tiny DeepSeek-V3 ("v3-lora": MLA, MoE, YaRN) with an MTP layer, looped as above:
    the main model's layers shrunk and its LM head following the 7-cycles, and the MTP
    layer made to draft along them too (its block shrunk the same way, eh_proj passing
    its own embedding of token i+1 through, its shared_head.head following the cycles
    from that embedding): its drafts are kept where the target loops and rejected where
    attention moves it. transformers loads the main model as it is (the reference)."""
    path = os.path.join(root, "v3-mtp-loop")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from safetensors.torch import load_file, save_file

    from test_deepseek_v3 import CONFIGS, build_v3

    build_v3(path, CONFIGS["v3-lora"])
    file = os.path.join(path, "model.safetensors")
    t = load_file(file)
    order = torch.argsort(torch.tensor(cycles(VOCAB, CYCLE)))
    mtp = f"model.layers.{CONFIGS['v3-lora']['num_hidden_layers']}."
    for name in t:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t[name] = t[name] * LAYER_SCALE
    t["lm_head.weight"] = t["model.embed_tokens.weight"][order].clone()
    t[mtp + "shared_head.head.weight"] = t[mtp + "embed_tokens.weight"][order].clone()
    h = t[mtp + "eh_proj.weight"].shape[0]
    t[mtp + "eh_proj.weight"] = torch.cat([torch.eye(h), t[mtp + "eh_proj.weight"][:, h:] * LAYER_SCALE], dim=1)
    save_file(t, file, metadata={"format": "pt"})
    save_tokenizer(path, VOCAB)
    return path
