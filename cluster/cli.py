"""The `braid` command line.

    braid up [--model PATH] [--config YAML] [--port N] [--demo PROMPT]
                                   a whole local cluster: etcd, router, one prefill
                                   node (pcp 2) and one decode node (tp 2, dcp 2),
                                   layouts fitted to the model
    braid router serve  --config YAML [--set FIELD=VALUE ...]
    braid prefill serve --config YAML [--set ...]
    braid decode serve  --config YAML [--set ...]
    braid generate "text" --router HOST:PORT     stream a completion through the SDK
    braid status --router HOST:PORT              nodes, roles, layouts and load
    braid offline "text"                          the offline engine in this process
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

log = logging.getLogger("braid")


# -- shared helpers ------------------------------------------------------------------


def _load(args):
    from braid.cluster.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "port", None) is not None:
        overrides.append(f"{args.role}.port={args.port}")
    if getattr(args, "model", None):
        overrides.append(f"model={args.model}")
    return load_config(args.config, overrides)


def _model_path(cfg) -> str:
    from braid.engine.tiny import ensure_default_model

    return cfg.model or ensure_default_model()


def _write_ready(path: str | None, info: dict) -> None:
    print(json.dumps(info), flush=True)
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# -- serve commands --------------------------------------------------------------------


async def _serve_node(args) -> None:
    cfg = _load(args)
    model = _model_path(cfg)
    if args.role == "prefill":
        from braid.prefill_node.server import start_prefill_node as start
    else:
        from braid.decode_node.server import start_decode_node as start
    rt, svc = await start(cfg.node(args.role), model, cfg.discovery())
    _write_ready(args.ready_file, {"role": args.role, "node_id": rt.node_id, "address": rt.address, "metrics": rt.metrics_address})
    try:
        await _wait_for_signal()
    finally:
        if hasattr(svc, "close"):
            svc.close()
        await rt.stop()


async def _serve_router(args) -> None:
    from braid.discovery.etcd import EtcdMembership
    from braid.router.server import start_router
    from braid.tokenizer import Tokenizer

    cfg = _load(args)
    try:
        tokenizer = Tokenizer(_model_path(cfg))
    except FileNotFoundError:
        tokenizer = None
    membership = EtcdMembership(cfg.discovery())
    await membership.start()
    handle = await start_router(cfg.router, membership, tokenizer)
    _write_ready(args.ready_file, {"role": "router", "address": handle.address, "metrics": handle.metrics_address})
    try:
        await _wait_for_signal()
    finally:
        await handle.stop(2.0)
        await membership.close()


def _serve(args) -> int:
    logging.basicConfig(level=os.environ.get("BRAID_LOG", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve_router(args) if args.role == "router" else _serve_node(args))
    return 0


# -- braid up -------------------------------------------------------------------------


def _up(args) -> int:
    from braid.cluster.up import run_up

    return run_up(args, _stream)


# -- client commands ----------------------------------------------------------------------


def _stream(address: str, prompt: str, max_tokens: int, temperature: float) -> None:
    from braid.client import Client

    with Client(address) as c:
        tokens = []
        print(f"prompt: {prompt!r}\nanswer: ", end="", flush=True)
        for chunk in c.generate(prompt, max_tokens=max_tokens, temperature=temperature):
            tokens += chunk.token_ids
            print(chunk.text, end="", flush=True)
            if chunk.finished:
                t = chunk.timings
                print(f"\ntokens: {tokens}")
                if t is not None:
                    print(
                        f"finish: {chunk.finish_reason}; ttft {t.ttft_s * 1000:.0f} ms, total {t.total_s * 1000:.0f} ms, "
                        f"prefill on {t.prefill_node or '-'}, decode on {t.decode_node}, {t.kv_bytes} KV bytes moved"
                    )


def _generate(args) -> int:
    _stream(args.router, args.prompt, args.max_tokens, args.temperature)
    return 0


def _status(args) -> int:
    from braid.client import Client

    with Client(args.router) as c:
        nodes = c.list_nodes(timeout=10)
    if not nodes:
        print("no nodes registered")
        return 0
    for n in nodes:
        lay = n.info.layout if n.info is not None else None
        shape = f"tp{lay.tp_size} pcp{lay.pcp_size} dcp{lay.dcp_size} block{lay.block_size}" if lay is not None else "?"
        load = n.load
        print(
            f"{n.role:8s} {n.node_id:30s} {n.address:22s} {'up' if n.reachable else 'DOWN':4s} {shape:28s} "
            f"free blocks {load.free_kv_blocks}/{load.total_kv_blocks} running {load.running_seqs} "
            f"waiting {load.waiting_seqs} reserved {load.reserved_blocks} queued prefill tokens {load.queued_prefill_tokens}"
        )
    return 0


def _offline(args) -> int:
    from braid.engine import LLM, SamplingParams
    from braid.engine.tiny import ensure_default_model

    model = args.model or ensure_default_model()
    print(f"model: {model}")
    with LLM(
        model,
        tensor_parallel_size=args.tp,
        prefill_context_parallel_size=args.pcp,
        decode_context_parallel_size=args.dcp,
        block_size=args.block_size,
        dtype=args.dtype,
    ) as llm:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for prompt, out in zip(args.prompt, llm.generate(args.prompt, params)):
            if out.error:
                print(f"prompt {prompt!r}: rejected: {out.error}", file=sys.stderr)
                continue
            print(f"prompt: {prompt!r}")
            print(f"tokens: {out.token_ids}")
            print(f"text:   {out.text!r}  ({out.finish_reason})")
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="braid", description="braid: disaggregated LLM serving with context parallelism")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="run a whole local cluster (etcd, router, prefill pcp 2, decode tp 2 dcp 2)")
    up.add_argument("--model", help="HF checkpoint directory (default: the embedded tiny model)")
    up.add_argument("--config", help="cluster YAML (defaults for everything not given)")
    up.add_argument("--port", type=int, default=0, help="router port (default: a free port)")
    up.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (repeatable)")
    up.add_argument("--demo", metavar="PROMPT", help="send this prompt through the SDK, print the answer, shut down")
    up.add_argument("--max-tokens", type=int, default=32)
    up.add_argument("--temperature", type=float, default=0.0)
    up.set_defaults(func=_up)

    for role, what in (("router", "the Router service"), ("prefill", "a prefill node"), ("decode", "a decode node")):
        p = sub.add_parser(role, help=f"{what}")
        psub = p.add_subparsers(dest="action", metavar="ACTION")
        s = psub.add_parser("serve", help=f"serve {what} until SIGTERM / Ctrl-C")
        s.add_argument("--config", help="cluster YAML")
        s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (repeatable)")
        s.add_argument("--port", type=int, help=f"gRPC port (overrides {role}.port)")
        s.add_argument("--model", help="HF checkpoint directory (overrides model)")
        s.add_argument("--ready-file", help="write the bound addresses here as JSON once serving")
        s.set_defaults(func=_serve, role=role)
        p.set_defaults(func=lambda a, p=p: (p.print_help(), 0)[1])

    gen = sub.add_parser("generate", help="stream a completion from a router through the SDK")
    gen.add_argument("prompt")
    gen.add_argument("--router", default="127.0.0.1:50051", help="router address HOST:PORT")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(func=_generate)

    st = sub.add_parser("status", help="list nodes, roles, layouts and load")
    st.add_argument("--router", default="127.0.0.1:50051", help="router address HOST:PORT")
    st.set_defaults(func=_status)

    off = sub.add_parser("offline", help="generate in this process with the offline engine (no cluster)")
    off.add_argument("prompt", nargs="+", help="prompt text (several prompts are batched)")
    off.add_argument("--model", help="HF checkpoint directory (default: the embedded tiny model)")
    off.add_argument("--max-tokens", type=int, default=32)
    off.add_argument("--temperature", type=float, default=0.0)
    off.add_argument("--seed", type=int, default=None)
    off.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    off.add_argument("--pcp", type=int, default=1, help="prefill context parallel size")
    off.add_argument("--dcp", type=int, default=1, help="decode context parallel size")
    off.add_argument("--block-size", type=int, default=16)
    off.add_argument("--dtype", default="float32")
    off.set_defaults(func=_offline)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:  # ConfigError and bad settings
        print(f"braid: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
