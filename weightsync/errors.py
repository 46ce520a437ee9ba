"""Every error weightsync raises, and the one way its reason travels: `google.rpc.ErrorInfo` in the status.

Each error has a gRPC status `code` and a machine-readable `reason` (a `Reason`). Servicers send
both (`to_status`); clients branch on `reason_of(error)`, never on message text, so messages may be
reworded freely. The reasons are this package's API, like the proto: add new ones, never rename.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DOMAIN",
    "AdapterBaseMismatch",
    "AlreadyCommitted",
    "BadManifest",
    "BadPatch",
    "BadRequest",
    "BaseMismatch",
    "BusyError",
    "ChecksumMismatch",
    "ChunkCorrupt",
    "EngineUnavailable",
    "IncompleteUpdate",
    "InstalledMismatch",
    "NoWeights",
    "NonFiniteWeights",
    "OutOfSharedMemory",
    "Reason",
    "SharedMemoryRefused",
    "StagedMismatch",
    "StaleVersion",
    "TooLarge",
    "UnknownUpdate",
    "VersionNotReached",
    "WeightSyncError",
    "metadata_of",
    "reason_of",
    "to_status",
]

DOMAIN = "weightsync.v1"  # ErrorInfo.domain of every reason below


class Reason(str, enum.Enum):
    """Why a rollout refused: `ErrorInfo.reason`, stable across releases and languages."""

    BAD_MANIFEST = "BAD_MANIFEST"
    BAD_PATCH = "BAD_PATCH"
    BAD_REQUEST = "BAD_REQUEST"
    STALE_VERSION = "STALE_VERSION"
    FULL_VERSION_NEEDED = "FULL_VERSION_NEEDED"  # a delta cannot apply here; the same version in full can
    SHARED_MEMORY_REFUSED = "SHARED_MEMORY_REFUSED"
    TOO_LARGE = "TOO_LARGE"
    UPDATE_IN_PROGRESS = "UPDATE_IN_PROGRESS"
    UNKNOWN_UPDATE = "UNKNOWN_UPDATE"
    CHUNK_CORRUPT = "CHUNK_CORRUPT"
    INCOMPLETE_UPDATE = "INCOMPLETE_UPDATE"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    NON_FINITE_WEIGHTS = "NON_FINITE_WEIGHTS"
    NO_WEIGHTS = "NO_WEIGHTS"
    VERSION_NOT_REACHED = "VERSION_NOT_REACHED"
    ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FINGERPRINT_MISMATCH = "FINGERPRINT_MISMATCH"  # found by the trainer: the rollout committed other bytes
    INTERNAL = "INTERNAL"
    ALREADY_COMMITTED = "ALREADY_COMMITTED"  # the announced version is the one served; metadata["fingerprint"] is its
    # read back from the engine after a load, a tensor does not match its checksum; metadata["tensors"] names them
    INSTALLED_MISMATCH = "INSTALLED_MISMATCH"
    ADAPTER_BASE_MISMATCH = "ADAPTER_BASE_MISMATCH"  # a LoRA adapter for another base: push that base first


class WeightSyncError(Exception):
    """Base class: `code` is the gRPC status a servicer answers with, `reason` the ErrorInfo reason.

    `metadata` (string to string) travels in ErrorInfo too, for facts a client may act on.
    """

    code = grpc.StatusCode.INTERNAL
    reason = Reason.INTERNAL

    def __init__(self, message: str, *, reason: Reason | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class BadManifest(WeightSyncError):
    """The announced manifest does not describe this model (names, shapes, dtypes, layout)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.BAD_MANIFEST


class BadPatch(WeightSyncError):
    """A delta's transfer plan or one of its patches is malformed (weightsync/delta.py)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.BAD_PATCH


class BadRequest(WeightSyncError):
    """A request is malformed (both or neither prompt field, out-of-range sampling settings)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.BAD_REQUEST


class StaleVersion(WeightSyncError):
    """The announced version is not newer than the committed one."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.STALE_VERSION


class AlreadyCommitted(WeightSyncError):
    """The announced version is the committed one, with the same fingerprint as far as the rollout can tell.

    A retry after a lost Commit answer lands here. ErrorInfo metadata carries the committed `version` and
    `fingerprint`: a trainer whose checksums were still pending compares that fingerprint with its own.
    """

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = Reason.ALREADY_COMMITTED


class AdapterBaseMismatch(WeightSyncError):
    """A LoRA adapter names a base model this rollout does not hold (metadata["base_fingerprint"] is the one it does).

    The served version is untouched; the trainer pushes that base (a full version) first, then the adapter.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.ADAPTER_BASE_MISMATCH


class BaseMismatch(WeightSyncError):
    """A delta update's base is not the committed version whose exact bytes this rollout holds.

    Never an error in the data: the rollout restarted, missed a version, or dropped its copy of the
    base. The answer is the same in every case: send a full version.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.FULL_VERSION_NEEDED


class SharedMemoryRefused(WeightSyncError):
    """A version offered by shared-memory file this rollout cannot or may not read (see --shared-memory-dir)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.SHARED_MEMORY_REFUSED


class TooLarge(WeightSyncError):
    """The update or a message is larger than this rollout accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.TOO_LARGE


class OutOfSharedMemory(TooLarge):
    """A file in shared memory (/dev/shm, a memory-backed emptyDir) does not fit there: say how big it is."""


class BusyError(WeightSyncError):
    """Another update is in progress on this rollout."""

    code = grpc.StatusCode.ABORTED
    reason = Reason.UPDATE_IN_PROGRESS


class UnknownUpdate(WeightSyncError):
    """The update id names no update in progress (never begun, aborted or already committed)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.UNKNOWN_UPDATE


class ChunkCorrupt(WeightSyncError):
    """A chunk failed its checksum, lies outside the layout, or arrived twice."""

    code = grpc.StatusCode.DATA_LOSS
    reason = Reason.CHUNK_CORRUPT


class IncompleteUpdate(WeightSyncError):
    """Commit was asked before every byte arrived."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.INCOMPLETE_UPDATE


class ChecksumMismatch(IncompleteUpdate):
    """Every byte arrived but a staged tensor fails its checksum (for a delta: FULL_VERSION_NEEDED)."""

    reason = Reason.CHECKSUM_MISMATCH


class InstalledMismatch(WeightSyncError):
    """What the engine holds after a load, read back, differs from the trainer's checksums (or lacks a tensor).

    The staged bytes were right; the engine's load lost or changed some (a name that no longer maps, a
    skipped tensor, a corrupted copy). The rollout serves nothing until a later version verifies.
    ErrorInfo metadata: `tensors` (the first that differ, comma-separated) and `version`.
    """

    code = grpc.StatusCode.DATA_LOSS
    reason = Reason.INSTALLED_MISMATCH


class StagedMismatch(InstalledMismatch, BadManifest):
    """The bytes an engine was about to install, hashed before its swap, differ from the trainer's checksums.

    Found before the engine touched its weights (the torch engine on CPU: torch_engine.py), so the version
    served before keeps serving. It is an InstalledMismatch (same reason and metadata, for clients) and a
    BadManifest, the receiver's mark of a load refused before the engine changed anything (receiver.py).
    """


class NonFiniteWeights(WeightSyncError):
    """The staged version holds NaN or infinite values and the rollout was told to refuse them."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.NON_FINITE_WEIGHTS


class NoWeights(WeightSyncError):
    """No complete version is committed, so Generate cannot answer."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.NO_WEIGHTS


class VersionNotReached(WeightSyncError):
    """The caller asked for a newer version than the one served."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.VERSION_NOT_REACHED


class EngineUnavailable(WeightSyncError):
    """The engine failed; it holds no complete version until the next commit."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.ENGINE_UNAVAILABLE


def to_status(
    code: grpc.StatusCode, message: str, reason: Reason, metadata: Mapping[str, str] | None = None
) -> grpc.Status:
    """A status carrying `reason` as `google.rpc.ErrorInfo` in its details, for `context.abort_with_status`."""
    info = error_details_pb2.ErrorInfo(reason=reason.value, domain=DOMAIN, metadata=dict(metadata or {}))
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


def reason_of(error: grpc.RpcError) -> Reason | None:
    """The weightsync reason a failed call carries; None for other failures (transport, older rollouts)."""
    info = _error_info(error)
    if info is None:
        return None
    try:
        return Reason(info.reason)
    except ValueError:
        return None


def metadata_of(error: grpc.RpcError) -> dict[str, str]:
    """The ErrorInfo metadata a failed call carries (e.g. the committed fingerprint); empty if none."""
    info = _error_info(error)
    return dict(info.metadata) if info is not None else {}


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]  # a failed sync call is also a grpc.Call
    except (AttributeError, ValueError):
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None
