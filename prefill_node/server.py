"""The PrefillNode service: prefill a prompt (PCP) and push its KV into a
decode node's reserved blocks, layer by layer; reply once the decode node
acknowledged every block and the first token.

A prefill that fails (a dead or stalled receiver, a deadline) ends in ABORTED
or DEADLINE_EXCEEDED with its blocks freed; a cancelled call aborts the
request at once. The node serves other requests throughout. A destination
this node cannot push into (no or too many block ids, another token count,
an incompatible layout, an unparsable endpoint) is refused INVALID_ARGUMENT
on arrival, before the engine sees the request.
"""
from __future__ import annotations

import asyncio
import os
import time

import grpc

from braid.engine.kv_connector.types import TransferTarget, check_target
from braid.node.errors import sampling_from, status_for
from braid.node.logprobs import prompt_to_pb, to_pb
from braid.node.runtime import NodeRuntime, start_node
from braid.proto import common_pb2, nodes_pb2, nodes_pb2_grpc

SERVICE = nodes_pb2.DESCRIPTOR.services_by_name["PrefillNode"].full_name


def target_from(dest: common_pb2.KVDestination) -> TransferTarget:
    """The engine's form of the decode node's KVDestination."""
    return TransferTarget(dest.transfer_id, dest.layout, tuple(dest.block_ids), dest.num_tokens, bytes(dest.secret),
                          dest.cached_blocks)


class PrefillServicer(nodes_pb2_grpc.PrefillNodeServicer):
    def __init__(self, runtime: NodeRuntime):
        self.rt = runtime
        # failure injection for tests: hold each prefill this long before running it
        self.fault_delay_s = float(os.environ.get("BRAID_FAULT_PREFILL_DELAY_S", "0") or 0)

    @property
    def engine(self):
        return self.rt.engine

    async def Prefill(self, request, context):
        if not self.rt.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill node {self.rt.node_id} is not accepting work")
        rid = request.request_id
        remaining = context.time_remaining()
        timeout = self.rt.node.transfer.timeout_s
        if remaining is not None:
            timeout = max(0.1, min(timeout, remaining))
        started = time.monotonic()
        if self.fault_delay_s:
            await asyncio.sleep(self.fault_delay_s)
        queue = None
        try:
            params = sampling_from(request.sampling)
            if not rid:
                raise ValueError("request_id is empty")
            if not request.HasField("destination"):
                raise ValueError("destination is missing")
            target = target_from(request.destination)
            core = self.engine.core  # its layout and transport are fixed at start: read without the engine thread
            check_target(target, core.kv_layout, core.config.transfer.transport, len(request.token_ids))
            queue = self.engine.subscribe_new(rid)  # ALREADY_EXISTS: a prefill with this id is running
            await self.engine.call(lambda c: c.add_transfer_request(rid, list(request.token_ids), params, target, timeout))
        except Exception as e:  # noqa: BLE001 - mapped to a status
            if queue is not None:  # only our own queue: never the holder's
                self.engine.unsubscribe(rid)
            code, msg = status_for(e)
            self.rt.metrics.requests.labels("Prefill", code.name).inc()
            await context.abort(code, msg)
        self.rt.inflight += 1
        done = False
        try:
            ev = await queue.get()
            done = True
            if ev.finish_reason != "transferred":
                self.rt.metrics.transfer_failures.inc()
                self.rt.metrics.requests.labels("Prefill", "ABORTED").inc()
                await context.abort(grpc.StatusCode.ABORTED, ev.error or "KV transfer failed")
            elapsed = time.monotonic() - started
            stats = ev.stats or {}
            self.rt.metrics.prefill_s.observe(elapsed)
            self.rt.metrics.kv_bytes.inc(stats.get("kv_bytes", 0))
            self.rt.metrics.requests.labels("Prefill", "OK").inc()
            return _response(ev, stats, elapsed)
        finally:
            self.rt.inflight -= 1
            self.engine.unsubscribe(rid)
            if not done:  # cancelled or deadline: free the blocks and stop sending now
                try:
                    await self.engine.call(lambda c: c.abort(rid))
                except Exception:  # noqa: BLE001
                    pass

    async def Abort(self, request, context):
        rid = request.request_id
        try:
            found = await self.engine.call(lambda c: c.abort(rid))
        except Exception:  # noqa: BLE001
            found = False
        self.engine.unsubscribe(rid)
        return common_pb2.AbortResponse(found=found)

    async def GetLoad(self, request, context):
        return await self.rt.get_load(context, request)  # UNAVAILABLE once the engine died


def _response(ev, stats: dict, elapsed: float) -> nodes_pb2.PrefillResponse:
    """The reply for a delivered transfer: the first token, timings, and the logprobs asked for."""
    resp = nodes_pb2.PrefillResponse(
        first_token=ev.token_id,
        prefill_s=stats.get("prefill_s", elapsed),
        transfer_s=stats.get("transfer_s", 0.0),
        kv_bytes=stats.get("kv_bytes", 0),
        prompt_logprobs=prompt_to_pb(ev.prompt_logprobs),
        cached_tokens=ev.cached_tokens,
    )
    if ev.logprobs is not None:  # the first token was sampled here: its logprobs travel in this reply
        resp.first_logprobs.CopyFrom(to_pb(ev.logprobs))
    return resp


async def start_prefill_node(node, model_path: str, discovery) -> tuple[NodeRuntime, PrefillServicer]:
    """Start a prefill node (a NodeConfig, the model, a DiscoveryConfig); returns its runtime and servicer."""
    return await start_node("prefill", node, model_path, discovery, PrefillServicer,
                            nodes_pb2_grpc.add_PrefillNodeServicer_to_server, SERVICE)
