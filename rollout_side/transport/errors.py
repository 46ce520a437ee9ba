"""The one boundary where weightsync errors become gRPC statuses."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from rollout_side.transport.registry import Unparsed
from weightsync import metrics
from weightsync.errors import Reason, WeightSyncError, to_status

__all__ = ["grpc_errors", "grpc_stream_errors"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A status message carries at most this much: gRPC sends it in a trailer, and a caller's input (a name,
# an id) quoted into it must never grow it past what the trailer limits allow.
MAX_STATUS_MESSAGE = 1024


def grpc_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Aborts the call with the error's status; unexpected errors are logged and INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            _check_parsed(request)
            return await handler(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status, in _abort
            await _abort(context, handler.__name__, error)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def grpc_stream_errors(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """grpc_errors for server-streaming handlers."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[T]:
        try:
            _check_parsed(request)
            async for item in handler(self, request, context):
                yield item
        except Exception as error:  # noqa: BLE001 - every error becomes a status, in _abort
            await _abort(context, handler.__name__, error)

    return wrapper


async def _abort(context: grpc.aio.ServicerContext[Any, Any], method: str, error: Exception) -> None:
    """The one place an error becomes a status: ours keep theirs, anything else is INTERNAL and logged."""
    if isinstance(error, WeightSyncError):
        metrics.Rollout.refused.labels(method, error.code.name).inc()
        message = str(error)
        if len(message) > MAX_STATUS_MESSAGE:
            message = message[: MAX_STATUS_MESSAGE - 40] + f"... ({len(message)} characters)"
        metadata = {k[:256]: v[:MAX_STATUS_MESSAGE] for k, v in error.metadata.items()}
        await context.abort_with_status(to_status(error.code, message, error.reason, metadata))
    logger.error("%s failed", method, exc_info=error)
    await context.abort_with_status(
        to_status(grpc.StatusCode.INTERNAL, f"{method} failed; see the rollout's log", Reason.INTERNAL)
    )


def _check_parsed(request: Any) -> None:
    """A request the registry did not parse (over its size limit, or malformed) is refused here."""
    if isinstance(request, Unparsed):
        raise request.error
