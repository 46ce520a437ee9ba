"""One rollout's update client: the publisher holds one per rollout, and pushes each update through it.

An update is BeginUpdate (version, manifest, and how the bytes will arrive), then the chunks, or
nothing when the rollout reads a shared-memory file, then Commit. The answer counts only if the
rollout committed our version with our fingerprint; anything else is a failed PushResult that says
why, and an update the rollout accepted but that failed midway is aborted so it stops holding it open.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from tqdm import tqdm

from trainer_side.chunk_window import ChunkWindow, counted
from trainer_side.outgoing import Outgoing, commit_request
from weightsync.channel import open_channel, raw_push_chunks
from weightsync.errors import Reason, reason_of
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from weightsync.wire import chunk_count

__all__ = ["PushResult", "RolloutClient", "describe", "wants_full"]


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
    delta: bool = False  # sent as a delta against the version it held (bytes_sent counts the wire bytes)
    code: grpc.StatusCode | None = None  # the status of a failed call; None if ok or no call failed
    reason: Reason | None = None  # why it failed, as the rollout (or, for FINGERPRINT_MISMATCH, we) said

    def line(self) -> str:
        if self.ok:
            if self.relayed_by:
                return f"{self.address}: version {self.version} committed via relay {self.relayed_by}"
            rate = self.bytes_sent / self.seconds / 1e9 if self.seconds else 0.0
            how = f" as a delta of {self.bytes_sent / 1e6:.1f} MB" if self.delta else f" ({rate:.2f} GB/s)"
            return f"{self.address}: version {self.version} committed in {self.seconds:.2f} s{how}"
        why = f" [{self.reason.value}]" if self.reason else ""
        return f"{self.address}: version {self.version} FAILED{why}: {self.error}"


class RolloutClient:
    """The channel to one rollout, and the calls a push makes on it."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        metadata: tuple[tuple[str, str], ...] | None,
        timeout: float,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = metadata
        self._channel = open_channel(address, credentials)
        self._stub = pb_grpc.WeightSyncStub(self._channel)
        self._push_chunks = raw_push_chunks(self._channel)  # chunks arrive already encoded, once for all rollouts

    def push(
        self,
        outgoing: Outgoing,
        update_id: str,
        *,
        chunk_bytes: int,
        window: ChunkWindow | None,
        slot: int,
        streams: int = 1,
        progress: bool | None = None,
        relay_to: Sequence[pb.RelayTarget] = (),
        shared_file: str = "",
    ) -> PushResult:
        """One update: its chunks from `window` (this rollout reads at `slot`); with `shared_file`, the
        rollout reads that file instead, as far as `window`'s messages say it is written, or all of it at
        once without a window. `progress` None shows a bar only on a terminal."""
        started = time.perf_counter()
        version = outgoing.version
        bar = tqdm(
            total=outgoing.wire_bytes,
            unit="B",
            unit_scale=True,
            desc=self.address,
            position=slot,
            leave=False,
            disable=None if progress is None else not progress,
        )
        accepted = False
        try:
            request = outgoing.request(chunk_bytes, update_id, relay_to=relay_to)
            if shared_file:  # written already (the rollout reads it before it answers), or being written
                request.shared_memory_file = shared_file
                request.shared_memory_streamed = window is not None
            began = self._stub.BeginUpdate(request, timeout=self.timeout, metadata=self._metadata)
            accepted = True
            if outgoing.is_delta and began.chunk_count != chunk_count(outgoing.wire_bytes, chunk_bytes):
                # A rollout from before delta sync ignores the plan and expects the full layout's chunks.
                self.abort(update_id)
                return self._failed(
                    outgoing,
                    f"the rollout expects {began.chunk_count} chunks: it does not take deltas",
                    reason=Reason.FULL_VERSION_NEEDED,
                )
            sent = self._stream(window, slot, streams, bar) if window else outgoing.wire_bytes
            manifest = outgoing.manifest  # complete now: every chunk (or the whole file) has gone out
            if manifest is None:
                raise RuntimeError("the update's bytes went out, yet its checksums are still pending")
            answer = self._stub.Commit(
                commit_request(update_id, manifest, pending=request.checksums_at_commit),
                timeout=self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            if accepted:
                self.abort(update_id)
            code = error.code() if hasattr(error, "code") else None
            return self._failed(outgoing, describe(error), code=code, reason=reason_of(error))
        finally:
            if window is not None:
                window.leave(slot)
            bar.close()
        seconds = time.perf_counter() - started
        if answer.weight_version != version or answer.fingerprint != manifest.fingerprint:
            return self._failed(
                outgoing,
                f"rollout committed version {answer.weight_version} with fingerprint {answer.fingerprint}, "
                f"expected {version} with {manifest.fingerprint}",
                reason=Reason.FINGERPRINT_MISMATCH,
                seconds=seconds,
            )
        return PushResult(
            address=self.address,
            version=version,
            ok=True,
            fingerprint=answer.fingerprint,
            seconds=seconds,
            bytes_sent=sent,
            swap_seconds=answer.swap_seconds,
            relayed=tuple(answer.relayed),
            delta=outgoing.is_delta,
        )

    def _failed(
        self,
        outgoing: Outgoing,
        error: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: Reason | None = None,
        seconds: float = 0.0,
    ) -> PushResult:
        return PushResult(
            address=self.address,
            version=outgoing.version,
            ok=False,
            error=error,
            delta=outgoing.is_delta,
            code=code,
            reason=reason,
            seconds=seconds,
        )

    def _stream(self, window: ChunkWindow, slot: int, streams: int, bar: tqdm) -> int:
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

    def status(self, timeout: float) -> pb.GetStatusResponse | str:
        """GetStatus, or the reason the rollout could not be reached."""
        try:
            status: pb.GetStatusResponse = self._stub.GetStatus(
                pb.GetStatusRequest(), timeout=timeout, metadata=self._metadata
            )
            return status
        except grpc.RpcError as error:
            return describe(error)

    def close(self) -> None:
        self._channel.close()


def wants_full(result: PushResult) -> bool:
    """Whether a rollout refused a delta in a way the full version of the same push fixes."""
    return result.delta and not result.ok and result.reason == Reason.FULL_VERSION_NEEDED


def describe(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"
