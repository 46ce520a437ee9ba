"""Registers servicers so that limits come before work: every request arrives as raw bytes.

gRPC is told to deserialize nothing. Each unary request is measured against its method's size limit
first, then parsed here (off the event loop when large); a request over its limit, or whose bytes do
not parse, reaches the servicer as an `Unparsed` that `grpc_errors` answers with its status
(RESOURCE_EXHAUSTED or INVALID_ARGUMENT), without a byte of it parsed. Authentication
(rollout_side/transport/auth.py) runs before any of this and, when it refuses, reads no request at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from weightsync.errors import BadRequest, TooLarge, WeightSyncError
from weightsync.limits import PARSE_INLINE_BYTES, SMALL_REQUEST_BYTES

__all__ = ["PARSE_INLINE_BYTES", "Unparsed", "add_service", "handler_factory", "parse_request"]


class Unparsed:
    """Stands in for a request that was not parsed: too large, or not valid protobuf. `error` says which."""

    def __init__(self, error: WeightSyncError) -> None:
        self.error = error


def handler_factory(
    request_streaming: bool, response_streaming: bool
) -> Callable[..., grpc.RpcMethodHandler[Any, Any]]:
    """grpc's constructor for a method handler of this streaming shape."""
    return {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(request_streaming, response_streaming)]


async def parse_request(message_class: Any, data: bytes, limit: int) -> Any:
    """`data` as a `message_class`, or an Unparsed if it is over `limit` bytes (checked first) or malformed."""
    name = message_class.DESCRIPTOR.full_name
    if len(data) > limit:
        return Unparsed(TooLarge(f"a {name} of {len(data)} bytes is over this rollout's limit of {limit}"))

    def parse() -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            # A deserializer that raises makes grpc log a traceback and answer UNKNOWN.
            return Unparsed(BadRequest(f"request is not a valid {name}: {error}"))

    return parse() if len(data) <= PARSE_INLINE_BYTES else await asyncio.to_thread(parse)


def _unary(method: Callable[..., Any], message_class: Any, limit: int) -> Callable[..., Any]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await method(await parse_request(message_class, data, limit), context)

    return handle


def _unary_stream(method: Callable[..., Any], message_class: Any, limit: int) -> Callable[..., Any]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for item in method(await parse_request(message_class, data, limit), context):
            yield item

    return handle


def add_service(
    servicer: object,
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    raw_requests: frozenset[str] = frozenset(),
    limits: Mapping[str, int] | None = None,
) -> None:
    """Registers every method of `service` on `servicer`.

    Methods in `raw_requests` (client-streaming) get the raw message bytes; every other request is
    parsed here after its size is checked against `limits[method]` (SMALL_REQUEST_BYTES if unlisted).
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        call = getattr(servicer, method.name)
        if method.name not in raw_requests:
            if method.client_streaming:
                raise ValueError(f"{method.name}: client-streaming methods take raw bytes (raw_requests)")
            limit = (limits or {}).get(method.name, SMALL_REQUEST_BYTES)
            call = (_unary_stream if method.server_streaming else _unary)(call, request, limit)
        make = handler_factory(method.client_streaming, method.server_streaming)
        handlers[method.name] = make(call, request_deserializer=None, response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
