"""The gRPC client SDK (braid.client), torch-free, importing only braid.proto:
blocking and asyncio clients, streaming, deadlines, cancellation, typed errors.
In a request's life it is the first and the last step: it encodes the prompt
and sampling settings, and turns the router's stream into Chunks (and a
closed iterator into a cancel).

    from braid.client import Client

    with Client("127.0.0.1:50051", timeout=60) as client:
        for chunk in client.generate("Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="", flush=True)
"""
from braid.client.client import (
    DEFAULT_GENERATE_TIMEOUT_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_UNARY_TIMEOUT_S,
    AsyncClient,
    AsyncGenerateStream,
    Client,
    GenerateStream,
)
from braid.client.errors import (
    ERROR_CLASSES,
    Aborted,
    AlreadyExists,
    BraidError,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_for,
    error_from_rpc,
)
from braid.client.sampling import build_sampling, check_sampling, sampling_kwargs, validate_sampling
from braid.client.types import Chunk, Completion, Load, NodeStatus, Timings, TokenLogprob

__all__ = [
    "DEFAULT_GENERATE_TIMEOUT_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_UNARY_TIMEOUT_S",
    "ERROR_CLASSES",
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AsyncGenerateStream",
    "BraidError",
    "Cancelled",
    "Chunk",
    "Client",
    "Completion",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerateStream",
    "Internal",
    "InvalidArgument",
    "Load",
    "NodeStatus",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Timings",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "build_sampling",
    "check_sampling",
    "error_for",
    "error_from_rpc",
    "sampling_kwargs",
    "validate_sampling",
]
