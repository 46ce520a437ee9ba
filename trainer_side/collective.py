"""Collective push: every rank of a torch.distributed job sends its own shards, as streams of one update.

Every rank constructs the Publisher alike and calls `push(state, version)` with its own state dict
(DTensors welcome). The version's layout and manifest are those of the unsharded state. Each rank owns
byte ranges of that layout: a `Shard(0)` DTensor's rows (FSDP2's default), a replicated or plain tensor
on rank 0; other placements (`Shard(d>0)`, `Partial`, strided) are redistributed to `Shard(0)` first,
one tensor at a time, and a DTensor on a mesh of more than one dimension is gathered whole, one tensor
at a time, never the whole model on one rank.

Chunks are cut from the full layout as in a plain push, and each is sent by the rank that owns its first
byte; the bytes of it that other ranks own (only chunks across a rank boundary have any) are exchanged
over gloo as the chunks go out, `window` chunks at a time (that plan is trainer_side/shard_plan.py).
Rank 0 runs BeginUpdate and Commit; every rank streams its chunks straight to every rollout under the
update id rank 0 broadcasts. Checksums are of
the combinable kind (`Manifest.piece_bytes` = chunk size, weightsync/manifest.py): each chunk's sender
hashes its pieces, rank 0 combines them, so the manifest and fingerprint equal the unsharded state's
(`manifest_of_state(full_state, piece_bytes=chunk_bytes)`).

Failure is whole: every collective runs in a gloo group with the publisher's timeout. A rank that fails
or dies makes every other rank's push fail within that timeout, and rank 0 aborts the update, so no
rollout commits it and each keeps serving the version it had.

Memory per rank: its own shards, the bf16 cast of one local tensor at a time (none for bf16 shards),
`window` encoded chunks, and the boundary bytes of the `window` chunks being encoded (what it
receives for its own chunks and what it sends for others': at most `window` chunks' worth each); a
redistributed tensor adds its new shard, a gathered one its full size, one at a time.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import grpc
import torch
import torch.distributed as dist
import xxhash
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from tqdm import tqdm

from trainer_side.chunk_window import ChunkWindow
from trainer_side.outgoing import Outgoing, WirePayloads, commit_request
from trainer_side.push_result import PushResult, describe, failure
from trainer_side.rollout_client import RolloutClient
from trainer_side.shard_plan import Piece, chunk_owners, combine, local_view, spans_of
from weightsync import wire
from weightsync.errors import Reason
from weightsync.manifest import Manifest, tensor_bytes, wire_layout

__all__ = ["Collective", "in_collective_job"]

logger = logging.getLogger(__name__)


def in_collective_job() -> bool:
    """Whether this process is one rank of several in an initialized torch.distributed job."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Collective:
    """One rank's side of collective pushes: a gloo group with a deadline, and the push itself."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def push(
        self,
        clients: Mapping[str, RolloutClient],
        state: Mapping[str, torch.Tensor],
        version: int,
        *,
        chunk_bytes: int,
        window: int,
        streams: int,
    ) -> list[PushResult]:
        """Pushes this rank's part of `state`; every rank returns the same results (rank 0's)."""
        started = time.perf_counter()
        addresses = list(clients)
        update_id = ""
        try:
            layout, local = self._layout(state)
            spans = spans_of(layout, self._all_gather([(i, first, count) for i, (first, count, _) in local.items()]))
            chunks = chunk_owners(spans, layout.total_bytes, chunk_bytes)
            payloads = WirePayloads([local[i][2] if i in local else _EMPTY for i in range(len(layout))])
            announced = layout.with_piece_bytes(chunk_bytes)
            outgoing = Outgoing(version, announced, ())
            if self.rank == 0:
                update_id = f"v{version}-{uuid.uuid4().hex[:12]}"
                failed = self._begin(clients, outgoing, update_id, chunk_bytes)
            else:
                failed = {}
            [update_id, failed] = self._broadcast([update_id, failed])
            accepted = [a for a in addresses if a not in failed]
            digests: list[tuple[int, int, int, int]] = []  # (flat start, size, tensor, xxh3_64) of each piece sent
            messages = self._chunks(update_id.encode(), chunks, payloads, digests, window)
            sent, errors = self._stream(clients, accepted, messages, window, streams)
            if accepted:
                for _ in messages:  # this rank's streams ended early: still hand other ranks their pieces
                    pass
            gathered = self._all_gather((errors, digests, sent))
        except Exception as error:  # noqa: BLE001 - any failure (a rank died, a timeout, a bad state) fails all ranks
            logger.error("collective push of version %d failed on rank %d: %s", version, self.rank, error)
            if self.rank == 0 and update_id:
                for client in clients.values():
                    client.abort(update_id)
            why = f"collective push failed on rank {self.rank}: {type(error).__name__}: {error}"
            return [PushResult(address=a, version=version, ok=False, error=why) for a in addresses]
        results: list[PushResult] | None = None
        if self.rank == 0:
            try:
                results = self._commit(clients, outgoing, update_id, failed, gathered, started)
            except Exception as error:  # noqa: BLE001 - e.g. the ranks' pieces do not cover the layout: commit nothing
                logger.error("collective push of version %d: not committed: %s", version, error)
                for client in clients.values():
                    client.abort(update_id)
                why = f"collective push not committed: {type(error).__name__}: {error}"
                results = [PushResult(address=a, version=version, ok=False, error=why) for a in addresses]
        try:
            [results] = self._broadcast([results])
        except Exception as error:  # noqa: BLE001 - rank 0 died after the streams; it may have committed
            why = f"collective push: no results from rank 0: {type(error).__name__}: {error}"
            return [PushResult(address=a, version=version, ok=False, error=why) for a in addresses]
        assert results is not None
        return results

    def _layout(self, state: Mapping[str, torch.Tensor]) -> tuple[Manifest, dict[int, tuple[int, int, torch.Tensor]]]:
        """The full layout (rank 0's choice of tensors) and this rank's (first row, rows, local tensor) of each."""
        names = [name for name, _ in _sources(state)] if self.rank == 0 else None
        [names] = self._broadcast([names])
        assert names is not None
        local: dict[int, tuple[int, int, torch.Tensor]] = {}
        shapes = []
        for i, name in enumerate(names):
            tensor = state[name]
            shapes.append((name, torch.empty(tensor.shape, dtype=torch.bfloat16, device="meta")))
            held = self._local(tensor)
            if held is not None:
                local[i] = held
        return wire_layout(shapes), local

    def _local(self, tensor: torch.Tensor) -> tuple[int, int, torch.Tensor] | None:
        """This rank's contiguous rows of `tensor` (first row, count, the rows), or None if it sends none."""
        dim0 = tensor.shape[0] if tensor.dim() else 1
        if not isinstance(tensor, DTensor):
            return (0, dim0, tensor) if self.rank == 0 else None
        mesh = tensor.device_mesh
        if mesh.ndim != 1:  # gathered whole, one tensor at a time; rank 0 sends it
            full = tensor.full_tensor()
            return (0, dim0, full) if self.rank == 0 else None
        placement = tensor.placements[0]
        if placement.is_replicate():
            return (0, dim0, tensor.to_local()) if mesh.get_local_rank() == 0 else None
        if type(placement) is not Shard or placement.dim != 0 or not tensor.dim():
            tensor = tensor.redistribute(mesh, [Shard(0)])
        rows = tensor.to_local()
        _, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, tensor.placements)
        return (offset[0], rows.shape[0], rows) if rows.shape[0] else None

    def _exchange(self, chunks: Sequence[Sequence[Piece]], payloads: WirePayloads, tag: int) -> dict[int, memoryview]:
        """Sends the pieces this rank holds of `chunks` that another rank sends, and receives the pieces of
        its own `chunks` that other ranks hold; returns the received pieces by their start in the layout."""
        outgoing: dict[int, list[Piece]] = defaultdict(list)
        incoming: dict[int, list[Piece]] = defaultdict(list)
        for pieces in chunks:
            owner = pieces[0].span.rank
            for piece in pieces:
                if piece.span.rank == self.rank and owner != self.rank:
                    outgoing[owner].append(piece)
                elif owner == self.rank and piece.span.rank != self.rank:
                    incoming[piece.span.rank].append(piece)
        if not outgoing and not incoming:
            return {}
        works = []
        buffers: dict[int, tuple[torch.Tensor, list[Piece]]] = {}
        for peer, pieces in sorted(incoming.items()):
            buffer = torch.empty(sum(p.end - p.start for p in pieces), dtype=torch.uint8)
            buffers[peer] = (buffer, pieces)
            works.append(dist.irecv(buffer, src=peer, group=self.group, tag=tag))
        sends = []  # kept alive until the sends complete
        for peer, pieces in sorted(outgoing.items()):
            data = torch.empty(sum(p.end - p.start for p in pieces), dtype=torch.uint8)
            view, at = tensor_bytes(data), 0
            for piece in pieces:
                size = piece.end - piece.start
                view[at : at + size] = local_view(piece, payloads)
                at += size
            sends.append(data)
            works.append(dist.isend(data, dst=peer, group=self.group, tag=tag))
        for work in works:
            assert work is not None
            work.wait(timedelta(seconds=self.timeout))
        received: dict[int, memoryview] = {}
        for buffer, pieces in buffers.values():
            view, at = tensor_bytes(buffer), 0
            for piece in pieces:
                received[piece.start] = view[at : at + piece.end - piece.start]
                at += piece.end - piece.start
        return received

    def _chunks(
        self,
        key: bytes,
        chunks: Sequence[Sequence[Piece]],
        payloads: WirePayloads,
        digests: list[tuple[int, int, int, int]],
        bucket: int,
    ) -> Iterator[bytes]:
        """Encodes the chunks this rank sends, noting each piece's digest for the checksums rank 0 combines.

        Goes `bucket` chunks at a time: the pieces of them other ranks hold are exchanged first (every rank
        walks the same buckets), so a rank holds at most a bucket's worth of other ranks' bytes."""
        for first in range(0, len(chunks), bucket):
            received = self._exchange(chunks[first : first + bucket], payloads, tag=first // bucket)
            for index in range(first, min(first + bucket, len(chunks))):
                pieces = chunks[index]
                if pieces[0].span.rank == self.rank:
                    yield self._encode(key, index, pieces, payloads, received, digests)

    def _encode(
        self,
        key: bytes,
        index: int,
        pieces: Sequence[Piece],
        payloads: WirePayloads,
        received: Mapping[int, memoryview],
        digests: list[tuple[int, int, int, int]],
    ) -> bytes:
        views = [local_view(p, payloads) if p.span.rank == self.rank else received[p.start] for p in pieces]
        # A chunk is one piece of the combinable checksum per tensor it meets (the piece size is the
        # chunk size): a chunk inside one tensor is hashed once, for both.
        by_tensor: dict[int, list[memoryview]] = defaultdict(list)
        starts: dict[int, int] = {}
        for piece, view in zip(pieces, views, strict=True):
            by_tensor[piece.span.tensor].append(view)
            starts.setdefault(piece.span.tensor, piece.start)
        checksum = None
        for tensor, parts in by_tensor.items():
            digest = wire.chunk_checksum(parts[0]) if len(parts) == 1 else _xxh3_64(parts)
            digests.append((starts[tensor], sum(v.nbytes for v in parts), tensor, digest))
            if len(by_tensor) == 1:
                checksum = digest
        return wire.encode_chunk(key, index, views, checksum)

    def _begin(
        self, clients: Mapping[str, RolloutClient], outgoing: Outgoing, update_id: str, chunk_bytes: int
    ) -> dict[str, PushResult]:
        """BeginUpdate on every rollout (rank 0); returns the refusals."""
        request = outgoing.request(chunk_bytes, update_id)

        def begin(client: RolloutClient) -> PushResult | None:
            try:
                client.begin(request, timeout=self.timeout)
                return None
            except grpc.RpcError as error:
                return failure(client.address, outgoing.version, describe(error), error)

        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            answers = dict(zip(clients, pool.map(begin, clients.values()), strict=True))
        return {a: r for a, r in answers.items() if r is not None}

    def _stream(
        self,
        clients: Mapping[str, RolloutClient],
        accepted: Sequence[str],
        messages: Iterator[bytes],
        window: int,
        streams: int,
    ) -> tuple[int, dict[str, str]]:
        """This rank's chunks to every accepted rollout at once; returns bytes per rollout and each failure."""
        if not accepted:
            return 0, {}
        shared = ChunkWindow(messages, consumers=len(accepted), window=window)

        def send(slot: int, address: str) -> tuple[int, str]:
            bar = tqdm(disable=True)
            try:
                return clients[address].stream(shared, slot, streams, bar), ""
            except grpc.RpcError as error:
                return 0, describe(error)
            finally:
                shared.leave(slot)

        with ThreadPoolExecutor(max_workers=len(accepted)) as pool:
            answers = list(pool.map(send, range(len(accepted)), accepted))
        return max(n for n, _ in answers), {a: why for a, (_, why) in zip(accepted, answers, strict=True) if why}

    def _commit(
        self,
        clients: Mapping[str, RolloutClient],
        outgoing: Outgoing,
        update_id: str,
        failed: Mapping[str, PushResult],
        gathered: Sequence[tuple[dict[str, str], list[tuple[int, int, int, int]], int]],
        started: float,
    ) -> list[PushResult]:
        """Rank 0: the checksums from every rank's pieces, then Commit where every rank's streams went through."""
        sent = sum(n for _, _, n in gathered)
        version = outgoing.version
        errors = {
            address: [f"rank {r}: {e[address]}" for r, (e, _, _) in enumerate(gathered) if address in e]
            for address in clients
        }
        if all(address in failed or errors[address] for address in clients):
            manifest = outgoing.announced  # nothing to commit: the pieces need not be complete
        else:
            manifest = outgoing.complete(combine(outgoing.announced, [d for _, ds, _ in gathered for d in ds]))

        def commit(address: str) -> PushResult:
            if address in failed:
                return failed[address]
            client = clients[address]
            if errors[address]:
                client.abort(update_id)
                return PushResult(address=address, version=version, ok=False, error="; ".join(errors[address]))
            try:
                answer = client.commit(commit_request(update_id, manifest, pending=True), timeout=self.timeout)
            except grpc.RpcError as error:
                client.abort(update_id)
                return failure(address, version, describe(error), error)
            if answer.weight_version != version or answer.fingerprint != manifest.fingerprint:
                return PushResult(
                    address=address,
                    version=version,
                    ok=False,
                    error=f"rollout committed version {answer.weight_version} with fingerprint {answer.fingerprint}, "
                    f"expected {version} with {manifest.fingerprint}",
                    reason=Reason.FINGERPRINT_MISMATCH,
                )
            return PushResult(
                address=address,
                version=version,
                ok=True,
                fingerprint=answer.fingerprint,
                seconds=time.perf_counter() - started,
                bytes_sent=sent,
                swap_seconds=answer.swap_seconds,
            )

        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            return list(pool.map(commit, clients))

    def _all_gather(self, value: object) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def _broadcast(self, values: list[Any]) -> list[Any]:
        dist.broadcast_object_list(values, src=dist.get_global_rank(self.group, 0), group=self.group)
        return values


_EMPTY = torch.empty(0, dtype=torch.bfloat16)


def _sources(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The float tensors of a (possibly sharded) state dict that go on the wire; an alias (tied weights) once.

    Once also because the combinable checksum depends on where a tensor sits in the layout: two copies of
    tied bytes would carry different checksums, which a rollout that checks tied tensors refuses."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        held = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if not held.numel():
            key: tuple[object, ...] = (id(tensor),)
        else:  # tied weights: two names (and, under FSDP2, two DTensors) over the same local storage
            key = (held.untyped_storage().data_ptr(), held.storage_offset(), held.shape, held.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return out


def _xxh3_64(parts: Sequence[memoryview]) -> int:
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return int(digest.intdigest())
