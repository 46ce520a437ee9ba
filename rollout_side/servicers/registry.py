"""Registers servicers with deserializers that turn undecodable bytes into a clear INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

__all__ = ["Malformed", "add_service", "handler_factory"]


class Malformed:
    """Stands in for a request whose bytes did not parse; `grpc_errors` answers INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.type_name = type_name
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


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            # A deserializer that raises makes grpc log a traceback and answer UNKNOWN.
            return Malformed(name, error)

    return parse


def add_service(
    servicer: object,
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    raw_requests: frozenset[str] = frozenset(),
) -> None:
    """Registers every method of `service` on `servicer`; methods in `raw_requests` get raw bytes."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = handler_factory(method.client_streaming, method.server_streaming)
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=None if method.name in raw_requests else _tolerant(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
