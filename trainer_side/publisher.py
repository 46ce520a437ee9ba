"""The trainer's side of the handshake: push one version to many rollouts at once.

Each tensor is cast to bf16 and checksummed once, and each chunk is serialized once and shared
by every rollout's stream through a bounded window, so pushing to N rollouts costs one encode
and the trainer holds only `window` chunks beyond the model itself.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from tqdm import tqdm

from trainer_side.relay import relay_tree, subtree_addresses
from weightsync import metrics, wire
from weightsync.manifest import Manifest, build_manifest, wire_tensors
from weightsync.memory import keep_freed_memory
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["Publisher", "PushResult"]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20  # measured (bench/): 256 KiB and 4 MiB were both slower
DEFAULT_STREAMS = 1  # PushChunks streams per rollout; measured (bench/): more were slower on 2 cores
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 65 << 20),
    ("grpc.max_receive_message_length", 65 << 20),
]


@dataclass(frozen=True, kw_only=True, slots=True)
class PushResult:
    """What one rollout answered; `ok` only if it committed the version with our fingerprint."""

    address: str
    version: int
    ok: bool
    fingerprint: str = ""
    seconds: float = 0.0
    bytes_sent: int = 0
    swap_seconds: float = 0.0
    error: str = ""
    relayed_by: str = ""  # the relay that delivered this version, if the trainer did not
    relayed: tuple[pb.RelayResult, ...] = ()  # what this rollout's relay downstream answered

    def line(self) -> str:
        if self.ok:
            if self.relayed_by:
                return f"{self.address}: version {self.version} committed via relay {self.relayed_by}"
            rate = self.bytes_sent / self.seconds / 1e9 if self.seconds else 0.0
            return f"{self.address}: version {self.version} committed in {self.seconds:.2f} s ({rate:.2f} GB/s)"
        return f"{self.address}: version {self.version} FAILED: {self.error}"


class Publisher:
    """Holds one channel per rollout; `push` sends a state dict as a version to all of them."""

    def __init__(
        self,
        rollouts: Sequence[str],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window: int = 16,
        streams: int = DEFAULT_STREAMS,
        timeout: float = 60.0,
        progress: bool | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        relay: int = 0,
    ) -> None:
        if not rollouts:
            raise ValueError("no rollouts given; pass at least one HOST:PORT")
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        keep_freed_memory()  # every chunk message is a fresh buffer inside grpc: keep them warm
        self.rollouts = list(rollouts)
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.streams = streams
        self.timeout = timeout
        self.progress = progress
        self.relay = relay  # 0: push to every rollout; k: a relay tree of fanout k (1 = a chain)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channels = {
            a: grpc.secure_channel(a, credentials, options=CHANNEL_OPTIONS)
            if credentials
            else grpc.insecure_channel(a, options=CHANNEL_OPTIONS)
            for a in self.rollouts
        }
        self._stubs = {a: pb_grpc.WeightSyncStub(c) for a, c in self._channels.items()}
        self._push_chunks = {
            a: c.stream_unary(
                "/weightsync.v1.WeightSync/PushChunks",
                request_serializer=None,  # chunks arrive already encoded, once for all rollouts
                response_deserializer=pb.PushChunksResponse.FromString,
            )
            for a, c in self._channels.items()
        }

    def push(self, state: Mapping[str, torch.Tensor], version: int) -> list[PushResult]:
        """Pushes `state` (any float dtype, any device) as `version` to every rollout concurrently."""
        tensors = dict(wire_tensors(state))
        manifest = build_manifest(tensors.items())
        if self.relay and len(self.rollouts) > 1:
            results = self._push_relayed(tensors, manifest, version)
        else:
            results = self._push_to(self.rollouts, tensors, manifest, version)
        for r in results:
            metrics.record_push(r.address, r.ok, r.version, r.seconds, r.bytes_sent)
        return results

    def _push_relayed(self, tensors: dict[str, torch.Tensor], manifest: Manifest, version: int) -> list[PushResult]:
        """Sends to the relay tree's root only; rollouts the relay did not reach get a direct push."""
        root, downstream = relay_tree(self.rollouts, self.relay)
        [result] = self._push_to([root], tensors, manifest, version, relay_to=downstream)
        reached = {
            r.address: PushResult(
                address=r.address,
                version=version,
                ok=True,
                fingerprint=r.fingerprint,
                seconds=result.seconds,
                relayed_by=root,
            )
            for r in result.relayed
            if r.ok and r.weight_version == version and r.fingerprint == manifest.fingerprint
        }
        missed = [a for a in subtree_addresses(downstream) if a not in reached]
        if missed:
            logger.warning("relay missed %s; pushing to them directly", ", ".join(missed))
            reached |= {r.address: r for r in self._push_to(missed, tensors, manifest, version)}
        return [result, *(reached[a] for a in self.rollouts[1:])]

    def _push_to(
        self,
        targets: Sequence[str],
        tensors: dict[str, torch.Tensor],
        manifest: Manifest,
        version: int,
        relay_to: Sequence[pb.RelayTarget] = (),
    ) -> list[PushResult]:
        update_id = f"v{version}-{uuid.uuid4().hex[:12]}"
        payloads = wire.iter_chunk_payloads(list(tensors.values()), manifest, self.chunk_bytes)
        encoded = (wire.encode_chunk(update_id.encode(), index, pieces) for index, pieces in payloads)
        broadcast = _Broadcast(encoded, consumers=len(targets), window=self.window)
        logger.info(
            "push %s: version %d, %d tensors, %.1f MB to %d rollout(s)%s",
            update_id,
            version,
            len(manifest),
            manifest.total_bytes / 1e6,
            len(targets),
            f", relayed to {len(subtree_addresses(relay_to))} more" if relay_to else "",
        )
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            futures = [
                pool.submit(self._push_one, address, i, broadcast, manifest, version, update_id, relay_to)
                for i, address in enumerate(targets)
            ]
            return [f.result() for f in futures]

    def _push_one(
        self,
        address: str,
        slot: int,
        broadcast: _Broadcast,
        manifest: Manifest,
        version: int,
        update_id: str,
        relay_to: Sequence[pb.RelayTarget] = (),
    ) -> PushResult:
        started = time.perf_counter()
        stub = self._stubs[address]
        # progress=None shows bars only on a terminal.
        bar = tqdm(
            total=manifest.total_bytes,
            unit="B",
            unit_scale=True,
            desc=address,
            position=slot,
            leave=False,
            disable=None if self.progress is None else not self.progress,
        )
        accepted = False
        try:
            stub.BeginUpdate(
                pb.BeginUpdateRequest(
                    version=version,
                    manifest=wire.manifest_to_proto(manifest),
                    chunk_bytes=self.chunk_bytes,
                    fingerprint=manifest.fingerprint,
                    update_id=update_id,
                    relay_to=relay_to,
                ),
                timeout=self.timeout,
                metadata=self._metadata,
            )
            accepted = True
            sent = self._stream_chunks(address, broadcast, slot, bar)
            answer = stub.Commit(pb.CommitRequest(update_id=update_id), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            if accepted:
                _abort_quietly(stub, update_id, self._metadata)
            return PushResult(address=address, version=version, ok=False, error=_describe(error))
        finally:
            broadcast.leave(slot)
            bar.close()
        seconds = time.perf_counter() - started
        if answer.weight_version != version or answer.fingerprint != manifest.fingerprint:
            return PushResult(
                address=address,
                version=version,
                ok=False,
                seconds=seconds,
                error=f"rollout committed version {answer.weight_version} with fingerprint {answer.fingerprint}, "
                f"expected {version} with {manifest.fingerprint}",
            )
        return PushResult(
            address=address,
            version=version,
            ok=True,
            fingerprint=answer.fingerprint,
            seconds=seconds,
            bytes_sent=sent,
            swap_seconds=answer.swap_seconds,
            relayed=tuple(answer.relayed),
        )

    def _stream_chunks(self, address: str, broadcast: _Broadcast, slot: int, bar: tqdm) -> int:  # type: ignore[type-arg]
        """Sends this rollout's chunks over `streams` parallel PushChunks calls; returns bytes sent.

        All streams draw from the rollout's one position in the broadcast, so each chunk goes out
        once, on whichever stream is free. If one stream fails, the others stop and the error is raised.
        """
        reader = broadcast.shared_reader(slot, self.streams)
        calls = [
            self._push_chunks[address].future(_counted(reader(), bar), metadata=self._metadata)
            for _ in range(self.streams)
        ]
        try:
            return sum(call.result().bytes for call in calls)
        except grpc.RpcError:
            for call in calls:
                call.cancel()
            raise

    def status(self) -> dict[str, pb.GetStatusResponse | str]:
        """Each rollout's GetStatus, or the reason it could not be reached."""
        out: dict[str, pb.GetStatusResponse | str] = {}
        for address, stub in self._stubs.items():
            try:
                out[address] = stub.GetStatus(pb.GetStatusRequest(), timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                out[address] = _describe(error)
        return out

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Broadcast:
    """Hands one stream of encoded chunks to several readers, holding at most `window` of them.

    Chunks are produced lazily by whichever reader is ahead; a reader that gets `window` chunks
    ahead of the slowest waits. A reader that fails leaves, so it never holds the others back.
    """

    def __init__(self, source: Iterator[bytes], *, consumers: int, window: int) -> None:
        self._source = source
        self._window = window
        self._cond = threading.Condition()
        self._chunks: dict[int, bytes] = {}
        self._produced = 0
        self._exhausted = False
        self._positions = dict.fromkeys(range(consumers), 0)

    def reader(self, slot: int) -> Iterator[bytes]:
        try:
            while (chunk := self._next(slot)) is not None:
                yield chunk
        finally:
            self.leave(slot)

    def shared_reader(self, slot: int, streams: int) -> Callable[[], Iterator[bytes]]:
        """Returns a factory of `streams` iterators that share one slot: each chunk goes to one of them.

        The slot is left when the last of them ends, or as soon as one fails.
        """
        remaining = [streams]

        def one() -> Iterator[bytes]:
            finished = False
            try:
                while (chunk := self._next(slot)) is not None:
                    yield chunk
                finished = True
            finally:
                with self._cond:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last or not finished:
                    self.leave(slot)

        return one

    def leave(self, slot: int) -> None:
        with self._cond:
            if self._positions.pop(slot, None) is not None:
                self._evict()
                self._cond.notify_all()

    def _next(self, slot: int) -> bytes | None:
        with self._cond:
            while True:
                # Re-read after every wait: other streams of the same rollout share this slot.
                position = self._positions.get(slot)
                if position is None:
                    return None  # the slot left: another stream of the same rollout failed
                if position < self._produced:
                    break
                if self._exhausted:
                    return None
                if self._produced - min(self._positions.values()) < self._window:
                    chunk = next(self._source, None)
                    if chunk is None:
                        self._exhausted = True
                        continue
                    self._chunks[self._produced] = chunk
                    self._produced += 1
                    self._cond.notify_all()
                else:
                    self._cond.wait()
            self._positions[slot] = position + 1
            chunk = self._chunks[position]
            self._evict()
            self._cond.notify_all()
            return chunk

    def _evict(self) -> None:
        oldest = min(self._positions.values(), default=self._produced)
        for index in [i for i in self._chunks if i < oldest]:
            del self._chunks[index]


def _counted(chunks: Iterator[bytes], bar: tqdm) -> Iterator[bytes]:  # type: ignore[type-arg]
    for chunk in chunks:
        yield chunk
        bar.update(len(chunk))


def _abort_quietly(stub: pb_grpc.WeightSyncStub, update_id: str, metadata: tuple[tuple[str, str], ...] | None) -> None:
    try:
        stub.AbortUpdate(pb.AbortUpdateRequest(update_id=update_id), timeout=5, metadata=metadata)
    except grpc.RpcError:
        pass  # the rollout already dropped it, or is gone


def _describe(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"
