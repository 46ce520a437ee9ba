"""Relay: a rollout forwards an update's chunks to further rollouts while it receives them.

The trainer's link, not its CPU, bounds a sync in a cluster: with a relay tree it sends each byte
once. A relay forwards each chunk only after verifying it (hop-by-hop checksums), and commits its
downstream only after committing itself. A downstream that fails never fails the relay: it is
reported in CommitResponse.relayed, and the trainer pushes to it directly instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from weightsync.channel import open_aio_channel, raw_push_chunks
from weightsync.relay_tree import subtree_addresses
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["Relay"]

logger = logging.getLogger(__name__)

WINDOW = 32  # chunks buffered per downstream before the upstream stream waits for it
_END = b""  # never a valid chunk message: an empty PushChunksRequest has no data


class _Downstream:
    """One downstream rollout: its own BeginUpdate, a chunk stream fed from a queue, its Commit."""

    def __init__(
        self,
        target: pb.RelayTarget,
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        self.address = target.address
        self.target = target
        self.metadata = metadata
        self.timeout = timeout
        self.channel = open_aio_channel(target.address, credentials)
        self.stub = pb_grpc.WeightSyncStub(self.channel)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(WINDOW)
        self.stream: asyncio.Task[pb.PushChunksResponse] | None = None
        self.error = ""

    async def begin(self, request: pb.BeginUpdateRequest) -> None:
        forwarded = pb.BeginUpdateRequest()
        forwarded.CopyFrom(request)
        del forwarded.relay_to[:]
        forwarded.relay_to.extend(self.target.downstream)
        try:
            await self.stub.BeginUpdate(forwarded, timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            self.fail(f"{error.code().name}: {error.details()}")
            return
        push = raw_push_chunks(self.channel)
        self.stream = asyncio.ensure_future(push(self._chunks(), metadata=self.metadata))
        self.stream.add_done_callback(self._ended)

    def _ended(self, stream: asyncio.Future[pb.PushChunksResponse]) -> None:
        """A stream that broke (the downstream died) must not leave the upstream waiting on its queue."""
        if not stream.cancelled() and stream.exception() is not None:
            self.fail(f"the chunk stream broke: {stream.exception()}")
        while not self.queue.empty():
            self.queue.get_nowait()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) != _END:
            yield chunk

    async def forward(self, raw: bytes) -> None:
        if self.error:
            return
        try:
            await asyncio.wait_for(self.queue.put(raw), self.timeout)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on, two on 3.10
            self.fail(f"took no chunk for {self.timeout:.0f} s")

    async def commit(self, request: pb.CommitRequest) -> list[pb.RelayResult]:
        if not self.error:
            await self.queue.put(_END)
            try:
                if self.stream is not None:
                    await self.stream
                answer = await self.stub.Commit(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as error:
                self.fail(f"{error.code().name}: {error.details()}")
            else:
                mine = pb.RelayResult(
                    address=self.address, ok=True, weight_version=answer.weight_version, fingerprint=answer.fingerprint
                )
                return [mine, *answer.relayed]
        await self.channel.close()
        return [pb.RelayResult(address=a, ok=False, error=self.error) for a in subtree_addresses([self.target])]

    def fail(self, reason: str) -> None:
        if not self.error:
            logger.warning("relay to %s failed: %s", self.address, reason)
            self.error = f"relay to {self.address} failed: {reason}"
        if self.stream is not None and not self.stream.done():
            self.stream.cancel()
        while not self.queue.empty():
            self.queue.get_nowait()  # unblocks a forward() waiting for room

    async def abort(self, update_id: str) -> None:
        self.fail("the update was dropped upstream")
        try:
            await self.stub.AbortUpdate(pb.AbortUpdateRequest(update_id=update_id), timeout=5, metadata=self.metadata)
        except grpc.aio.AioRpcError:
            pass  # it dropped the update itself when the stream broke
        await self.channel.close()


class Relay:
    """The downstream half of one update on a relaying rollout."""

    def __init__(
        self,
        targets: Sequence[pb.RelayTarget],
        metadata: tuple[tuple[str, str], ...],
        timeout: float = 60.0,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`credentials` reach the downstream rollouts over TLS (None: plaintext)."""
        self._downstream = [_Downstream(t, metadata, timeout, credentials) for t in targets]

    async def begin(self, request: pb.BeginUpdateRequest) -> None:
        await asyncio.gather(*(d.begin(request) for d in self._downstream))

    async def forward(self, raw: bytes) -> None:
        """Queues one verified chunk message, unchanged, for every downstream still healthy."""
        for downstream in self._downstream:
            await downstream.forward(raw)

    async def commit(self, request: pb.CommitRequest) -> list[pb.RelayResult]:
        """Passes the Commit on unchanged (checksums that follow the chunks included)."""
        results = await asyncio.gather(*(d.commit(request) for d in self._downstream))
        return [r for rs in results for r in rs]

    async def abort(self, update_id: str) -> None:
        await asyncio.gather(*(d.abort(update_id) for d in self._downstream))
