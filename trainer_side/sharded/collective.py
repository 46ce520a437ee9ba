"""Collective push, its orchestration: every rank of a torch.distributed job sends its own shards, as
streams of one update. This module runs the steps and makes the ranks agree (gloo, with a deadline);
which rank sends which bytes is trainer_side/sharded/placement.py, the calls to the rollouts
trainer_side/sharded/transport.py (through the push's UpdateSession, trainer_side/session.py).

Every rank constructs the Publisher alike and calls `push(state, version)` with its own state dict
(DTensors welcome). The version's layout and manifest are those of the unsharded state. Each rank owns
byte ranges of that layout: a `Shard(0)` DTensor's rows (FSDP2's default), a replicated or plain tensor
on rank 0; other placements (`Shard(d>0)`, `Partial`, strided) are redistributed to `Shard(0)` first,
one tensor at a time, and a DTensor on a mesh of more than one dimension is gathered whole, one tensor
at a time, never the whole model on one rank.

Chunks are cut from the full layout as in a plain push, and each is sent by the rank that owns its first
byte; the bytes of it that other ranks own (only chunks across a rank boundary have any) are exchanged
over gloo as the chunks go out, `window` chunks at a time (that plan is trainer_side/sharded/plan.py, the
moving of bytes trainer_side/sharded/chunks.py).
Rank 0 runs BeginUpdate and Commit; every rank streams its chunks straight to every rollout under the
update id rank 0 broadcasts. Checksums are of
the combinable kind (`Manifest.piece_bytes` = chunk size, weightsync/manifest.py): each chunk's sender
hashes its pieces, rank 0 combines them, so the manifest and fingerprint equal the unsharded state's
(`manifest_of_state(full_state, piece_bytes=chunk_bytes)`).

Delta sync (`base`, trainer_side/sharded/rank_base.py): each rank keeps its own rows of the last version and diffs
them; the ranks' parts of each tensor's patch make one patch (trainer_side/sharded/delta.py), sent like any
chunks. The new version's checksums are hashed first (a delta announces them at BeginUpdate). Rollouts
that hold no base, or refuse the delta, get the full version in the same push; every rank decides that
alike, from rank 0's results.

Failure is whole: every collective runs in a gloo group with the publisher's timeout. A rank that fails
or dies makes every other rank's push fail within that timeout, and rank 0 aborts the update, so no
rollout commits it and each keeps serving the version it had. A rank whose own step fails (a missing
tensor, a failed diff) says so at the next agreement point (`_agree`), so every rank fails at once.

Memory per rank: its own shards, the bf16 cast of one local tensor at a time (none for bf16 shards),
`window` encoded chunks, and the boundary bytes of the `window` chunks being encoded (what it
receives for its own chunks and what it sends for others': at most `window` chunks' worth each); a
redistributed tensor adds its new shard, a gathered one its full size, one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trainer_side.outgoing import Outgoing
from trainer_side.push_result import PushResult, wants_full
from trainer_side.rollout_client import RolloutClient
from trainer_side.session import UpdateSession
from trainer_side.sharded.chunks import Digest, PieceMover
from trainer_side.sharded.delta import DeltaPayloads, DeltaPlan, LocalDiff, Summary, diff_rows, plan_delta
from trainer_side.sharded.placement import Shards, check_names, layout_of, sharded_sources, shards_of
from trainer_side.sharded.plan import Piece, chunk_owners, combine
from trainer_side.sharded.rank_base import RankBase
from trainer_side.sharded.transport import commit_all, held_bytes, stream_chunks
from weightsync.errors import Reason
from weightsync.manifest import to_wire
from weightsync.memory import arenas_unbounded

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
        self.mover = PieceMover(self.group, self.rank, timeout)
        if self.rank == 0 and arenas_unbounded():  # rank 0 speaks for the job: one line, not one per rank
            logger.warning(
                "MALLOC_ARENA_MAX is not set: each gRPC thread's malloc arena keeps its own freed chunk "
                "buffers, so a rank's memory grows past its bound (shards + 3 x window x chunk); launch the "
                "ranks with MALLOC_ARENA_MAX=1 in their environment (docs/sharded.md, memory per rank)"
            )

    def push(
        self,
        clients: Mapping[str, RolloutClient],
        state: Mapping[str, torch.Tensor],
        version: int,
        *,
        chunk_bytes: int,
        window: int,
        streams: int,
        base: RankBase | None = None,
    ) -> list[PushResult]:
        """Pushes this rank's part of `state`; every rank returns the same results (rank 0's).

        With `base` (delta sync), rollouts that confirmed the last version get a delta, diffed and sent by
        each rank from its own rows; the others, and any that refuse the delta, get the full version."""
        started = time.perf_counter()
        addresses = list(clients)
        try:
            shards = self._shards(state, chunk_bytes)
            delta, diffs = self._plan_delta(shards, base, addresses, version, window) if base else (None, {})
        except Exception as error:  # noqa: BLE001 - every rank raised alike (see _agree), or a collective failed
            if base is not None:
                base.reset()
            return self._failed(addresses, version, error)
        results: dict[str, PushResult] = {}
        if delta is not None:
            outgoing, plan, holders = delta
            chunks = chunk_owners(plan.spans, plan.wire_bytes, chunk_bytes)
            payloads = DeltaPayloads(shards.payloads, plan.patches)
            sent = self._send(
                {a: clients[a] for a in holders}, outgoing, chunks, payloads, chunk_bytes, window, streams, started
            )
            results = {r.address: replace(r, delta=True) for r in sent}
        rest = [a for a in addresses if a not in results or wants_full(results[a])]
        for address in rest:
            if address in results:
                logger.warning("%s refused the delta (%s); sending the full version", address, results[address].error)
        for attempt in range(2):  # every rank decides alike: the results are rank 0's
            if not rest:
                break
            full = Outgoing(version, shards.layout.with_piece_bytes(chunk_bytes), ())
            sent = self._send(
                {a: clients[a] for a in rest},
                full,
                shards.chunks,
                shards.payloads,
                chunk_bytes,
                window,
                streams,
                started,
            )
            results |= {r.address: r for r in sent}
            # A resumed update whose held chunks were another run's bytes is refused at commit and dropped there:
            # the rollout takes the version afresh, once.
            rest = [r.address for r in sent if r.reason is Reason.CHECKSUM_MISMATCH and r.held_bytes and not attempt]
        ordered = [results[a] for a in addresses]
        if base is not None:
            try:
                base.keep(shards.key, {i: rows for i, (_, _, rows) in shards.local.items()}, diffs)
                base.record(ordered)
            except Exception as error:  # noqa: BLE001 - the next push agrees on a full version (the base fits no more)
                logger.error("rank %d could not keep its delta base: %r", self.rank, error)
                base.reset()
        return ordered

    def _send(
        self,
        clients: Mapping[str, RolloutClient],
        outgoing: Outgoing,
        chunks: Sequence[Sequence[Piece]],
        payloads: Sequence[memoryview],
        chunk_bytes: int,
        window: int,
        streams: int,
        started: float,
    ) -> list[PushResult]:
        """One update of `outgoing` to `clients`, each rank sending its `chunks`; the same results on every rank."""
        addresses, version = list(clients), outgoing.version
        session = UpdateSession(clients, outgoing)  # rank 0's update id, broadcast below, is every rank's
        try:
            request = outgoing.request(chunk_bytes, session.update_id)
            session.update_id, (failed, held) = self._from_rank0(
                lambda: (session.update_id, session.begin(request, len(chunks), self.timeout))
            )
            update_id = session.update_id
            accepted = [a for a in addresses if a not in failed]
            digests: list[Digest] = []  # (flat start, size, tensor, xxh3_64) of each piece sent
            hashing = outgoing.pending  # a delta's checksums are known: its chunks are not pieces of them
            messages = self.mover.chunks(update_id.encode(), chunks, payloads, digests, window, hashing=hashing)

            def stream() -> tuple[dict[str, str], list[Digest], int]:
                own = [i for i, pieces in enumerate(chunks) if pieces[0].span.rank == self.rank]
                skips = {a: bytearray(mask[i] for i in own) for a, mask in held.items()}  # by this rank's chunks
                sent, errors = stream_chunks(session, accepted, messages, window, streams, skips)
                if accepted:
                    for _ in messages:  # this rank's streams ended early: still hand other ranks their pieces
                        pass
                return errors, digests, sent

            gathered = self._agree(stream)
        except Exception as error:  # noqa: BLE001 - any failure (a rank died, a timeout, a bad state) fails all ranks
            if self.rank == 0:
                session.abort()
            return self._failed(addresses, version, error)
        results: list[PushResult] | None = None
        if self.rank == 0:
            try:
                results = commit_all(session, failed, gathered, started, self.timeout)
                results = [
                    replace(r, held_bytes=held_bytes(held[r.address], outgoing.wire_bytes, chunk_bytes))
                    if r.address in held
                    else r
                    for r in results
                ]
            except Exception as error:  # noqa: BLE001 - e.g. the ranks' pieces do not cover the layout: commit nothing
                logger.error("collective push of version %d: not committed: %s", version, error)
                session.abort()
                why = f"collective push not committed: {type(error).__name__}: {error}"
                results = [session.failed(a, why) for a in addresses]
        try:
            [results] = self._broadcast([results])
        except Exception as error:  # noqa: BLE001 - rank 0 died after the streams; it may have committed
            why = f"collective push: no results from rank 0: {type(error).__name__}: {error}"
            return [PushResult(address=a, version=version, ok=False, error=why) for a in addresses]
        assert results is not None
        return results

    def _failed(self, addresses: Sequence[str], version: int, error: Exception) -> list[PushResult]:
        logger.error("collective push of version %d failed on rank %d: %s", version, self.rank, error)
        if isinstance(error, CollectiveFailure):  # agreed: every rank says the same
            why = f"collective push failed: {error}"
        else:
            why = f"collective push failed on rank {self.rank}: {type(error).__name__}: {error}"
        return [PushResult(address=a, version=version, ok=False, error=why) for a in addresses]

    def _shards(self, state: Mapping[str, torch.Tensor], chunk_bytes: int) -> Shards:
        """The full layout, this rank's rows of it, and which rank sends which chunk (agreed by every rank)."""
        names = [name for name, _ in sharded_sources(state)] if self.rank == 0 else None
        [names] = self._broadcast([names])
        assert names is not None
        self._agree(lambda: check_names(state, names))  # before any DTensor collective that would wait on us
        layout, local = layout_of(state, names, self.rank)
        rows = self._agree(lambda: [(i, first, count) for i, (first, count, _) in local.items()])
        return shards_of(layout, local, rows, self.rank, chunk_bytes)

    def _plan_delta(
        self, shards: Shards, base: RankBase, addresses: Sequence[str], version: int, window: int
    ) -> tuple[tuple[Outgoing, DeltaPlan, list[str]] | None, dict[int, LocalDiff]]:
        """Agrees on a delta for the rollouts that hold the base, if every rank has a base of this layout:
        each rank diffs its rows; the patch layout and the new version's checksums come from every rank's."""
        agreed = self._agree(lambda: (base.fits(shards.key), base.holders(addresses), base.fingerprint))
        holders, fingerprint = agreed[0][1], agreed[0][2]
        if not holders or not all(fits for fits, _, _ in agreed):
            return None, {}
        mine = {s.tensor: s for s in shards.spans if s.rank == self.rank}

        def diff() -> dict[int, Summary]:
            summaries = {}
            for i, (_, _, rows) in shards.local.items():
                offset = (mine[i].start - shards.layout.entries[i].offset) // 2  # bf16 elements
                summaries[i], found = diff_rows(to_wire(rows), base.rows[i], offset)
                if found is not None:
                    diffs[i] = found
            return summaries

        diffs: dict[int, LocalDiff] = {}
        summaries = self._agree(diff)
        plan = plan_delta(shards.layout, shards.spans, summaries, diffs, self.rank)
        if plan is None:
            return None, diffs  # no tensor is smaller as a patch: a full version, hashed as it goes
        announced = shards.layout.with_piece_bytes(shards.chunk_bytes)
        pieces = self._agree(lambda: self.mover.digests(shards.chunks, shards.payloads, window))
        manifest = announced.with_checksums(combine(announced, [d for ds in pieces for d in ds]))
        outgoing = Outgoing(version, manifest, (), plan=plan.plan, base_fingerprint=fingerprint)
        return (outgoing, plan, holders), diffs

    def _agree(self, local: Callable[[], T]) -> list[T]:
        """Runs this rank's `local` step and gathers every rank's result; raises on every rank if any rank's
        step failed, so that a rank failing alone never leaves the others waiting at the next collective."""
        try:
            value, error = local(), ""
        except Exception as failed:  # noqa: BLE001 - told to every rank, raised on every rank below
            value, error = None, f"{type(failed).__name__}: {failed}"
        gathered = self._all_gather((error, value))
        errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e]
        if errors:
            raise CollectiveFailure("; ".join(errors))
        return [v for _, v in gathered]

    def _from_rank0(self, local: Callable[[], T]) -> T:
        """Runs `local` on rank 0 and hands its result (or its failure, raised on every rank) to every rank."""
        value: T | None = None
        error = ""
        if self.rank == 0:
            try:
                value = local()
            except Exception as failed:  # noqa: BLE001 - raised on every rank below
                error = f"rank 0: {type(failed).__name__}: {failed}"
        [error, value] = self._broadcast([error, value])
        if error:
            raise CollectiveFailure(error)
        assert value is not None
        return value

    def _all_gather(self, value: object) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def _broadcast(self, values: list[Any]) -> list[Any]:
        dist.broadcast_object_list(values, src=dist.get_global_rank(self.group, 0), group=self.group)
        return values


T = TypeVar("T")


class CollectiveFailure(RuntimeError):
    """A step failed on some rank: every rank raises this, naming the ranks and why."""
