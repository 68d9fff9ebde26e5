"""`braid up`: a whole local cluster in one command (braid.cluster.launcher),
with parallel layouts fitted to the model before any process starts
(braid.cluster.parallel_fit). A component that fails to start leaves its log in
the work folder, which is kept and named; a clean shutdown removes it. With
`--tls` a throwaway CA and certificates are made in the work folder and every
gRPC hop (client, router, nodes) runs over mutual TLS. `--demo PROMPT` sends one
request and shuts down; as a chat when the model has a chat template."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from braid.cluster.config import load_config, read_data, to_dict
from braid.cluster.launcher import ComponentFailed, LocalCluster


def up_config(args):
    """The cluster config `braid up` runs and the model path, layouts fitted to the model."""
    from braid.cluster.parallel_fit import fit_parallel, share_cores
    from braid.engine.default_model import resolve_model
    from braid.engine.model_config import load_model_config

    data = read_data(args.config, args.set or [])
    if args.model:
        data["model"] = args.model
    cfg = load_config(data=data)
    model = resolve_model(cfg.model)
    explicit = {role for role in ("prefill", "decode") if "parallel" in (data.get(role) or {})}
    cfg, notes = fit_parallel(cfg, load_model_config(model), explicit, os.cpu_count() or 1)
    cfg = share_cores(cfg, os.cpu_count() or 1)  # every node of `braid up` runs on this host
    for note in notes:
        print(f"braid: {note}", flush=True)
    return cfg, model


def demo_as_chat(model: str) -> bool:
    """--demo sends its prompt as one user message when the model has a chat
    template (an instruct model such as the default SmolLM2 answers well only
    through it), else as plain text (the tiny model has none)."""
    from braid.tokenizer import Tokenizer

    try:
        return bool(Tokenizer(model).chat_template)
    except (FileNotFoundError, ValueError):
        return False


def _serve_until_interrupted(cluster: LocalCluster, args, stream) -> None:
    address = cluster.start()
    http = cluster.http_address
    print(f"braid: cluster up; router at {address} (gRPC); OpenAI HTTP API at "
          f"{('https://' if cluster.certs else 'http://') + http + '/v1' if http else 'off'}", flush=True)
    tls = cluster.client_tls("client")
    if tls:
        admin = cluster.client_tls("admin")
        print(f"braid: mutual TLS on every gRPC hop; certificates in {os.path.dirname(tls['ca'])}\n"
              f"braid:   braid generate TEXT --router {address} --ca {tls['ca']} --cert {tls['cert']} --key {tls['key']}\n"
              f"braid:   braid status --router {address} --ca {admin['ca']} --cert {admin['cert']} --key {admin['key']}",
              flush=True)
    if args.demo is not None:
        stream(address, args.demo, args.max_tokens, args.temperature, chat=demo_as_chat(cluster.config.model), **tls)
        return
    print("braid: Ctrl-C to stop", flush=True)
    while True:
        time.sleep(3600)


def run_up(args, stream) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, model = up_config(args)
    workdir = tempfile.mkdtemp(prefix="braid-up-")

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    cluster = None
    keep = False
    try:
        cluster = LocalCluster(workdir, data=to_dict(cfg), model=model, router_port=args.port,
                               tls=bool(getattr(args, "tls", False)))
        _serve_until_interrupted(cluster, args, stream)
    except KeyboardInterrupt:
        pass
    except ComponentFailed as e:
        keep = True
        print(f"braid: error: {e}\nbraid: logs kept in {workdir}", file=sys.stderr, flush=True)
    finally:
        print("braid: shutting down", flush=True)
        if cluster is not None:
            cluster.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if keep else 0
