"""What one rollout answered to a push (PushResult), and how a failed call reads in it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from weightsync.errors import Reason, reason_of
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["PushResult", "describe", "failure", "wants_full"]


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
    held_bytes: int = 0  # wire bytes the rollout held from an interrupted run of this update (not sent again)
    reconnects: int = 0  # how often the push began again: a cut connection, or a resume with other bytes refused
    already: bool = False  # the rollout had committed this version, with our fingerprint, before this push

    def line(self) -> str:
        if self.ok:
            if self.relayed_by:
                return f"{self.address}: version {self.version} committed via relay {self.relayed_by}"
            if self.already:
                return f"{self.address}: version {self.version} already committed, same fingerprint"
            rate = self.bytes_sent / self.seconds / 1e9 if self.seconds else 0.0
            how = f" as a delta of {self.bytes_sent / 1e6:.1f} MB" if self.delta else f" ({rate:.2f} GB/s)"
            if self.held_bytes:
                how += f", resumed: {self.held_bytes / 1e6:.1f} MB were held"
            if self.reconnects:
                how += f", after {self.reconnects} reconnection(s)"
            return f"{self.address}: version {self.version} committed in {self.seconds:.2f} s{how}"
        why = f" [{self.reason.value}]" if self.reason else ""
        return f"{self.address}: version {self.version} FAILED{why}: {self.error}"


def wants_full(result: PushResult) -> bool:
    """Whether a rollout refused a delta in a way the full version of the same push fixes."""
    return result.delta and not result.ok and result.reason == Reason.FULL_VERSION_NEEDED


def describe(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"


def failure(address: str, version: int, why: str, error: grpc.RpcError) -> PushResult:
    """A failed PushResult for a call that raised `error`: its status code and weightsync reason, if any."""
    code = error.code() if hasattr(error, "code") else None
    return PushResult(address=address, version=version, ok=False, error=why, code=code, reason=reason_of(error))
