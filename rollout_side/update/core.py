"""The WeightSync calls as one core: an update's bytes from chunks or a shared-memory file, relayed onwards if asked.

transport/weight_sync.py converts protobuf and calls one method here per RPC. This module decides
what combines with what (a shared-memory file is read here, so it cannot also be relayed), keeps
the downstream relay of each update (rollout_side/transport/relay.py) and drops both halves together when the
chunk stream breaks. The requests a relay passes on travel through here unopened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rollout_side.transport.relay import Relay
from rollout_side.update.incoming import Incoming
from rollout_side.update.lifecycle import Phase
from rollout_side.update.receiver import Receiver
from weightsync import wire
from weightsync.adapter import AdapterConfig
from weightsync.delta import TransferPlan
from weightsync.errors import ChunkCorrupt, SharedMemoryRefused
from weightsync.manifest import Manifest

if TYPE_CHECKING:
    import grpc

    from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["Announcement", "Committed", "Forward", "Updates"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Announcement:
    """A trainer's BeginUpdate: the version, its layout, and where its bytes will come from."""

    version: int
    manifest: Manifest
    chunk_bytes: int
    fingerprint: str = ""
    update_id: str = ""
    base_fingerprint: str = ""  # set: a delta against this version
    plan: TransferPlan | None = None
    checksums_at_commit: bool = False
    shared_memory_file: str = ""  # set: the bytes come from this file, not in chunks
    shared_memory_streamed: bool = False  # the file is still being written; PushChunks says how far
    peer: str = ""  # who announced it, as gRPC names the caller (named when a second trainer is refused)
    adapter: AdapterConfig | None = None  # set: a LoRA adapter to merge into the base it names


@dataclass(frozen=True, kw_only=True, slots=True)
class Forward:
    """Rollouts to relay an update to, and the request to pass them (unchanged but for their own subtree)."""

    targets: Sequence[pb.RelayTarget]
    request: pb.BeginUpdateRequest
    metadata: tuple[tuple[str, str], ...] = ()  # the caller's authorization, passed on


@dataclass(frozen=True, kw_only=True, slots=True)
class Committed:
    version: int
    fingerprint: str
    seconds: float
    relayed: list[pb.RelayResult] = field(default_factory=list)  # each downstream rollout's outcome


class Updates:
    """Updates on one rollout, with their downstream relays."""

    def __init__(self, receiver: Receiver, *, relay_credentials: grpc.ChannelCredentials | None = None) -> None:
        self.receiver = receiver
        self.relay_credentials = relay_credentials  # for the rollouts this one relays to; None: plaintext
        self._relays: dict[str, Relay] = {}  # update id -> its downstream, on a relaying rollout
        self._aborting: set[asyncio.Future[None]] = set()
        receiver.add_listener(self._phase_changed)

    async def begin(self, announced: Announcement, forward: Forward | None = None) -> Incoming:
        """Accepts, resumes or refuses an update; reads its file if it is complete; starts relaying it if asked.

        A relaying rollout never resumes: it forwards what it receives, and downstream may lack other chunks.
        """
        resumable = forward is None and not announced.shared_memory_file
        self.receiver.drop_interrupted(
            announced.version,
            announced.manifest,
            announced.chunk_bytes,
            announced.plan,
            announced.base_fingerprint,
            resumable=resumable,
            adapter=announced.adapter,
        )
        # A background copy may still be bringing the spare (the next staging buffer) up to date.
        await self.receiver.settle(delta=bool(announced.base_fingerprint))
        if announced.adapter is None:
            await self.receiver.reserve(announced.manifest.total_bytes)
        else:  # a copy of its base, and a buffer for the merged version
            await self.receiver.prepare_adapter(announced.adapter)
        update = self.receiver.begin(
            announced.version,
            announced.manifest,
            announced.chunk_bytes,
            announced.fingerprint,
            announced.update_id,
            base_fingerprint=announced.base_fingerprint,
            plan=announced.plan,
            checksums_at_commit=announced.checksums_at_commit,
            peer=announced.peer,
            resumable=resumable,
            adapter=announced.adapter,
        )
        if announced.shared_memory_file:
            if forward is not None:
                self.receiver.abort(update.id, "relay_to with a shared-memory file")
                raise SharedMemoryRefused("a shared-memory file is read here; it cannot also be relayed")
            if announced.shared_memory_streamed:
                self.receiver.open_file(update.id, announced.shared_memory_file)
            else:
                await self.receiver.stage_file(update.id, announced.shared_memory_file)
        if forward is not None:
            relay = Relay(forward.targets, forward.metadata, credentials=self.relay_credentials)
            self._relays[update.id] = relay
            await relay.begin(forward.request)
        return update

    async def receive(self, messages: AsyncIterable[bytes]) -> tuple[int, int]:
        """Takes a PushChunks stream of encoded chunks (or file progress); returns (messages, bytes) taken.

        Each chunk is verified before it is relayed: every hop checks what it passes on. A stream feeds
        one update, named by its first message. When the last stream feeding an update ends without
        every chunk, or fails, the update is interrupted (held for a resume), and its relay dropped: a
        trainer's death reads here as an early end of the stream, not as an error.
        """
        count = size = 0
        update: Incoming | None = None
        try:
            async for raw in messages:
                chunk = wire.decode_chunk(raw)
                if update is None:
                    update = self.receiver.stream_opened(chunk.update_id)
                elif chunk.update_id != update.id:
                    raise ChunkCorrupt(f"a stream feeds one update: {update.id!r}, not {chunk.update_id!r}")
                if chunk.file_bytes:  # how far a co-located trainer has written its file
                    size += await self.receiver.read_file(update.id, chunk.file_bytes)
                else:
                    size += self.receiver.put_chunk(update.id, chunk.index, chunk.checksum, chunk.data)
                count += 1
                if relay := self._relays.get(update.id):
                    await relay.forward(raw)
        except BaseException as error:
            if update is not None:
                self._closed(update, str(error) or type(error).__name__)
            raise
        if update is not None:
            self._closed(update)
        return count, size

    async def commit(
        self, update_id: str, checksums: Sequence[str], fingerprint: str, request: pb.CommitRequest
    ) -> Committed:
        """Commits here, then downstream (passing `request` on); a refusal here aborts the downstream."""
        relay = self._relays.pop(update_id, None)
        try:
            version, committed, seconds = await self.receiver.commit(update_id, checksums, fingerprint)
        except BaseException:
            if relay is not None:
                await relay.abort(update_id)
            raise
        relayed = await relay.commit(request) if relay is not None else []
        return Committed(version=version, fingerprint=committed, seconds=seconds, relayed=relayed)

    async def abort(self, update_id: str, reason: str) -> None:
        """Drops the update here and downstream."""
        self.receiver.abort(update_id, reason)
        if relay := self._relays.pop(update_id, None):
            await relay.abort(update_id)

    def _closed(self, update: Incoming, error: str = "") -> None:
        """One stream of `update` ended; if that interrupted it, its relay goes (a resume is not relayed)."""
        self.receiver.stream_closed(update, error)
        if self.receiver.lifecycle.receiving is update:
            return
        if update.interrupted or self.receiver.lifecycle.held is not update:
            self._drop_relay(update.id)

    async def _phase_changed(self, phase: Phase) -> None:
        """An update that stopped receiving without its stream's knowledge (reaped before any stream opened,
        interrupted, aborted) takes its relay and the downstream stream along: a relay never resumes."""
        receiving = self.receiver.lifecycle.receiving
        for update_id in [u for u in self._relays if receiving is None or receiving.id != u]:
            self._drop_relay(update_id)

    def _drop_relay(self, update_id: str) -> None:
        if relay := self._relays.pop(update_id, None):
            # The downstream streams break with ours; each downstream drops the update itself.
            task = asyncio.ensure_future(relay.abort(update_id))
            self._aborting.add(task)
            task.add_done_callback(self._aborting.discard)
