"""Engine exceptions -> gRPC status codes, shared by the node servicers."""
from __future__ import annotations

import grpc

from braid.engine.async_engine import EngineDead
from braid.engine.events import DuplicateRequest, Overloaded, UnknownRequest
from braid.engine.scheduler import RequestRejected


def status_for(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a node answers for an exception raised while handling a request."""
    if isinstance(e, DuplicateRequest):  # before ValueError: the id is taken, the request may be fine
        return grpc.StatusCode.ALREADY_EXISTS, str(e)
    if isinstance(e, (RequestRejected, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, UnknownRequest):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, EngineDead):
        return grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}"
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


def sampling_from(pb):
    """engine SamplingParams from the wire message (ValueError with the reason)."""
    from braid.engine.sampling import SamplingParams
    from braid.proto.sampling_rules import sampling_kwargs

    return SamplingParams(**sampling_kwargs(pb))
