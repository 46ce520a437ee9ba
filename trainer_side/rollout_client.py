"""One rollout's update client: the publisher holds one per rollout, and pushes each update through it.

An update is BeginUpdate (version, manifest, and how the bytes will arrive), then the chunks, or
nothing when the rollout reads a shared-memory file, then Commit. The answer counts only if the
rollout committed our version with our fingerprint; anything else is a failed PushResult that says
why, and an update the rollout refused midway is aborted so it stops holding it open.

A cut connection is not the end of a push: the client reconnects and announces the same update again
(bounded retries with backoff). The rollout held the update's verified chunks when its stream broke,
says which in BeginUpdateResponse.held_chunks, and only the others are sent; Commit then checks every
tensor as always. A push that gives up on a cut connection leaves the update held there, so a re-run of
the same version (a crashed `push`, run again) resumes it the same way. A rollout that answers
ALREADY_COMMITTED holds this version already: the push is ok if its fingerprint is ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from tqdm import tqdm

from trainer_side.chunk_window import ChunkWindow, counted
from trainer_side.outgoing import Outgoing, commit_request
from trainer_side.push_result import PushResult, describe, wants_full
from trainer_side.resume import chunk_size, held_indices, held_mask, own_chunks
from weightsync.channel import open_channel, raw_push_chunks
from weightsync.errors import Reason, metadata_of, reason_of
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from weightsync.wire import chunk_count

if TYPE_CHECKING:
    from trainer_side.session import UpdateSession

__all__ = ["PushResult", "RolloutClient", "describe", "wants_full"]

logger = logging.getLogger(__name__)

RETRIES = 3  # reconnections per push after a cut connection
BACKOFF = 0.5  # seconds before the first reconnection, doubling after each
RECONNECT_TIMEOUT = 20.0  # seconds a reconnection may wait for the rollout to be reachable again
# Seconds a push waits for a rollout's channel to connect before BeginUpdate: a restarted rollout's channel
# may still be backing off from the failed connects of its downtime when the port listens again.
CONNECT_TIMEOUT = 10.0
# A failed call with one of these codes and no weightsync reason is the connection's, not a refusal.
TRANSPORT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


class _Attempt(Exception):
    """How one attempt ended short of a commit: `error` the failed call, `accepted` whether BeginUpdate was."""

    def __init__(self, error: grpc.RpcError, *, accepted: bool, held: int) -> None:
        super().__init__(describe(error))
        self.error = error
        self.accepted = accepted
        self.held = held  # bytes the rollout held when this attempt resumed the update


class RolloutClient:
    """The channel to one rollout, and the calls a push makes on it."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        metadata: tuple[tuple[str, str], ...] | None,
        timeout: float,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata = metadata
        self._channel = open_channel(address, credentials)
        self._stub = pb_grpc.WeightSyncStub(self._channel)
        self._push_chunks = raw_push_chunks(self._channel)  # chunks arrive already encoded, once for all rollouts

    def push(
        self,
        session: UpdateSession,
        *,
        chunk_bytes: int,
        window: ChunkWindow | None,
        slot: int,
        streams: int = 1,
        progress: bool | None = None,
        relay_to: Sequence[pb.RelayTarget] = (),
        shared_file: str = "",
    ) -> PushResult:
        """This rollout's part of `session`: its chunks from `window` (this rollout reads at `slot`); with
        `shared_file`, the rollout reads that file instead, as far as `window`'s messages say it is written,
        or all of it at once without a window. `progress` None shows a bar only on a terminal.

        After a cut connection (chunks only), reconnects up to `retries` times and resumes the update. An
        update the trainer could not make the bytes of (the window's `failure`) is aborted here."""
        outgoing, update_id = session.outgoing, session.update_id
        started = time.perf_counter()
        bar = tqdm(
            total=outgoing.wire_bytes,
            unit="B",
            unit_scale=True,
            desc=self.address,
            position=slot,
            leave=False,
            disable=None if progress is None else not progress,
        )
        request = outgoing.request(chunk_bytes, update_id, relay_to=relay_to)
        if shared_file:  # written already (the rollout reads it before it answers), or being written
            request.shared_memory_file = shared_file
            request.shared_memory_streamed = window is not None
        reconnects = sent = 0
        afresh = False  # a resume refused at commit was begun again from nothing
        try:
            while True:
                first = reconnects == 0
                try:
                    answer, sent_now, held = self._attempt(
                        outgoing, request, window if first else None, slot, streams, bar, reconnect=not first
                    )
                    sent += sent_now
                    break
                except _NotSent as unsent:
                    self.abort(update_id)
                    why = f"version {outgoing.version} not sent: {unsent.cause}"
                    return session.failed(self.address, why, seconds=time.perf_counter() - started)
                except _Attempt as failed:
                    if first and window is not None:
                        window.leave(slot)  # the others go on without us; a reconnection reads its own chunks
                    error = failed.error
                    reason = error.reason if isinstance(error, _Refused) else reason_of(error)
                    if reason is Reason.ALREADY_COMMITTED:
                        return self._already(session, failed.error, time.perf_counter() - started)
                    if reason is Reason.CHECKSUM_MISMATCH and failed.held and not afresh and not outgoing.is_delta:
                        # The held chunks were another run's bytes of this version and layout: the rollout
                        # refused them at commit and dropped the update, so it begins again from nothing.
                        logger.warning(
                            "%s: resumed update %s refused at commit; sending it afresh", self.address, update_id
                        )
                        afresh = True
                        reconnects += 1
                        continue
                    transport = reason is None and _code(error) in TRANSPORT_CODES
                    if transport and failed.accepted and not shared_file and reconnects < self.retries:
                        reconnects += 1
                        delay = self.backoff * 2 ** (reconnects - 1)
                        logger.warning(
                            "%s: update %s cut (%s); reconnecting in %.1f s to resume it (%d of %d)",
                            self.address,
                            update_id,
                            describe(error),
                            delay,
                            reconnects,
                            self.retries,
                        )
                        time.sleep(delay)
                        continue
                    if (failed.accepted or not first) and not transport:
                        self.abort(update_id)  # refused midway: stop it holding the rollout; cut: keep it for a resume
                    return session.failed(self.address, describe(error), code=_code(error), reason=reason)
        finally:
            if window is not None:
                window.leave(slot)
            bar.close()
        return session.committed(
            self.address,
            answer,
            seconds=time.perf_counter() - started,
            bytes_sent=sent,
            relayed=tuple(answer.relayed),
            held_bytes=held,
            reconnects=reconnects,
        )

    def _attempt(
        self,
        outgoing: Outgoing,
        request: pb.BeginUpdateRequest,
        window: ChunkWindow | None,
        slot: int,
        streams: int,
        bar: tqdm,
        *,
        reconnect: bool,
    ) -> tuple[pb.CommitResponse, int, int]:
        """Begin (or resume), the chunks the rollout lacks, Commit; returns (answer, bytes sent, bytes held).

        The first attempt reads the push's shared `window`; a reconnection makes its own chunks.
        Raises _Attempt when a call fails.
        """
        accepted, held = False, 0
        chunk_bytes, update_id = request.chunk_bytes, request.update_id
        try:
            began = self.begin(
                request,
                timeout=min(self.timeout, RECONNECT_TIMEOUT) if reconnect else self.timeout,
                wait_for_ready=reconnect or None,
            )
            accepted = True
            if outgoing.is_delta and began.chunk_count != chunk_count(outgoing.wire_bytes, chunk_bytes):
                # A rollout from before delta sync ignores the plan and expects the full layout's chunks.
                self.abort(update_id)
                raise _Refused(
                    f"the rollout expects {began.chunk_count} chunks: it does not take deltas",
                    Reason.FULL_VERSION_NEEDED,
                )
            mask = held_mask(began.held_chunks, chunk_count(outgoing.wire_bytes, chunk_bytes))
            held = sum(chunk_size(i, outgoing.wire_bytes, chunk_bytes) for i in held_indices(mask))
            if held:
                logger.info("%s: resuming update %s, %.1f MB held there", self.address, update_id, held / 1e6)
                bar.update(held)
            if request.shared_memory_file and window is None:
                sent = outgoing.wire_bytes  # the rollout read the whole file before it answered
            else:
                if window is None:
                    window = ChunkWindow(own_chunks(outgoing, update_id, chunk_bytes), consumers=1, window=16)
                    slot = 0
                if held:
                    window.skip(slot, mask)
                sent = self.stream(window, slot, streams, bar)
                if window.failure is not None:  # every reader ended early: the update cannot complete
                    raise _NotSent(window.failure)
            manifest = outgoing.manifest  # complete now: every chunk (or the whole file) has gone out
            if manifest is None:
                raise RuntimeError("the update's bytes went out, yet its checksums are still pending")
            answer = self.commit(commit_request(update_id, manifest, pending=request.checksums_at_commit))
        except grpc.RpcError as error:
            raise _Attempt(error, accepted=accepted, held=held) from error
        return answer, sent, held

    def _already(self, session: UpdateSession, error: grpc.RpcError, seconds: float) -> PushResult:
        """ALREADY_COMMITTED: ok if the rollout's fingerprint is ours, else the version is stale there."""
        outgoing = session.outgoing
        theirs = metadata_of(error).get("fingerprint", "")
        manifest = outgoing.manifest
        if manifest is None:  # checksums pending: hash our bytes (without sending them) to compare
            try:
                for _ in own_chunks(outgoing, "", 1 << 20):
                    pass
            except Exception as cause:  # noqa: BLE001 - a tensor that cannot be encoded: say so, as a push does
                return session.failed(self.address, f"version {outgoing.version} not sent: {cause}", seconds=seconds)
            manifest = outgoing.manifest
        assert manifest is not None
        if theirs and theirs == manifest.fingerprint:
            return PushResult(
                address=self.address,
                version=outgoing.version,
                ok=True,
                fingerprint=theirs,
                seconds=seconds,
                delta=outgoing.is_delta,
                already=True,
            )
        return session.failed(
            self.address,
            f"version {outgoing.version} is committed there with fingerprint {theirs or '(unknown)'}, "
            f"not ours ({manifest.fingerprint}); push a newer version",
            code=grpc.StatusCode.FAILED_PRECONDITION,
            reason=Reason.STALE_VERSION,
            seconds=seconds,
        )

    def begin(
        self, request: pb.BeginUpdateRequest, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> pb.BeginUpdateResponse:
        """BeginUpdate (or a resume of it); `timeout` None is the client's. Raises grpc.RpcError if refused.

        Waits (CONNECT_TIMEOUT at most) for the channel to connect first, so that a rollout that restarted
        is pushed to, not failed at once; one still down then fails as it would have."""
        if not wait_for_ready:
            self.ready(min(self.timeout, CONNECT_TIMEOUT))
        began: pb.BeginUpdateResponse = self._stub.BeginUpdate(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
            wait_for_ready=wait_for_ready,
        )
        return began

    def ready(self, timeout: float) -> bool:
        """Whether the channel connects within `timeout` (at once if it is connected)."""
        future = grpc.channel_ready_future(self._channel)
        try:
            future.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            future.cancel()  # unsubscribes, or gRPC polls the channel until it closes
            return False
        return True

    def commit(self, request: pb.CommitRequest, *, timeout: float | None = None) -> pb.CommitResponse:
        """Commit; `timeout` None is the client's. Raises grpc.RpcError if the rollout refuses it."""
        answer: pb.CommitResponse = self._stub.Commit(
            request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata
        )
        return answer

    def stream(self, window: ChunkWindow, slot: int, streams: int, bar: tqdm) -> int:
        """Sends this rollout's chunks over `streams` parallel PushChunks calls; returns bytes sent.

        All streams draw from the rollout's one position in the window, so each chunk goes out
        once, on whichever stream is free. If one stream fails, the others stop and the error is raised.
        """
        reader = window.shared_reader(slot, streams)
        calls = [self._push_chunks.future(counted(reader(), bar), metadata=self._metadata) for _ in range(streams)]
        try:
            return sum(call.result().bytes for call in calls)
        except grpc.RpcError:
            for call in calls:
                call.cancel()
            raise

    def abort(self, update_id: str) -> None:
        """Drops an update the rollout may still hold open; quiet if it already dropped it or is gone."""
        try:
            self._stub.AbortUpdate(pb.AbortUpdateRequest(update_id=update_id), timeout=5, metadata=self._metadata)
        except grpc.RpcError:
            pass

    def drop_update(self, timeout: float) -> tuple[bool, str]:
        """Aborts whatever update this rollout holds (in progress, or interrupted and held for a resume), for
        an operator; returns (ok, what happened). Its trainer, if alive, fails with UNKNOWN_UPDATE."""
        status = self.status(timeout)
        if isinstance(status, str):
            return False, f"{self.address}: {status}"
        if not status.update_id:
            return True, f"{self.address}: no update in progress"
        try:
            self._stub.AbortUpdate(
                pb.AbortUpdateRequest(update_id=status.update_id), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            if reason_of(error) is Reason.UNKNOWN_UPDATE:
                return True, f"{self.address}: update {status.update_id} ended meanwhile"
            return False, f"{self.address}: {describe(error)}"
        return True, f"{self.address}: dropped update {status.update_id} (version {status.receiving_version})"

    def status(self, timeout: float, *, verify: bool = False) -> pb.GetStatusResponse | str:
        """GetStatus (`verify`: after re-reading the installed weights), or why it did not answer."""
        try:
            status: pb.GetStatusResponse = self._stub.GetStatus(
                pb.GetStatusRequest(verify=verify), timeout=timeout, metadata=self._metadata
            )
            return status
        except grpc.RpcError as error:
            return describe(error)

    def close(self) -> None:
        _wait_for_connectivity_poller(self._channel)
        self._channel.close()


def _wait_for_connectivity_poller(channel: grpc.Channel, limit: float = 1.0) -> None:
    """Lets gRPC's connectivity poller (started by `ready`) see it has no subscriber left and stop.

    It checks every 0.2 s; a channel closed before then makes it raise "Channel closed!" in its thread.
    """
    state = getattr(channel, "_connectivity_state", None)  # grpc's own; absent: nothing to wait for
    deadline = time.monotonic() + limit
    while getattr(state, "polling", False) and time.monotonic() < deadline:
        time.sleep(0.01)


class _NotSent(Exception):
    """The trainer could not make this update's bytes (`cause`, e.g. a tensor that failed to encode)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Refused(grpc.RpcError):
    """A refusal found by the trainer itself, raised like the rollout's own."""

    def __init__(self, details: str, reason: Reason) -> None:
        super().__init__(details)
        self._details = details
        self.reason = reason

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.FAILED_PRECONDITION

    def details(self) -> str:
        return self._details


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if hasattr(error, "code") else None
