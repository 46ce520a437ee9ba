"""One update to a set of rollouts, from BeginUpdate to Commit or abort: plain, relayed and collective pushes
all run theirs through an UpdateSession, so an update ends the same way whichever pushed it.

An update has one id and one encoding (trainer_side/outgoing.py) and goes to one or more rollouts. How it
ends is decided here:
- a rollout's Commit counts only if it answers our version and fingerprint (`committed`);
- every failure is a PushResult that says why (`failed`), never an exception out of `Publisher.push`;
- an update whose bytes the trainer could not make (a tensor that failed to encode: the shared window's
  `failure`) fails on every rollout, naming the tensor and the cause, and is aborted on every one of them
  (`end`), so no rollout is left RECEIVING; a rollout that refused midway is aborted too. Only an update
  cut by its connection is left held on the rollout, for a resume (trainer_side/rollout_client.py).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc

from trainer_side.chunk_window import ChunkWindow
from trainer_side.outgoing import Outgoing
from trainer_side.push_result import PushResult, describe, failure
from trainer_side.resume import held_mask
from weightsync.errors import Reason
from weightsync.v1 import weightsync_pb2 as pb

if TYPE_CHECKING:
    from trainer_side.rollout_client import RolloutClient

__all__ = ["UpdateSession", "new_update_id"]

logger = logging.getLogger(__name__)


def new_update_id(version: int) -> str:
    return f"v{version}-{uuid.uuid4().hex[:12]}"


class UpdateSession:
    """One update (`update_id`) of `outgoing` to `clients`: the results it gives, and its aborts."""

    def __init__(self, clients: Mapping[str, RolloutClient], outgoing: Outgoing, *, update_id: str = "") -> None:
        self.clients = dict(clients)
        self.outgoing = outgoing
        self.update_id = update_id or new_update_id(outgoing.version)
        self.window: ChunkWindow | None = None

    def share(self, messages: Iterator[bytes], *, consumers: int, window: int) -> ChunkWindow:
        """The window the rollouts of this update read its chunks (or progress messages) from, each once."""
        self.window = ChunkWindow(messages, consumers=consumers, window=window)
        return self.window

    @property
    def failure(self) -> Exception | None:
        """Why the trainer could not make this update's bytes (every rollout's push fails so), if it could not."""
        return self.window.failure if self.window is not None else None

    def begin(
        self, request: pb.BeginUpdateRequest, chunks: int, timeout: float
    ) -> tuple[dict[str, PushResult], dict[str, bytearray]]:
        """BeginUpdate on every rollout at once; returns the refusals, and the chunks each rollout holds of an
        interrupted run of this update (a mask: 1 where held), which it resumes: those are not sent again."""
        outgoing, held = self.outgoing, {}

        def begin(client: RolloutClient) -> PushResult | None:
            try:
                began = client.begin(request, timeout=timeout)
            except grpc.RpcError as error:
                return failure(client.address, outgoing.version, describe(error), error)
            if began.held_chunks:
                held[client.address] = held_mask(began.held_chunks, chunks)
                logger.info(
                    "%s: resuming update %s, %d chunks held there",
                    client.address,
                    self.update_id,
                    sum(held[client.address]),
                )
            if outgoing.is_delta and began.chunk_count != chunks:  # a rollout from before delta sync: full chunks
                client.abort(self.update_id)
                why = f"the rollout expects {began.chunk_count} chunks: it does not take deltas"
                return self.failed(client.address, why, reason=Reason.FULL_VERSION_NEEDED)
            return None

        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            answers = dict(zip(self.clients, pool.map(begin, self.clients.values()), strict=True))
        refused = {a: r for a, r in answers.items() if r is not None}
        return refused, {a: m for a, m in held.items() if a not in refused}

    def committed(self, address: str, answer: pb.CommitResponse, *, seconds: float, **fields: Any) -> PushResult:
        """What a rollout's Commit answer means: ok only for our version with our fingerprint."""
        version, manifest = self.outgoing.version, self.outgoing.manifest
        expected = manifest.fingerprint if manifest is not None else "(checksums pending)"
        if answer.weight_version != version or answer.fingerprint != expected:
            why = (
                f"rollout committed version {answer.weight_version} with fingerprint {answer.fingerprint}, "
                f"expected {version} with {expected}"
            )
            return self.failed(address, why, reason=Reason.FINGERPRINT_MISMATCH, seconds=seconds)
        return PushResult(
            address=address,
            version=version,
            ok=True,
            fingerprint=answer.fingerprint,
            seconds=seconds,
            swap_seconds=answer.swap_seconds,
            delta=self.outgoing.is_delta,
            **fields,
        )

    def failed(
        self,
        address: str,
        error: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: Reason | None = None,
        seconds: float = 0.0,
    ) -> PushResult:
        """A failed push of this update to `address`."""
        return PushResult(
            address=address,
            version=self.outgoing.version,
            ok=False,
            error=error,
            delta=self.outgoing.is_delta,
            code=code,
            reason=reason,
            seconds=seconds,
        )

    def abort(self, addresses: Iterable[str] | None = None) -> None:
        """Drops this update on `addresses` (default: every rollout of it) at once; quiet where it is gone."""
        targets = [self.clients[a] for a in (self.clients if addresses is None else addresses)]
        if targets:
            with ThreadPoolExecutor(max_workers=len(targets)) as pool:
                list(pool.map(lambda client: client.abort(self.update_id), targets))

    def end(self, results: Sequence[PushResult]) -> list[PushResult]:
        """The update's results; if the trainer could not make its bytes, it is aborted on every rollout that
        did not commit it (one that reconnected may have, from bytes made afresh), and each of their results
        says why (the tensor and the cause), whatever that rollout's stream saw of it."""
        cause = self.failure
        if cause is None:
            return list(results)
        logger.error("update %s (version %d) not sent: %s", self.update_id, self.outgoing.version, cause)
        self.abort(r.address for r in results if not r.ok)
        why = f"version {self.outgoing.version} not sent: {cause}"
        return [r if r.ok else self.failed(r.address, why, seconds=r.seconds) for r in results]
