"""gRPC channels to a rollout, made one way by everyone who opens one: the trainer's client, a relaying
rollout and the tests that drive the protocol by hand.

Chunks travel pre-encoded (weightsync/wire.py encodes each once for all rollouts), so PushChunks is
called through a raw stream that sends bytes as they are, not through the generated stub.
"""

from __future__ import annotations

import socket
from typing import overload

import grpc
import grpc.aio

from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["CHANNEL_OPTIONS", "PUSH_CHUNKS", "listening", "open_aio_channel", "open_channel", "raw_push_chunks"]

# A chunk message is up to 64 MiB of payload plus its header. After a failed connect gRPC waits before
# trying again, by default growing to 2 min (and shared by every channel to that address): a rollout
# that restarts or boots would be pushed to that late. Rollouts are few and near: retry within 1 s.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 65 << 20),
    ("grpc.max_receive_message_length", 65 << 20),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

PUSH_CHUNKS = "/weightsync.v1.WeightSync/PushChunks"


def listening(address: str, timeout: float = 1.0) -> bool:
    """Whether a rollout's address accepts a connection now: a plain connect, no gRPC.

    Asked before gRPC is when waiting for a rollout to listen: a gRPC channel whose connection failed
    waits before it tries again (shared by every channel to that address; capped above), so calling a
    rollout before it listens would notice it late, and a status call per look would cost more.
    HOST:PORT and unix:PATH; True for any other target (gRPC will tell).
    """
    target: str | tuple[str, int]
    if address.startswith("unix:"):
        family, target = socket.AF_UNIX, address[len("unix:") :]
    else:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            return True
        family, target = socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(target)
        except OSError:
            return False
    return True


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A blocking channel to `address`, over TLS with `credentials`, else in plaintext."""
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def open_aio_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address`, over TLS with `credentials`, else in plaintext."""
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


@overload
def raw_push_chunks(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable[bytes, pb.PushChunksResponse]: ...
@overload
def raw_push_chunks(
    channel: grpc.aio.Channel,
) -> grpc.aio.StreamUnaryMultiCallable[bytes, pb.PushChunksResponse]: ...
def raw_push_chunks(
    channel: grpc.Channel | grpc.aio.Channel,
) -> (
    grpc.StreamUnaryMultiCallable[bytes, pb.PushChunksResponse]
    | grpc.aio.StreamUnaryMultiCallable[bytes, pb.PushChunksResponse]
):
    """PushChunks on `channel`, taking chunk messages already encoded (wire.encode_chunk) as they are."""
    return channel.stream_unary(
        PUSH_CHUNKS,
        request_serializer=None,
        response_deserializer=pb.PushChunksResponse.FromString,
    )
