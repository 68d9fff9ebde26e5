"""The router's OpenAI-compatible HTTP API (braid.router.http_api), driven by the
official `openai` client (sync and async, streaming and not) and by raw HTTP,
against one LocalCluster on a tiny random checkpoint. References are independent
of the code under test: transformers' greedy tokens and log-softmax, the
tokenizer's own decode, a chat template rendered here with jinja2, and the same
request without stop strings cut at the first match by plain str.find."""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time

import aiohttp
import grpc
import openai
import pytest
import torch

from braid.client import Client
from braid.proto import common_pb2, router_pb2, router_pb2_grpc
from braid.router.stop import StopStrings
from cluster_harness import Cluster
from conftest import prompt_of

NAME = "kv1"
MAX_MODEL_LEN = 1024  # long enough that a stream left running needs many seconds to end by itself
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _all_free(c) -> bool:
    for n in c.list_nodes(timeout=5):
        load = n.load
        if load.free_kv_blocks != load.total_kv_blocks or load.reserved_blocks or load.running_seqs or load.waiting_seqs:
            return False
    return True


@pytest.fixture(scope="module")
def model_dir(checkpoints, tmp_path_factory):
    """The tiny checkpoint plus a chat template (tokenizer_config.json), in a folder named NAME."""
    path = str(tmp_path_factory.mktemp("http-model") / NAME)
    shutil.copytree(checkpoints.get(NAME), path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f)
    return path


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("http-cluster")), model_dir, {
        "prefill": {"parallel": {"threads_per_rank": 1}},
        "decode": {"parallel": {"threads_per_rank": 1}, "scheduler": {"max_model_len": MAX_MODEL_LEN}},
    })
    try:
        c.start()
        assert c.http_address
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tok(model_dir):
    from braid.tokenizer import Tokenizer

    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def oai(cluster):
    with openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def _aoai(cluster):
    return openai.AsyncOpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="x", max_retries=0, timeout=120)


def _greedy(checkpoints, prompt, n):
    return checkpoints.greedy(NAME, prompt, n)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# -- stop strings, offline -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_match_the_first_occurrence_across_any_split(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c\u00e9") for _ in range(60))
    stops = ["".join(rng.choice("ab c\u00e9") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    ends = [(text.find(s), text.find(s) + len(s)) for s in stops if s in text]
    expected = text[: min(ends)[0]] if ends else text
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    m = StopStrings(stops)
    out, matched = "", False
    for i, p in enumerate(pieces):
        got, matched = m.feed(p)
        out += got
        if matched:
            break
        if i == len(pieces) - 1:
            out += m.flush()
    assert out == expected
    assert matched == bool(ends)
    if ends:
        assert m.match_end == min(ends)[1]


# -- models, health, metrics ---------------------------------------------------------


def test_models_health_and_metrics(cluster, oai):
    assert [m.id for m in oai.models.list().data] == [NAME]

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{cluster.http_address}/health") as r:
                assert r.status == 200
            async with s.get(f"http://{cluster.http_address}/metrics") as r:
                assert r.status == 200
                return await r.text()

    assert "braid_router_requests_total" in asyncio.run(go())


# -- completions ---------------------------------------------------------------------


def test_completion_of_token_ids_equals_transformers(cluster, oai, checkpoints, tok):
    prompt = prompt_of(11, seed=3)
    r = oai.completions.create(model=NAME, prompt=prompt, max_tokens=12, **GREEDY)
    ref = _greedy(checkpoints, prompt, 12)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == tok.decode(ref)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 12, 23)


def test_default_max_tokens_is_16(cluster, oai, checkpoints, tok):
    prompt = prompt_of(5, seed=4)
    r = oai.completions.create(model=NAME, prompt=prompt, **GREEDY)
    assert r.usage.completion_tokens == 16
    assert r.choices[0].text == tok.decode(_greedy(checkpoints, prompt, 16))


def test_list_of_text_prompts_with_n(cluster, oai, checkpoints, tok):
    texts = ["The prompt arrives", "Blocks of the cache"]
    r = oai.completions.create(model=NAME, prompt=texts, n=2, max_tokens=6, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        ids = tok.encode(texts[c.index // 2])
        assert c.text == tok.decode(_greedy(checkpoints, ids, 6))
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    assert r.usage.completion_tokens == 4 * 6


def test_n_with_a_seed_equals_seeds_one_by_one(cluster, oai):
    prompt = prompt_of(7, seed=5)
    kw = dict(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    together = oai.completions.create(n=3, seed=40, **kw)
    alone = [oai.completions.create(seed=40 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in together.choices] == alone
    assert len(set(alone)) > 1  # sampled, not greedy: the seeds differ


def test_async_streaming_with_usage(cluster, checkpoints, tok):
    prompt = prompt_of(9, seed=6)

    async def go():
        async with _aoai(cluster) as c:
            stream = await c.completions.create(model=NAME, prompt=prompt, max_tokens=14, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(go())
    assert len(chunks) > 2
    body, last = chunks[:-1], chunks[-1]
    assert "".join(ch.choices[0].text for ch in body) == tok.decode(_greedy(checkpoints, prompt, 14))
    assert all(ch.usage is None for ch in body)
    assert body[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (9, 14)


def test_usage_reports_cached_prompt_tokens(cluster, oai, checkpoints, tok):
    """A repeated prompt's usage counts the tokens its node took from a prefix cache, as
    OpenAI's prompt_tokens_details.cached_tokens: every full block of the prompt but the
    one holding its last token (always computed: it yields the first token); block size 4
    (tests/cluster_harness.py), in streamed usage too."""
    prompt = prompt_of(4 * 6 + 3, seed=77)
    cold = oai.completions.create(model=NAME, prompt=prompt, max_tokens=5, **GREEDY)
    warm = oai.completions.create(model=NAME, prompt=prompt, max_tokens=5, **GREEDY)
    assert cold.choices[0].text == warm.choices[0].text == tok.decode(_greedy(checkpoints, prompt, 5))
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens == (len(prompt) - 1) // 4 * 4 == 24
    stream = oai.completions.create(model=NAME, prompt=prompt, max_tokens=5, stream=True,
                                    stream_options={"include_usage": True}, **GREEDY)
    assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == 24


# -- stop strings through the cluster ---------------------------------------------------


def _stop_case(checkpoints, tok, seed):
    prompt = prompt_of(8, seed=seed)
    full = tok.decode(_greedy(checkpoints, prompt, 30))
    stop = full[12:15]
    assert stop and full.find(stop) < len(full) - 3
    return prompt, full, stop, full[: full.find(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_output(cluster, oai, checkpoints, tok, stream):
    prompt, full, stop, expected = _stop_case(checkpoints, tok, seed=7)
    kw = dict(model=NAME, prompt=prompt, max_tokens=30, stop=["\u2603never", stop], **GREEDY)
    if stream:
        chunks = list(oai.completions.create(stream=True, **kw))
        text = "".join(ch.choices[0].text for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = oai.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens < 30
    assert text == expected
    assert finish == "stop"
    unmatched = oai.completions.create(model=NAME, prompt=prompt, max_tokens=30, stop="\u2603never", **GREEDY)
    assert unmatched.choices[0].text == full and unmatched.choices[0].finish_reason == "length"


def test_stop_string_over_grpc_and_nodes_freed(cluster, checkpoints, tok):
    prompt, full, stop, expected = _stop_case(checkpoints, tok, seed=8)
    req = router_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]),
    )
    with grpc.insecure_channel(cluster.address) as ch:
        chunks = list(router_pb2_grpc.RouterStub(ch).Generate(req, timeout=60))
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finished and chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    ids = [t for c in chunks for t in c.token_ids]
    ref = _greedy(checkpoints, prompt, 30)
    assert ids == ref[: len(ids)]  # the tokens up to the one completing the match
    assert expected + stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    with Client(cluster.address, timeout=60) as c:  # the SDK's `stop`
        done = c.complete(prompt, max_tokens=30, temperature=0, ignore_eos=True, stop=stop)
        assert done.text == expected and done.finish_reason == "stop" and list(done.token_ids) == ids


# -- chat ------------------------------------------------------------------------------


def _chat_ids(model_dir, messages):
    import jinja2
    from tokenizers import Tokenizer as HFTokenizer

    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    return HFTokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(text, add_special_tokens=False).ids


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What moves the blocks?"}]


def test_chat_equals_the_rendered_template(cluster, oai, checkpoints, tok, model_dir):
    ids = _chat_ids(model_dir, MESSAGES)
    r = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, **GREEDY)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(_greedy(checkpoints, ids, 10))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)


def test_chat_streams_role_first_then_content_then_usage(cluster, checkpoints, tok, model_dir):
    ids = _chat_ids(model_dir, MESSAGES)

    async def go():
        async with _aoai(cluster) as c:
            stream = await c.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=8,
                                                     stream=True, stream_options={"include_usage": True}, **GREEDY)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(go())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == tok.decode(_greedy(checkpoints, ids, 8))
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_without_max_tokens_fills_the_context(cluster, oai, model_dir):
    ids = _chat_ids(model_dir, MESSAGES)
    r = oai.chat.completions.create(model=NAME, messages=MESSAGES, **GREEDY)
    assert r.usage.completion_tokens == MAX_MODEL_LEN - len(ids)
    assert r.choices[0].finish_reason == "length"


# -- logprobs and echo -------------------------------------------------------------------


def _log_softmax(checkpoints, ids):
    with torch.no_grad():
        logits = checkpoints.hf_model(NAME)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_completion_logprobs_equal_transformers(cluster, oai, checkpoints, tok):
    prompt = prompt_of(6, seed=9)
    r = oai.completions.create(model=NAME, prompt=prompt, max_tokens=5, logprobs=3, **GREEDY)
    out = _greedy(checkpoints, prompt, 5)
    ref = _log_softmax(checkpoints, prompt + out)
    lp = r.choices[0].logprobs
    for i, t in enumerate(out):
        if "\ufffd" not in tok.decode([t]):  # else the vocabulary's token string
            assert lp.tokens[i] == tok.decode([t])
        row = ref[len(prompt) - 1 + i]
        assert abs(lp.token_logprobs[i] - row[t].item()) < 1e-4
        assert len(lp.top_logprobs[i]) == 3  # distinct keys, even for partial characters
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(5)]


def test_echo_with_logprobs_and_zero_max_tokens(cluster, oai, checkpoints, tok):
    prompt = prompt_of(8, seed=10)
    r = oai.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ref = _log_softmax(checkpoints, prompt)
    c = r.choices[0]
    assert c.text == tok.decode(prompt)
    assert c.logprobs.token_logprobs[0] is None
    assert len(c.logprobs.token_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(c.logprobs.token_logprobs[i] - ref[i - 1, prompt[i]].item()) < 1e-4
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(prompt)


def test_echo_without_logprobs_prepends_the_prompt(cluster, oai, checkpoints, tok):
    text = "The decoder then writes"
    r = oai.completions.create(model=NAME, prompt=text, max_tokens=4, echo=True, **GREEDY)
    assert r.choices[0].text == text + tok.decode(_greedy(checkpoints, tok.encode(text), 4))


def test_chat_logprobs(cluster, oai, checkpoints, model_dir):
    ids = _chat_ids(model_dir, MESSAGES)
    r = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2,
                                    **GREEDY)
    out = _greedy(checkpoints, ids, 4)
    ref = _log_softmax(checkpoints, ids + out)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for i, (entry, t) in enumerate(zip(content, out)):
        assert abs(entry.logprob - ref[len(ids) - 1 + i, t].item()) < 1e-4
        assert len(entry.top_logprobs) == 2
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(ref[len(ids) - 1 + i].topk(2).values.tolist(),
                                                                        abs=1e-4)
    # the tokens' bytes put together are the answer's UTF-8
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content


# -- errors over raw HTTP ------------------------------------------------------------------


async def _post(cluster, path, data: bytes | str, headers=None):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{cluster.http_address}{path}", data=data,
                          headers=headers or {"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"model": NAME, "prompt": 5}), 400, "prompt"),
    (json.dumps({"model": NAME, "prompt": "hi", "stop": [1]}), 400, "stop"),
    (json.dumps({"model": NAME, "prompt": "hi", "logprobs": 21}), 400, "logprobs"),
    (json.dumps({"model": NAME, "prompt": "hi", "temperature": -1}), 400, None),
    (json.dumps({"model": NAME, "prompt": "hi", "suffix": "x"}), 400, "suffix"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}), 404, "model"),
])
def test_bad_requests_get_the_openai_envelope(cluster, body, status, param):
    got, err = asyncio.run(_post(cluster, "/v1/completions", body))
    assert got == status
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param
    if status == 404:
        assert err["error"]["code"] == "model_not_found"


def test_chat_wrong_message_type_and_unknown_model(cluster, oai):
    got, err = asyncio.run(_post(cluster, "/v1/chat/completions", json.dumps({"model": NAME, "messages": "hi"})))
    assert got == 400 and err["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MESSAGES)


def test_oversize_body_is_413(cluster):
    body = json.dumps({"model": NAME, "prompt": "x" * (17 * 1024 * 1024)})
    got, err = asyncio.run(_post(cluster, "/v1/completions", body))
    assert got == 413 and "limit" in err["error"]["message"]


def test_client_disconnect_mid_stream_frees_both_nodes(cluster):
    body = {"model": NAME, "prompt": prompt_of(20, seed=11), "max_tokens": MAX_MODEL_LEN - 20, "stream": True,
            "temperature": 0, "ignore_eos": True}

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{cluster.http_address}/v1/completions", json=body) as r:
                assert r.status == 200
                events = 0
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        events += 1
                        if events >= 3:
                            break
                r.close()  # drops the connection mid-stream

    asyncio.run(go())
    # ~1000 tokens still to go: left running, the request would hold the nodes for
    # many seconds (over 3 s even at 3 ms a token); aborted, they are free at once
    t0 = time.monotonic()
    with Client(cluster.address) as c:
        while not _all_free(c) and time.monotonic() - t0 < 3.0:
            time.sleep(0.05)
        assert _all_free(c), "nodes still hold the request 3 s after the client left"


@pytest.fixture(autouse=True)
def _nodes_free_after(request):
    yield
    if "cluster" not in request.fixturenames:
        return
    cluster = request.getfixturevalue("cluster")
    with Client(cluster.address) as c:
        end = time.monotonic() + 3
        while not _all_free(c) and time.monotonic() < end:
            time.sleep(0.05)
        assert _all_free(c), [(n.node_id, str(n.load)) for n in c.list_nodes(timeout=5)]


def test_speculation_over_http_streams_the_same_tokens_and_logprobs(cluster, oai, checkpoints, tok):
    """braid's num_speculative_tokens extension: several tokens a step come out as the
    same stream of chunks, with each token's logprob, as without it; a bad value is a 400."""
    prompt = prompt_of(9, seed=12)
    prompt = prompt + prompt  # quoted: n-gram drafts from the first step
    out = _greedy(checkpoints, prompt, 10)
    ref = _log_softmax(checkpoints, prompt + out)
    body = {"ignore_eos": True, "num_speculative_tokens": 4}
    chunks = list(oai.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                         stream=True, extra_body=body))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert text == tok.decode(out)
    assert lps == pytest.approx([ref[len(prompt) - 1 + i][t].item() for i, t in enumerate(out)], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="num_speculative_tokens"):
        oai.completions.create(model=NAME, prompt=prompt, max_tokens=2, extra_body={"num_speculative_tokens": 99})
