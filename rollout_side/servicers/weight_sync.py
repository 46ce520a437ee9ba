"""weightsync.v1.WeightSync: proto in, receiver call, proto out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from rollout_side.receiver import Receiver
from rollout_side.relay import Relay
from rollout_side.servicers.errors import grpc_errors
from rollout_side.servicers.registry import add_service
from weightsync import wire
from weightsync.errors import SharedMemoryRefused
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["WeightSyncServicer", "add_weight_sync"]

logger = logging.getLogger(__name__)


class WeightSyncServicer(pb_grpc.WeightSyncServicer):
    def __init__(
        self, receiver: Receiver, model: str, *, relay_credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.receiver = receiver
        self.model = model
        self.relay_credentials = relay_credentials  # for the rollouts this one relays to; None: plaintext
        self._relays: dict[str, Relay] = {}  # update id -> its downstream, on a relaying rollout
        self._aborting: set[asyncio.Future[None]] = set()

    @grpc_errors
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        s = self.receiver.status()
        return pb.GetStatusResponse(
            weight_version=s.weight_version,
            fingerprint=s.fingerprint,
            state=s.phase.value,  # type: ignore[arg-type]
            engine=self.receiver.engine.name,
            model=self.model,
            update_id=s.update_id,
            receiving_version=s.receiving_version,
            received_bytes=s.received_bytes,
            detail=s.detail,
        )

    @grpc_errors
    async def BeginUpdate(
        self, request: pb.BeginUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.BeginUpdateResponse:
        manifest = wire.manifest_from_proto(request.manifest)
        plan = wire.plan_from_proto(request.plan) if request.HasField("plan") else None
        # A background copy may still be bringing the spare (the next staging buffer) up to date.
        await self.receiver.settle(delta=bool(request.base_fingerprint))
        update = self.receiver.begin(
            request.version,
            manifest,
            request.chunk_bytes,
            request.fingerprint,
            request.update_id,
            base_fingerprint=request.base_fingerprint,
            plan=plan,
            checksums_at_commit=request.checksums_at_commit,
        )
        if request.shared_memory_file:
            if request.relay_to:
                self.receiver.abort(update.id, "relay_to with a shared-memory file")
                raise SharedMemoryRefused("a shared-memory file is read here; it cannot also be relayed")
            if request.shared_memory_streamed:  # still being written: PushChunks says how far
                self.receiver.open_file(update.id, request.shared_memory_file)
            else:
                await self.receiver.stage_file(update.id, request.shared_memory_file)
        if request.relay_to:
            relay = Relay(request.relay_to, _authorization(context), credentials=self.relay_credentials)
            self._relays[update.id] = relay
            await relay.begin(request)
        return pb.BeginUpdateResponse(update_id=update.id, chunk_count=update.chunk_count)

    @grpc_errors
    async def PushChunks(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushChunksResponse:
        chunks = size = 0
        update_id = ""
        try:
            async for raw in request_iterator:
                chunk = wire.decode_chunk(raw)
                update_id = chunk.update_id
                if chunk.file_bytes:  # how far a co-located trainer has written its file
                    size += await self.receiver.read_file(update_id, chunk.file_bytes)
                else:
                    size += self.receiver.put_chunk(chunk.update_id, chunk.index, chunk.checksum, chunk.data)
                chunks += 1
                if relay := self._relays.get(chunk.update_id):
                    await relay.forward(raw)  # verified above: each hop checks before passing on
        except BaseException as error:
            # Whatever broke the stream (bad chunk, cancelled call, dead trainer), the update is void.
            self._drop(update_id, f"the chunk stream failed: {error or type(error).__name__}")
            raise
        return pb.PushChunksResponse(chunks=chunks, bytes=size)

    @grpc_errors
    async def Commit(self, request: pb.CommitRequest, context: grpc.aio.ServicerContext) -> pb.CommitResponse:
        relay = self._relays.pop(request.update_id, None)
        try:
            version, fingerprint, seconds = await self.receiver.commit(
                request.update_id, list(request.checksums), request.fingerprint
            )
        except BaseException:
            if relay is not None:
                await relay.abort(request.update_id)
            raise
        relayed = await relay.commit(request) if relay is not None else []
        return pb.CommitResponse(weight_version=version, fingerprint=fingerprint, swap_seconds=seconds, relayed=relayed)

    @grpc_errors
    async def AbortUpdate(
        self, request: pb.AbortUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortUpdateResponse:
        self.receiver.abort(request.update_id, "the trainer aborted it")
        if relay := self._relays.pop(request.update_id, None):
            await relay.abort(request.update_id)
        return pb.AbortUpdateResponse()

    def _drop(self, update_id: str, reason: str) -> None:
        if update_id and self.receiver.status().update_id == update_id:
            self.receiver.abort(update_id, reason)
        if relay := self._relays.pop(update_id, None):
            # The downstream streams break with ours; each downstream drops the update itself.
            task = asyncio.ensure_future(relay.abort(update_id))
            self._aborting.add(task)
            task.add_done_callback(self._aborting.discard)


def _authorization(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The caller's bearer token, passed on to downstream rollouts (they share the trainer's token)."""
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k == "authorization")


def add_weight_sync(servicer: WeightSyncServicer, server: grpc.aio.Server) -> None:
    """Registers the service; PushChunks gets raw bytes, decoded in the handler without copying."""
    add_service(servicer, server, pb.DESCRIPTOR.services_by_name["WeightSync"], raw_requests=frozenset({"PushChunks"}))
