"""Wires a rollout together: engine -> receiver -> cores (updates, generation) -> servicers, health, reflection."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rollout_side.serving.generation import Generation, VersionGate
from rollout_side.transport.auth import ServerSecurity
from rollout_side.transport.generate import GenerateServicer
from rollout_side.transport.registry import add_service
from rollout_side.transport.weight_sync import WeightSyncServicer, add_weight_sync
from rollout_side.update.core import Updates
from rollout_side.update.lifecycle import Phase
from rollout_side.update.receiver import Receiver
from weightsync.cli import port_problem
from weightsync.limits import GENERATE_REQUEST_BYTES
from weightsync.memory import keep_freed_memory
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["GENERATE_SERVICE", "WEIGHT_SYNC_SERVICE", "BindError", "RolloutServer", "create_server"]

logger = logging.getLogger(__name__)

GENERATE_SERVICE = pb.DESCRIPTOR.services_by_name["Generate"].full_name
WEIGHT_SYNC_SERVICE = pb.DESCRIPTOR.services_by_name["WeightSync"].full_name
# A chunk plus its header; the receiver refuses chunk sizes above its own limit first.
MAX_MESSAGE_BYTES = 65 << 20
# Unread bytes one HTTP/2 stream may hold (its flow-control window). gRPC's BDP probing grows it from
# 4 MiB to twice its estimate, unbounded, for every stream of a connection, refused ones included: six
# wrong-token BeginUpdates grew RSS 27-61 MiB (19-38 pinned). Pinned at probing's own floor, a stream
# costs at most this: 1 and 2 MiB cut loopback pushes by 15% and 7% (measured). One stream then moves at
# most this per round trip: use more streams on long links.
STREAM_WINDOW_BYTES = 4 << 20


class BindError(OSError):
    """The server could not listen on its address; the message is one line saying why (port in use, ...)."""


def _why_not_bound(address: str) -> str:
    """gRPC says only "failed to bind": probe the address with a plain socket to say why."""
    host, _, port = address.rpartition(":")
    if port.isdigit():
        problem = port_problem(host, int(port))
        if problem:
            return problem
    return f"cannot listen on {address}"


class RolloutServer:
    """A started gRPC server and what it serves; `stop` shuts down in the safe order."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        receiver: Receiver,
        health: health.aio.HealthServicer,
        generation: Generation | None = None,
    ):
        self.server = server
        self.port = port
        self.receiver = receiver
        self.health = health
        # The Generate core, for other front ends over the same gate (rollout_side/serving/openai_api.py).
        self.generation = generation or Generation(receiver.engine, VersionGate(receiver.lifecycle))

    async def stop(self, grace: float = 5.0) -> None:
        """Reports NOT_SERVING first, so load balancers drain, then stops the server and the engine."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.receiver.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def create_server(
    receiver: Receiver, *, address: str = "127.0.0.1:0", model: str = "", security: ServerSecurity | None = None
) -> RolloutServer:
    """Starts serving on `address` (port 0 picks a free one) and returns the server and its port.

    WeightSync is SERVING as soon as the server is up; Generate only while the engine holds a
    committed version, so a readiness probe on weightsync.v1.Generate gates traffic.
    """
    keep_freed_memory()  # grpc allocates every received chunk afresh: reuse warm pages, not new ones
    security = security or ServerSecurity()
    server = grpc.aio.server(
        interceptors=security.interceptors(),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default: a second rollout on a busy port would bind and split the
            # connections with the first. Off, binding a busy port fails: one address, one rollout.
            ("grpc.so_reuseport", 0),
            # Flow control pinned, not probed: see STREAM_WINDOW_BYTES.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            # Probing also raises the largest frame to the window: keep it there, not at 16 KiB.
            ("grpc.http2.max_frame_size", STREAM_WINDOW_BYTES),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_weight_sync(WeightSyncServicer(Updates(receiver, relay_credentials=security.relay), model), server)
    generation = Generation(receiver.engine, VersionGate(receiver.lifecycle))
    limits = {"Generate": GENERATE_REQUEST_BYTES, "GenerateStream": GENERATE_REQUEST_BYTES}
    add_service(GenerateServicer(generation), server, pb.DESCRIPTOR.services_by_name["Generate"], limits=limits)
    reflection.enable_server_reflection(
        (GENERATE_SERVICE, WEIGHT_SYNC_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_secure_port(address, security.tls) if security.tls else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises "Failed to bind to address ..." (older versions returned 0)
        port = 0
    if port == 0:
        raise BindError(_why_not_bound(address))
    await server.start()

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", serving)
    await health_servicer.set(WEIGHT_SYNC_SERVICE, serving)

    async def publish(phase: Phase) -> None:
        ready = receiver.lifecycle.served.ready and phase in (Phase.SERVING, Phase.RECEIVING)
        await health_servicer.set(GENERATE_SERVICE, serving if ready else not_serving)

    receiver.add_listener(publish)
    await publish(receiver.status().phase)
    logger.info("rollout listening on %s (engine %s)", address.rsplit(":", 1)[0] + f":{port}", receiver.engine.name)
    return RolloutServer(server, port, receiver, health_servicer, generation)
