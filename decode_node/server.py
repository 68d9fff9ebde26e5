"""The DecodeNode service: reservations with leases, the decode stream, abort, load.

A remotely prefilled request:
  Reserve   blocks for the prompt under a lease; every rank expects its bytes;
            the reply's KVDestination is built here from the engine's
            Reservation and the instance's KV layout
  Decode    claims the reservation in the engine (an unknown one: NOT_FOUND);
            the stream yields nothing until the KV and the first token have
            arrived, then streams tokens as they are decoded
  Abort     at any point: cancels the receivers, then frees the blocks
Reserve is capped (transfer.max_lease_s: a longer lease is refused INVALID_ARGUMENT;
transfer.max_reservations held at once: one more is RESOURCE_EXHAUSTED), so a flood
of Reserve calls cannot take every block. Each reservation gets a random secret,
carried in its KVDestination: the decode ranks take KV only from a sender that
presents it.
The engine keeps the lease's one timer: if the reservation is not claimed and
its KV arrived before the lease ends, or the transfer fails, the engine frees
the blocks and the stream ends with ABORTED (the router may retry with another
prefill node).
"""
from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import Gauge

from braid.node.errors import sampling_from, status_for
from braid.node.logprobs import events_to_pb, prompt_to_pb
from braid.node.runtime import NodeRuntime, start_node
from braid.proto import common_pb2, nodes_pb2, nodes_pb2_grpc
from braid.proto.names import FINISH_REASONS_BY_NAME

log = logging.getLogger(__name__)

SERVICE = nodes_pb2.DESCRIPTOR.services_by_name["DecodeNode"].full_name


class DecodeServicer(nodes_pb2_grpc.DecodeNodeServicer):
    def __init__(self, runtime: NodeRuntime):
        self.rt = runtime
        Gauge("braid_node_kv_rejected_frames", "KV frames dropped because their connection did not present the "
              "reservation's secret (rank 0's receiver; a running count)",
              registry=runtime.metrics.registry).set_function(self.rejected_frames)

    @property
    def engine(self):
        return self.rt.engine

    def rejected_frames(self) -> int:
        """Frames rank 0's KV receiver dropped for want of the reservation's secret."""
        try:
            return self.engine.core.executor.driver.connector.receiver.rejected_frames
        except AttributeError:  # no engine (stopped) or no receiver
            return 0

    async def _refuse_if_not_accepting(self, context) -> None:
        if not self.rt.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode node {self.rt.node_id} is not accepting work")

    async def Reserve(self, request, context):
        await self._refuse_if_not_accepting(context)
        rid = request.request_id
        try:
            params = sampling_from(request.sampling)
            if not rid:
                raise ValueError("request_id is empty")
            lease = request.lease_s if request.lease_s > 0 else 60.0
            res = await self.engine.call(lambda c: c.reserve(rid, list(request.prompt_token_ids), params, lease))
        except Exception as e:  # noqa: BLE001 - mapped to a status
            code, msg = status_for(e)
            self.rt.metrics.requests.labels("Reserve", code.name).inc()
            await context.abort(code, msg)
        self.rt.metrics.requests.labels("Reserve", "OK").inc()
        return nodes_pb2.ReserveResponse(destination=self._destination(res))

    def _destination(self, res) -> common_pb2.KVDestination:
        """The wire form of an engine Reservation, with this instance's KV layout."""
        core = self.engine.core
        return common_pb2.KVDestination(
            layout=core.kv_layout,
            block_ids=res.block_ids,
            transfer_id=res.transfer_id,
            transport=core.config.transfer.transport,
            lease_deadline_unix=res.lease_deadline_unix,
            num_tokens=res.num_tokens,
            decode_node_id=self.rt.node_id,
            secret=res.secret,
            cached_blocks=res.cached_blocks,
        )

    async def Decode(self, request, context):
        rid = request.request_id
        started = time.monotonic()
        if request.local_prefill:
            await self._refuse_if_not_accepting(context)
            queue = None
            try:
                params = sampling_from(request.sampling)
                if not rid:
                    raise ValueError("request_id is empty")
                queue = self.engine.subscribe_new(rid)  # ALREADY_EXISTS: another stream holds the id
                await self.engine.call(lambda c: c.add_request(list(request.prompt_token_ids), params, rid))
            except Exception as e:  # noqa: BLE001
                if queue is not None:  # only our own queue: never the holder's
                    self.engine.unsubscribe(rid)
                code, msg = status_for(e)
                await context.abort(code, msg)
        else:
            queue = None
            try:
                queue = self.engine.subscribe_new(rid)  # before the claim: its events come from then on
                await self.engine.call(lambda c: c.claim(rid))
            except Exception as e:  # noqa: BLE001 - NOT_FOUND for an unknown reservation
                if queue is not None:
                    self.engine.unsubscribe(rid)
                code, msg = status_for(e)
                await context.abort(code, msg)
        self.rt.inflight += 1
        wants_logprobs = request.sampling.HasField("logprobs")  # the router sends it on both paths when asked
        finished = False
        first = True
        try:
            while not finished:
                ev = await queue.get()
                batch = [ev]
                while not ev.finished and not queue.empty():
                    ev = queue.get_nowait()
                    batch.append(ev)
                if ev.finish_reason == "error":
                    finished = True  # the engine already released everything
                    code = grpc.StatusCode.ABORTED if first else grpc.StatusCode.UNAVAILABLE
                    self.rt.metrics.transfer_failures.inc()
                    await context.abort(code, ev.error or "request failed")
                finished = ev.finished
                msg = _message(batch, wants_logprobs)
                if first:
                    msg.kv_ready_s = time.monotonic() - started
                    msg.cached_tokens = batch[0].cached_tokens
                    first = False
                yield msg
            self.rt.metrics.requests.labels("Decode", "OK").inc()
        finally:
            self.rt.inflight -= 1
            self.engine.unsubscribe(rid)
            if not finished:  # client went away or the stream broke: free everything now
                await self._abort(rid)

    async def _abort(self, rid: str) -> bool:
        try:
            return await self.engine.call(lambda c: c.abort(rid))
        except Exception:  # noqa: BLE001 - a dead engine has nothing left to free
            return False

    async def Abort(self, request, context):
        found = await self._abort(request.request_id)
        self.engine.unsubscribe(request.request_id)
        return common_pb2.AbortResponse(found=found)

    async def GetLoad(self, request, context):
        return await self.rt.get_load(context, request)  # UNAVAILABLE once the engine died


def _message(batch: list, wants_logprobs: bool) -> nodes_pb2.DecodeResponse:
    """One DecodeResponse for a batch of the request's events (the last may end it), with
    one TokenLogprobs per token when asked and the prompt's on the first token's event."""
    ev = batch[-1]
    msg = nodes_pb2.DecodeResponse(token_ids=[e.token_id for e in batch if e.token_id is not None],
                                   finished=ev.finished)
    if wants_logprobs:
        msg.logprobs.extend(events_to_pb(batch))
    msg.prompt_logprobs.extend(prompt_to_pb(batch[0].prompt_logprobs))
    if ev.finished:
        msg.finish_reason = FINISH_REASONS_BY_NAME.get(ev.finish_reason, common_pb2.FINISH_REASON_UNSPECIFIED)
    return msg


async def start_decode_node(node, model_path: str, discovery) -> tuple[NodeRuntime, DecodeServicer]:
    """Start a decode node (a NodeConfig, the model, a DiscoveryConfig); returns its runtime and servicer."""
    return await start_node("decode", node, model_path, discovery, DecodeServicer,
                            nodes_pb2_grpc.add_DecodeNodeServicer_to_server, SERVICE)
