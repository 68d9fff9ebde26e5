"""The soak's request mix (bench/soak.py): what each client thread sends, how one request
ends (an Outcome), and the reference for greedy requests: the same model run alone,
offline, with braid's LLM. Where it sits in a request's life: it is the client."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

from braid.client import BraidError, Client
from braid.proto import common_pb2, router_pb2

VOCAB = 384
MAX_MODEL_LEN = 1024
KINDS = {"short": 30, "long": 10, "sampled": 10, "cancel": 8, "deadline": 4, "bad": 8, "tiny_temp": 5,
         "huge_max": 3, "oversized": 3}
GREEDY, MUST_FAIL, UNTYPED = ("short", "long"), ("bad", "oversized"), ("UNKNOWN", "INTERNAL")


@dataclass
class Outcome:
    kind: str
    prompt: list
    max_tokens: int
    status: str = "OK"
    """OK, CLIENT_CANCELLED, or the gRPC status name."""
    cause: str = ""
    """A short form of `details` for the table."""
    details: str = ""
    tokens: list = field(default_factory=list)
    start: float = 0.0
    elapsed: float = 0.0
    timeout: float = 20.0


def request(rng: random.Random) -> tuple[str, list, dict]:
    """One request of the mix: (kind, prompt, generate kwargs)."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(4, 24))]
    kw = dict(max_tokens=rng.randint(4, 24), temperature=0.0, ignore_eos=True, timeout=20.0)
    if kind == "long":
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(120, 400))]
        kw["max_tokens"] = 8
    elif kind == "sampled":
        kw.update(temperature=0.8, seed=rng.randrange(1000))
    elif kind == "cancel":
        kw["max_tokens"] = 200
    elif kind == "deadline":  # a deadline that ends it in prefill, transfer or decode
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(120, 400))]
        kw.update(max_tokens=64, timeout=rng.uniform(0.05, 1.0))
    elif kind == "tiny_temp":
        kw["temperature"] = 1e-40
    elif kind == "huge_max":
        kw.update(max_tokens=10**9, timeout=10.0)
    elif kind == "oversized":
        prompt = [rng.randrange(2, VOCAB) for _ in range(MAX_MODEL_LEN + 50)]
    elif kind == "bad":
        bad = rng.choice(["vocab", "empty", "max0", "top_p", "neg_temp"])
        if bad == "vocab":
            prompt = prompt + [VOCAB + 7]
        elif bad == "empty":
            prompt = []
        else:
            kw.update({"max0": {"max_tokens": 0}, "top_p": {"top_p": 2.0}, "neg_temp": {"temperature": -1.0}}[bad])
    return kind, prompt, kw


def _raw_generate(stub, prompt: list, kw: dict):
    """Generate as a raw message, past the SDK's own checks: the router must refuse it."""
    sampling = common_pb2.SamplingParams(max_tokens=kw["max_tokens"], temperature=kw["temperature"],
                                         ignore_eos=kw["ignore_eos"])
    if "top_p" in kw:
        sampling.top_p = kw["top_p"]
    req = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt), sampling=sampling)
    try:
        yield from (list(r.token_ids) for r in stub.Generate(req, timeout=kw["timeout"]))
    except grpc.RpcError as e:
        raise BraidError(e.details() or "", code=e.code()) from None


def run_one(client: Client, stub, kind: str, prompt: list, kw: dict) -> Outcome:
    """Send one request (bad ones raw on `stub`, a RouterStub) and record how it ended."""
    out = Outcome(kind, prompt, kw["max_tokens"], start=time.monotonic(), timeout=kw["timeout"])
    try:
        if kind == "bad":
            for tokens in _raw_generate(stub, prompt, kw):
                out.tokens += tokens
            return out
        stream = client.generate(prompt, **kw)
        for chunk in stream:
            out.tokens += chunk.token_ids
            if kind == "cancel" and len(out.tokens) >= 3:
                stream.cancel()
                out.status, out.cause = "CLIENT_CANCELLED", "cancelled by the client"
                break
    except BraidError as e:
        out.status, out.details, out.cause = e.code.name, e.details or "", _cause(e.details or "")
    except Exception as e:  # noqa: BLE001 - anything else is untyped: a finding
        out.status, out.details = "UNKNOWN", f"{type(e).__name__}: {e}"
        out.cause = out.details[:80]
    finally:
        out.elapsed = time.monotonic() - out.start
    return out


def _cause(details: str) -> str:
    """A short, stable cause for the table (numbers and ids stripped)."""
    words = [w for w in details.replace(":", " ").split() if not any(ch.isdigit() for ch in w)]
    return " ".join(words[:6])


def reference(model: str, outcomes: list[Outcome]) -> dict:
    """Greedy continuations of every completed greedy request, the model run alone (offline LLM)."""
    from braid.engine import LLM, SamplingParams

    wanted = {(tuple(o.prompt), o.max_tokens) for o in outcomes if o.kind in GREEDY and o.status == "OK"}
    if not wanted:
        return {}
    keys = sorted(wanted)
    with LLM(model, block_size=4, num_kv_blocks=4096) as llm:
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in keys]
        outs = llm.generate([list(p) for p, _ in keys], params)
    return {k: list(o.token_ids) for k, o in zip(keys, outs)}
