"""Typed errors of the client SDK: one class per gRPC status code.

Every class carries the status as `.code` (a `grpc.StatusCode`) and the server's
message as `.details`. `error_from_rpc` turns a `grpc.RpcError` (sync or aio)
into the matching class; servers can go the other way with
`await context.abort(err.code, err.details)`.
"""
from __future__ import annotations

from types import MappingProxyType

import grpc


class BraidError(Exception):
    """A failed call: `.code` is the gRPC status, `.details` the server's reason."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, code: grpc.StatusCode | None = None):
        self.code = code if code is not None else self.default_code
        self.details = details
        super().__init__(f"{self.code.name}: {details}" if details else self.code.name)


class Cancelled(BraidError):
    default_code = grpc.StatusCode.CANCELLED


class Unknown(BraidError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(BraidError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(BraidError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(BraidError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BraidError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(BraidError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(BraidError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(BraidError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(BraidError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRange(BraidError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(BraidError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(BraidError):
    default_code = grpc.StatusCode.INTERNAL


class Unavailable(BraidError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(BraidError):
    default_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(BraidError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


ERROR_CLASSES: MappingProxyType = MappingProxyType(
    {
        cls.default_code: cls
        for cls in (
            Cancelled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        )
    }
)
"""grpc.StatusCode -> its error class (every code but OK)."""


def error_for(code: grpc.StatusCode, details: str = "") -> BraidError:
    """The typed error for a status code (BraidError itself for a code with no class)."""
    cls = ERROR_CLASSES.get(code, BraidError)
    return cls(details, code=code)


def error_from_rpc(err: grpc.RpcError) -> BraidError:
    """Map a grpc.RpcError (sync call or grpc.aio.AioRpcError) to its typed error."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")
