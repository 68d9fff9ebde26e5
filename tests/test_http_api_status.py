"""The HTTP API's statuses for what the orchestrator answers: overload 429, no
nodes 503, deadline 504, a draining router 503, a node dying mid-stream (an SSE
error event), a client leaving (aborts on both nodes). In-process, over real
HTTP and gRPC, with the fake nodes of test_router (tokens are a known function
of the prompt, so outputs are checked without the code under test)."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from braid.engine.tiny import save_tokenizer
from braid.tokenizer import Tokenizer
from test_router import PROMPT, Cluster, eventually, run


async def post(c: Cluster, body: dict, path: str = "/v1/completions"):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{c.router.http_address}{path}", json=body) as r:
            return r.status, await r.read()


def _body(**kw) -> dict:
    return dict({"model": "fake", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}, **kw)


@pytest.mark.timeout(30)
def test_token_ids_round_trip_and_fake_model_listed():
    async def body(c: Cluster):
        status, raw = await post(c, _body())
        assert status == 200
        assert await c.metric('braid_router_http_requests_total{route="/v1/completions",status="200"}') == 1.0
        out = json.loads(raw)
        assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 4, "total_tokens": len(PROMPT) + 4,
                                "prompt_tokens_details": {"cached_tokens": 0}}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{c.router.http_address}/v1/models") as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["fake"]

    run(body)


@pytest.mark.timeout(30)
def test_overload_is_429():
    async def body(c: Cluster):
        for p in c.prefills.values():
            p.stall = True
        first = asyncio.create_task(post(c, _body()))
        await eventually(lambda: c.router.orchestrator.admission.inflight == 1, what="first request admitted")
        status, raw = await post(c, _body())
        err = json.loads(raw)["error"]
        assert status == 429 and err["code"] == "resource_exhausted" and "overloaded" in err["message"]
        first.cancel()

    run(body, max_inflight=1, max_queued=0)


@pytest.mark.timeout(30)
def test_deadline_is_504():
    async def body(c: Cluster):
        for p in c.prefills.values():
            p.stall = True
        status, raw = await post(c, _body())
        assert status == 504 and json.loads(raw)["error"]["code"] == "deadline_exceeded"

    run(body, request_timeout_s=0.5)


@pytest.mark.timeout(30)
def test_no_nodes_is_503_and_health_says_so():
    async def body(c: Cluster):
        status, raw = await post(c, _body(model=None))
        assert status == 503 and json.loads(raw)["error"]["code"] == "unavailable"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{c.router.http_address}/health") as r:
                assert r.status == 503

    run(body, n_prefill=0, n_decode=0)


@pytest.mark.timeout(30)
def test_draining_router_refuses_new_requests_with_503():
    async def body(c: Cluster):
        assert await c.router.drain(1.0)
        status, raw = await post(c, _body())
        assert status == 503 and "draining" in json.loads(raw)["error"]["message"]

    run(body)


@pytest.mark.timeout(30)
def test_decode_node_dying_mid_stream_sends_an_error_event():
    async def body(c: Cluster):
        for d in c.decoders.values():
            d.die_after = 2
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{c.router.http_address}/v1/completions",
                              json=_body(max_tokens=8, stream=True)) as r:
                assert r.status == 200
                events = [line[6:].strip() for line in (await r.read()).split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        assert "error" in json.loads(events[-2]) and json.loads(events[-2])["error"]["code"] == "unavailable"

    run(body, n_decode=1)


@pytest.mark.timeout(30)
def test_client_leaving_aborts_the_request_on_both_nodes(tmp_path):
    save_tokenizer(str(tmp_path))  # text deltas, so that chunks flow before the end

    async def body(c: Cluster):
        for d in c.decoders.values():
            d.token_delay = 0.05
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{c.router.http_address}/v1/completions",
                              json=_body(max_tokens=200, stream=True)) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        break
                r.close()
        await eventually(lambda: c.events("abort") and not c.stranded()
                         and not any(d.streams for d in c.decoders.values()), 1.0,
                         f"aborted on the nodes {c.clog} {c.stranded()} {[d.streams for d in c.decoders.values()]}")
        aborted = {node for node, _, _ in c.events("abort")}
        assert any(n.startswith("d") for n in aborted) and any(n.startswith("p") for n in aborted)
        assert c.router.orchestrator.admission.inflight == 0

    run(body, n_prefill=1, n_decode=1, tokenizer=Tokenizer(str(tmp_path)))


@pytest.mark.timeout(30)
def test_stop_string_with_fake_tokens_needs_a_tokenizer():
    async def body(c: Cluster):
        status, raw = await post(c, _body(stop=["x"]))
        assert status == 400 and "tokenizer" in json.loads(raw)["error"]["message"]

    run(body)


@pytest.mark.timeout(30)
def test_client_leaving_a_non_streaming_request_aborts_it_too():
    """Nothing is written before the end here, so only the server cancelling the handler
    on disconnect (aiohttp's handler_cancellation) can notice the client left."""

    async def body(c: Cluster):
        for d in c.decoders.values():
            d.token_delay = 0.05
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(post(c, _body(max_tokens=200)), 0.5)
        await eventually(lambda: {n for n, call, _ in c.events("abort")} == {"p0", "d0"} and not c.stranded()
                         and not any(d.streams for d in c.decoders.values()), 1.0, "aborted on both nodes")
        assert c.router.orchestrator.admission.inflight == 0
        assert await c.metric('braid_router_http_requests_total{route="/v1/completions",status="499"}') == 1.0
        assert await c.metric('braid_router_requests_total{code="CANCELLED"}') == 1.0

    run(body, n_prefill=1, n_decode=1)


@pytest.mark.timeout(60)
def test_https_under_mutual_tls_admits_only_allowed_client_certificates(tmp_path):
    import ssl

    from braid.cluster.certs import make_certs
    from braid.discovery.static import StaticMembership
    from braid.proto.tls import TlsConfig
    from braid.router.config import RouterConfig
    from braid.router.server import start_router

    certs = make_certs(str(tmp_path), extra={"stranger": ("stranger",)})
    p = certs["router"]
    tls = TlsConfig(ca=p.ca, cert=p.cert, key=p.key, allowed_peers=("braid-client",))

    async def main():
        router = await start_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=-1, http_port=0, tls=tls),
                                    StaticMembership([]))

        async def get(identity):
            ctx = ssl.create_default_context(cafile=p.ca)
            if identity:
                ctx.load_cert_chain(certs[identity].cert, certs[identity].key)
            async with aiohttp.ClientSession() as s:
                async with s.get(f"https://{router.http_address}/v1/models", ssl=ctx) as r:
                    return r.status

        try:
            assert await get("client") == 200
            assert await get("stranger") == 403  # signed by the CA, but not an allowed peer
            with pytest.raises(aiohttp.ClientError):
                await get(None)  # no certificate: the handshake fails
        finally:
            await router.stop(0)

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_unknown_routes_and_methods_answer_in_the_envelope():
    async def body(c: Cluster):
        async with aiohttp.ClientSession() as s:
            base = f"http://{c.router.http_address}"
            async with s.get(f"{base}/v1/nothing") as r:
                assert r.status == 404 and set((await r.json())["error"]) == {"message", "type", "param", "code"}
            async with s.get(f"{base}/v1/completions") as r:
                assert r.status == 405 and "error" in await r.json()
            async with s.get(f"{base}/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
        assert "braid_router_requests_total" in text
        assert 'braid_router_http_requests_total{route="other",status="404"} 1.0' in text
        assert 'braid_router_http_requests_total{route="other",status="405"} 1.0' in text
        assert 'braid_router_http_requests_total{route="/metrics",status="200"}' not in text  # counted after

    run(body)


@pytest.mark.timeout(30)
def test_repetition_penalty_neutral_is_accepted_and_any_other_refused():
    """`vllm bench serve` sends repetition_penalty 1.0 (vLLM's extension) with every request."""
    async def body(c: Cluster):
        status, raw = await post(c, _body(repetition_penalty=1.0))
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 4
        for path, extra in (("/v1/completions", {}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            status, raw = await post(c, _body(repetition_penalty=1.2, **extra), path)
            err = json.loads(raw)["error"]
            assert status == 400 and err["param"] == "repetition_penalty" and "not supported" in err["message"]

    run(body)


@pytest.mark.timeout(30)
def test_chat_on_a_model_without_a_chat_template_is_a_clear_400(tmp_path):
    save_tokenizer(str(tmp_path))  # tokenizer.json only: no chat template

    async def body(c: Cluster):
        status, raw = await post(c, {"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
                                 "/v1/chat/completions")
        err = json.loads(raw)["error"]
        assert status == 400 and "chat template" in err["message"] and err["type"] == "invalid_request_error"

    run(body, tokenizer=Tokenizer(str(tmp_path)))


def test_chat_context_budget_cuts_where_the_smallest_node_would_stop():
    """Nodes of different max_model_len: the request goes out with the smallest (10) as
    max_tokens, and a node that would go further is cut at 10 - prompt (6 here)."""
    from braid.proto import common_pb2, router_pb2
    from braid.router.openai_format import Choice
    from braid.router.openai_protocol import parse_chat

    req = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, default_max_tokens=10)
    assert req.context_budget and req.jobs[0].request.sampling.max_tokens == 10
    choice = Choice(req.jobs[0], req, None, max_model_len=10)
    cuts = []
    for i in range(5):
        msg = router_pb2.GenerateResponse(token_ids=[2 * i + 2, 2 * i + 3], prompt_tokens=4 if i == 0 else 0)
        if choice.finish is None:
            cuts.append(choice.add(msg)[2])
    assert cuts == [False, False, True]
    assert choice.ids == [2, 3, 4, 5, 6, 7] and choice.finish == "length"
    # a node that stops by itself at the same point is not cut
    same = Choice(req.jobs[0], req, None, max_model_len=10)
    for i in range(3):
        done = i == 2
        msg = router_pb2.GenerateResponse(token_ids=[5, 6], prompt_tokens=4, finished=done,
                                          finish_reason=common_pb2.FINISH_REASON_LENGTH if done else 0)
        assert same.add(msg)[2] is False
    assert len(same.ids) == 6 and same.finish == "length"
