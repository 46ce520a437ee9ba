"""weightsync.v1.WeightSync over gRPC: proto in, one call into rollout_side/update/core.py, proto out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from rollout_side.engines.installed import Verification
from rollout_side.transport.errors import grpc_errors
from rollout_side.transport.registry import add_service
from rollout_side.update.core import Announcement, Forward, Updates
from weightsync import wire
from weightsync.limits import check_update_id, weight_sync_request_limits
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["WeightSyncServicer", "add_weight_sync"]

Context = grpc.aio.ServicerContext[object, object]


class WeightSyncServicer(pb_grpc.WeightSyncServicer):  # type: ignore[misc]  # generated stubs are untyped
    def __init__(self, updates: Updates, model: str) -> None:
        self.updates = updates
        self.receiver = updates.receiver
        self.model = model

    @grpc_errors
    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.GetStatusResponse:
        if request.verify:
            await self.receiver.verify_installed()
        s = self.receiver.status()
        return pb.GetStatusResponse(
            weight_version=s.weight_version,
            fingerprint=s.fingerprint,
            state=pb.RolloutState.Name(s.phase.value),
            engine=self.receiver.engine.name,
            model=self.model,
            update_id=s.update_id,
            receiving_version=s.receiving_version,
            received_bytes=s.received_bytes,
            detail=s.detail,
            verification=_verification(s.verification) if s.verification else None,
            base_fingerprint=s.base_fingerprint,
            adapter_version=s.adapter_version,
        )

    @grpc_errors
    async def BeginUpdate(self, request: pb.BeginUpdateRequest, context: Context) -> pb.BeginUpdateResponse:
        check_update_id(request.update_id)  # before it is logged or shown in GetStatus
        # Thousands of tensors take a while to convert and check: off the event loop.
        manifest = await asyncio.to_thread(wire.manifest_from_proto, request.manifest)
        announced = Announcement(
            version=request.version,
            manifest=manifest,
            chunk_bytes=request.chunk_bytes,
            fingerprint=request.fingerprint,
            update_id=request.update_id,
            base_fingerprint=request.base_fingerprint,
            plan=wire.plan_from_proto(request.plan) if request.HasField("plan") else None,
            checksums_at_commit=request.checksums_at_commit,
            shared_memory_file=request.shared_memory_file,
            shared_memory_streamed=request.shared_memory_streamed,
            peer=context.peer() or "",
            adapter=wire.adapter_from_proto(request.adapter) if request.HasField("adapter") else None,
        )
        forward = Forward(targets=request.relay_to, request=request, metadata=_authorization(context))
        update = await self.updates.begin(announced, forward if request.relay_to else None)
        held = [pb.ChunkRange(start=start, end=end) for start, end in update.held_chunks()]
        return pb.BeginUpdateResponse(update_id=update.id, chunk_count=update.chunk_count, held_chunks=held)

    @grpc_errors
    async def PushChunks(self, request_iterator: AsyncIterator[bytes], context: Context) -> pb.PushChunksResponse:
        chunks, size = await self.updates.receive(request_iterator)
        return pb.PushChunksResponse(chunks=chunks, bytes=size)

    @grpc_errors
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        done = await self.updates.commit(request.update_id, list(request.checksums), request.fingerprint, request)
        return pb.CommitResponse(
            weight_version=done.version, fingerprint=done.fingerprint, swap_seconds=done.seconds, relayed=done.relayed
        )

    @grpc_errors
    async def AbortUpdate(self, request: pb.AbortUpdateRequest, context: Context) -> pb.AbortUpdateResponse:
        await self.updates.abort(request.update_id, "the trainer aborted it")
        return pb.AbortUpdateResponse()


def _authorization(context: Context) -> tuple[tuple[str, str], ...]:
    """The caller's bearer token, passed on to downstream rollouts (they share the trainer's token)."""
    return tuple((k, str(v)) for k, v in context.invocation_metadata() or () if k == "authorization")


def add_weight_sync(servicer: WeightSyncServicer, server: grpc.aio.Server) -> None:
    """Registers the service; PushChunks gets raw bytes, decoded in the core without copying.

    BeginUpdate and Commit are refused unparsed when larger than a manifest of this model can be.
    """
    limits = weight_sync_request_limits(len(servicer.receiver.engine.param_specs()))
    service = pb.DESCRIPTOR.services_by_name["WeightSync"]
    add_service(servicer, server, service, raw_requests=frozenset({"PushChunks"}), limits=limits)


def _verification(v: Verification) -> pb.InstalledVerification:
    return pb.InstalledVerification(
        weight_version=v.version,
        ok=v.ok,
        tensors=v.tensors,
        workers=v.workers,
        verified_at=v.at,
        seconds=v.seconds,
        mismatched=[*v.missing, *v.mismatched],
    )
