"""Bearer-token check on every call of a protected service, compared in constant time."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from rollout_side.transport.registry import handler_factory
from weightsync.errors import Reason, to_status

__all__ = ["ServerSecurity", "TokenAuthInterceptor"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerSecurity:
    """How a rollout guards itself: a token for WeightSync, optionally one for Generate, and TLS."""

    token: str | None = None
    generate_token: str | None = None
    tls: grpc.ServerCredentials | None = None
    relay: grpc.ChannelCredentials | None = None  # how it reaches the rollouts it relays to (None: plaintext)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        tokens = {"weightsync.v1.WeightSync": self.token, "weightsync.v1.Generate": self.generate_token}
        guarded = {service: token for service, token in tokens.items() if token}
        return [TokenAuthInterceptor(guarded)] if guarded else []


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to a protected service without the right `authorization: Bearer <token>`.

    `tokens` maps a service name ("weightsync.v1.WeightSync") to its token; services not listed
    (health, reflection, an open Generate) pass. Refusals say nothing that helps an attacker, and are
    decided from the call's metadata alone, before any of its request is read (see `_denying`).
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = {service: token.encode() for service, token in tokens.items()}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        service = details.method.lstrip("/").split("/", 1)[0]
        expected = self._tokens.get(service)
        if expected is None:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # no such method: grpc answers UNIMPLEMENTED
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            logger.warning("refused %s: no bearer token", details.method)
            return _denying(handler, grpc.StatusCode.UNAUTHENTICATED, "authentication required", Reason.UNAUTHENTICATED)
        if not hmac.compare_digest(presented.encode(), expected):
            logger.warning("refused %s: wrong token", details.method)
            return _denying(handler, grpc.StatusCode.PERMISSION_DENIED, "permission denied", Reason.PERMISSION_DENIED)
        return handler


def _denying(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str, reason: Reason
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that refuses the call without reading its request: not a byte is received or parsed.

    It takes the request as a stream whatever the method's shape (on the wire a unary request is a
    stream of one message), so grpc hands it an iterator it never consumes instead of a message it
    would first have to receive whole; HTTP/2 flow control then holds the caller's bytes back.
    """

    async def deny(requests: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(to_status(code, message, reason))

    make = handler_factory(True, handler.response_streaming)
    return make(deny, request_deserializer=None, response_serializer=handler.response_serializer)
