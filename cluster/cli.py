"""The `braid` command line.

    braid up [--model PATH] [--config YAML] [--port N] [--demo PROMPT]
                                   a whole local cluster: etcd, router, one prefill
                                   node (pcp 2) and one decode node (tp 2, dcp 2),
                                   layouts fitted to the model
    braid router serve  --config YAML [--set FIELD=VALUE ...]
    braid prefill serve --config YAML [--set ...]
    braid decode serve  --config YAML [--set ...]
    braid up --tls ...                            the same over mutual TLS (throwaway certificates)
    braid generate "text" [--chat] --router HOST:PORT [--ca PEM --cert PEM --key PEM]
                                                 stream a completion (--chat: a chat) through the SDK
    braid status --router HOST:PORT [--ca ...]   nodes, roles, layouts and load (admin only under mTLS)
    braid certs DIR                               a throwaway CA and certificates for every identity
    braid offline "text" [--tp N --pcp N --dcp N --ep N --spec-k K --spec-method M --graph-mode]   the offline engine in this process
    braid soak [--quick] [--duration S]           the chaos soak (bench/soak.py)
    braid plan --model M --hardware H --cards N --ttft-slo 10s --tpot-slo 50ms --workload W [--out DIR]
                                                 simulate deployments, recommend one, write its overlay
    braid plan calibrate | fit ...                measure this machine / fit to published points
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from braid.proto.sampling_rules import SPECULATIVE_METHODS

log = logging.getLogger("braid")

MODEL_HELP = ("HF checkpoint directory or GGUF file (default: SmolLM2-135M-Instruct, installed by "
              "scripts/setup.sh); \"tiny\": the embedded tiny random model")


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
    from braid.engine.default_model import resolve_model

    return resolve_model(cfg.model)


def _http_url(address: str | None, tls: bool) -> str:
    """Where the openai client points (base_url), or "off"."""
    return f"{'https' if tls else 'http'}://{address}/v1" if address else "off"


def _write_ready(path: str | None, info: dict) -> None:
    print(json.dumps(info), flush=True)
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)


async def _wait_for_signal(also: asyncio.Event | None = None) -> None:
    """Until SIGINT/SIGTERM, or until `also` is set (a node whose engine died)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, also) if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


# -- serve commands --------------------------------------------------------------------


async def _serve_node(args) -> int:
    cfg = _load(args)
    model = _model_path(cfg)
    if args.role == "prefill":
        from braid.prefill_node.server import start_prefill_node as start
    else:
        from braid.decode_node.server import start_decode_node as start
    rt, svc = await start(cfg.node(args.role), model, cfg.discovery())
    _write_ready(args.ready_file, {"role": args.role, "node_id": rt.node_id, "address": rt.address, "metrics": rt.metrics_address})
    try:
        await _wait_for_signal(rt.failed)
    finally:
        if hasattr(svc, "close"):
            svc.close()
        await rt.stop()
    if rt.fatal is not None:  # non-zero, so that a supervisor (Kubernetes) restarts the node
        log.error("%s node %s exits: its engine died (%s)", args.role, rt.node_id, rt.fatal)
        return 1
    return 0


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
    _write_ready(args.ready_file, {"role": "router", "address": handle.address, "metrics": handle.metrics_address,
                                   "http": handle.http_address})
    print(f"braid: router gRPC at {handle.address}; OpenAI HTTP API at "
          f"{_http_url(handle.http_address, cfg.router.tls.enabled)}", flush=True)
    try:
        await _wait_for_signal()
        # Running streams finish (new calls are refused) for up to drain_timeout_s.
        if not await handle.drain(cfg.router.drain_timeout_s):
            log.warning("router: drain timeout (%.0f s) passed; cancelling the rest", cfg.router.drain_timeout_s)
    finally:
        await handle.stop(2.0)
        await membership.close()


def _serve(args) -> int:
    logging.basicConfig(level=os.environ.get("BRAID_LOG", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve_router(args) if args.role == "router" else _serve_node(args)) or 0


# -- braid up -------------------------------------------------------------------------


def _up(args) -> int:
    from braid.cluster.up import run_up

    return run_up(args, _stream)


# -- client commands ----------------------------------------------------------------------


def _tls_args(args) -> dict:
    """The SDK's TLS keyword arguments from --ca/--cert/--key/--server-name."""
    names = ("ca", "cert", "key", "server_name")
    return {n: getattr(args, n) for n in names if getattr(args, n, None)}


def _stream(address: str, prompt: str, max_tokens: int, temperature: float, chat: bool = False, **tls) -> None:
    """Stream one answer to stdout; `chat`: the prompt goes as one user message,
    rendered by the router with the model's chat template."""
    from braid.client import Client

    with Client(address, **tls) as c:
        tokens = []
        print(f"{'chat' if chat else 'prompt'}: {prompt!r}\nanswer: ", end="", flush=True)
        sampling = dict(max_tokens=max_tokens, temperature=temperature)
        stream = c.chat([{"role": "user", "content": prompt}], **sampling) if chat else c.generate(prompt, **sampling)
        for chunk in stream:
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
    _stream(args.router, args.prompt, args.max_tokens, args.temperature, chat=args.chat, **_tls_args(args))
    return 0


def _status(args) -> int:
    from braid.client import Client, PermissionDenied

    try:
        with Client(args.router, **_tls_args(args)) as c:
            nodes = c.list_nodes(timeout=10)
    except PermissionDenied as e:  # mutual TLS: only an admin certificate lists the nodes
        print(f"braid: error: {e}", file=sys.stderr)
        return 1
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


def _certs(args) -> int:
    from braid.cluster.certs import make_certs

    paths = make_certs(args.folder)
    for stem, p in paths.items():
        print(f"{stem:8s} cert {p.cert}  key {p.key}")
    print(f"ca       {paths['router'].ca}")
    return 0


def _add_tls_flags(p) -> None:
    p.add_argument("--ca", help="PEM CA that signed the router's certificate (turns on TLS)")
    p.add_argument("--cert", help="PEM client certificate, for a router that requires mutual TLS")
    p.add_argument("--key", help="PEM private key of --cert")
    p.add_argument("--server-name", help="name to check in the router's certificate (default: the host)")


def _offline_settings(args) -> dict:
    """The engine settings the offline command's flags give (EngineConfig.build's names)."""
    return dict(
        tensor_parallel_size=args.tp,
        prefill_context_parallel_size=args.pcp,
        decode_context_parallel_size=args.dcp,
        enable_expert_parallel=args.enable_expert_parallel,
        expert_parallel_size=args.ep,
        block_size=args.block_size,
        dtype=args.dtype,
        num_speculative_tokens=args.num_speculative_tokens,
        speculative_method=args.spec_method,
        draft_model=args.draft_model,
        graph_mode=args.graph_mode,
        **({"graph_batch_sizes": args.graph_batch_sizes} if args.graph_batch_sizes else {}),
    )


def _offline(args) -> int:
    from braid.engine import LLM, SamplingParams
    from braid.engine.default_model import resolve_model

    model = resolve_model(args.model)
    print(f"model: {model}")
    with LLM(model, **_offline_settings(args)) as llm:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for prompt, out in zip(args.prompt, llm.generate(args.prompt, params)):
            if out.error:
                print(f"prompt {prompt!r}: rejected: {out.error}", file=sys.stderr)
                continue
            print(f"prompt: {prompt!r}")
            print(f"tokens: {out.token_ids}")
            print(f"text:   {out.text!r}  ({out.finish_reason})")
    return 0


def _soak(args) -> int:
    """bench/soak.py of the source tree (the soak is a benchmark, not part of the package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "soak.py")
    if not os.path.isfile(path):
        print(f"braid: error: {path} not found (the soak runs from a source checkout)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("braid_soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    argv = ["--duration", str(args.duration), "--workers", str(args.workers), "--seed", str(args.seed)]
    return soak.main(argv + (["--quick"] if args.quick else []))


# -- parser ------------------------------------------------------------------------------


def _add_client_commands(sub) -> None:
    """generate, status (both with the TLS flags) and certs."""
    gen = sub.add_parser("generate", help="stream a completion from a router through the SDK")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as one user message, rendered with the model's chat template")
    gen.add_argument("--router", default="127.0.0.1:50051", help="router address HOST:PORT")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    _add_tls_flags(gen)
    gen.set_defaults(func=_generate)

    st = sub.add_parser("status", help="list nodes, roles, layouts and load (an admin certificate under mutual TLS)")
    st.add_argument("--router", default="127.0.0.1:50051", help="router address HOST:PORT")
    _add_tls_flags(st)
    st.set_defaults(func=_status)

    ce = sub.add_parser("certs", help="write a throwaway CA and router/node/client/admin certificates (tests, demos)")
    ce.add_argument("folder", help="where the PEM files go (created)")
    ce.set_defaults(func=_certs)


def _add_plan_command(sub) -> None:
    """`braid plan` (and its calibrate and fit actions): the planner's own CLI module."""
    from braid.planner.cli import add_plan_command

    add_plan_command(sub)


def _add_offline_command(sub) -> None:
    """`braid offline`: the offline engine in this process."""
    off = sub.add_parser("offline", help="generate in this process with the offline engine (no cluster)")
    off.add_argument("prompt", nargs="+", help="prompt text (several prompts are batched)")
    off.add_argument("--model", help=MODEL_HELP)
    off.add_argument("--max-tokens", type=int, default=32)
    off.add_argument("--temperature", type=float, default=0.0)
    off.add_argument("--seed", type=int, default=None)
    off.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    off.add_argument("--pcp", type=int, default=1, help="prefill context parallel size")
    off.add_argument("--dcp", type=int, default=1, help="decode context parallel size")
    off.add_argument("--enable-expert-parallel", action="store_true",
                     help="MoE models: routed experts whole on ranks (EP, size tp unless --ep) instead of sliced by TP")
    off.add_argument("--ep", type=int, default=None,
                     help="expert parallel size (implies --enable-expert-parallel); divides tp or is a multiple of it")
    off.add_argument("--block-size", type=int, default=16)
    off.add_argument("--dtype", default="float32")
    off.add_argument("--num-speculative-tokens", "--spec-k", type=int, default=0,
                     help="speculative decoding: verify up to this many drafts per step (exact; 0: off)")
    off.add_argument("--spec-method", choices=SPECULATIVE_METHODS, default="ngram",
                     help="where drafts come from: n-gram prompt lookup, a --draft-model, or the checkpoint's MTP layer")
    off.add_argument("--draft-model", default=None, help="--spec-method draft: a smaller checkpoint, same vocabulary")
    off.add_argument("--graph-mode", action="store_true",
                     help="decode steps through torch.compile'd graphs, one per padded batch size (compiled at start)")
    off.add_argument("--graph-batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=None,
                     help="graph mode's padded batch sizes, comma-separated (default 1,2,4,8,16,32)")
    off.set_defaults(func=_offline)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="braid", description="braid: disaggregated LLM serving with context parallelism")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="run a whole local cluster (etcd, router, prefill pcp 2, decode tp 2 dcp 2)")
    up.add_argument("--model", help=MODEL_HELP)
    up.add_argument("--config", help="cluster YAML (defaults for everything not given)")
    up.add_argument("--port", type=int, default=0, help="router port (default: a free port)")
    up.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (repeatable)")
    up.add_argument("--demo", metavar="PROMPT", help="send this prompt through the SDK, print the answer, shut down")
    up.add_argument("--max-tokens", type=int, default=32)
    up.add_argument("--temperature", type=float, default=0.0)
    up.add_argument("--tls", action="store_true",
                    help="make a throwaway CA and certificates in the work folder; run every gRPC hop over mutual TLS")
    up.set_defaults(func=_up)

    for role, what in (("router", "the Router service"), ("prefill", "a prefill node"), ("decode", "a decode node")):
        p = sub.add_parser(role, help=f"{what}")
        psub = p.add_subparsers(dest="action", metavar="ACTION")
        s = psub.add_parser("serve", help=f"serve {what} until SIGTERM / Ctrl-C")
        s.add_argument("--config", help="cluster YAML")
        s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (repeatable)")
        s.add_argument("--port", type=int, help=f"gRPC port (overrides {role}.port)")
        s.add_argument("--model", help="HF checkpoint directory, GGUF file or \"tiny\" (overrides model)")
        s.add_argument("--ready-file", help="write the bound addresses here as JSON once serving")
        s.set_defaults(func=_serve, role=role)
        p.set_defaults(func=lambda a, p=p: (p.print_help(), 0)[1])

    _add_client_commands(sub)

    _add_offline_command(sub)
    soak = sub.add_parser("soak", help="chaos soak: a local 2+2 cluster under load while faults are injected")
    soak.add_argument("--duration", type=float, default=600.0, help="seconds of load and faults (default 600)")
    soak.add_argument("--quick", action="store_true", help="about a minute")
    soak.add_argument("--workers", type=int, default=4)
    soak.add_argument("--seed", type=int, default=0)
    soak.set_defaults(func=_soak)
    _add_plan_command(sub)
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
