"""The one boundary where weightsync errors become gRPC statuses."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from rollout_side.servicers.registry import Malformed
from weightsync import metrics
from weightsync.errors import BadRequest, WeightSyncError

__all__ = ["grpc_errors", "grpc_stream_errors"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def grpc_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Aborts the call with the error's status; unexpected errors are logged and INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            _check_parsed(request)
            return await handler(self, request, context)
        except WeightSyncError as error:
            metrics.Rollout.refused.labels(handler.__name__, error.code.name).inc()
            await context.abort(error.code, str(error))
        except Exception:
            logger.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{handler.__name__} failed; see the rollout's log")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def grpc_stream_errors(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """grpc_errors for server-streaming handlers."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            _check_parsed(request)
            async for item in handler(self, request, context):
                yield item
        except WeightSyncError as error:
            metrics.Rollout.refused.labels(handler.__name__, error.code.name).inc()
            await context.abort(error.code, str(error))
        except Exception:
            logger.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{handler.__name__} failed; see the rollout's log")

    return wrapper


def _check_parsed(request: Any) -> None:
    if isinstance(request, Malformed):
        raise BadRequest(f"request is not a valid {request.type_name}: {request.error}")
