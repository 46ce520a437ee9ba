"""Every error weightsync raises, each carrying the gRPC status a servicer answers with."""

from __future__ import annotations

import grpc

__all__ = [
    "BadManifest",
    "BaseMismatch",
    "BadRequest",
    "BusyError",
    "ChunkCorrupt",
    "EngineUnavailable",
    "IncompleteUpdate",
    "NoWeights",
    "NonFiniteWeights",
    "SharedMemoryRefused",
    "StaleVersion",
    "TooLarge",
    "UnknownUpdate",
    "VersionNotReached",
    "WeightSyncError",
]


class WeightSyncError(Exception):
    """Base class; `code` is the gRPC status a servicer answers with."""

    code = grpc.StatusCode.INTERNAL


class BadManifest(WeightSyncError):
    """The announced manifest does not describe this model (names, shapes, dtypes, layout)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BadRequest(WeightSyncError):
    """A request is malformed (both or neither prompt field, out-of-range sampling settings)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class StaleVersion(WeightSyncError):
    """The announced version is not newer than the committed one."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BaseMismatch(WeightSyncError):
    """A delta update's base is not the committed version whose exact bytes this rollout holds.

    Never an error in the data: the rollout restarted, missed a version, or dropped its copy of the
    base. The answer is the same in every case: send a full version.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class SharedMemoryRefused(WeightSyncError):
    """A version offered by shared-memory file this rollout cannot or may not read (see --shared-memory-dir)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class TooLarge(WeightSyncError):
    """The update or a message is larger than this rollout accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class BusyError(WeightSyncError):
    """Another update is in progress on this rollout."""

    code = grpc.StatusCode.ABORTED


class UnknownUpdate(WeightSyncError):
    """The update id names no update in progress (never begun, aborted or already committed)."""

    code = grpc.StatusCode.NOT_FOUND


class ChunkCorrupt(WeightSyncError):
    """A chunk failed its checksum, lies outside the layout, or arrived twice."""

    code = grpc.StatusCode.DATA_LOSS


class IncompleteUpdate(WeightSyncError):
    """Commit was asked before every byte arrived, or the staged bytes fail verification."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NonFiniteWeights(WeightSyncError):
    """The staged version holds NaN or infinite values and the rollout was told to refuse them."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NoWeights(WeightSyncError):
    """No complete version is committed, so Generate cannot answer."""

    code = grpc.StatusCode.UNAVAILABLE


class VersionNotReached(WeightSyncError):
    """The caller asked for a newer version than the one served."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EngineUnavailable(WeightSyncError):
    """The engine failed; it holds no complete version until the next commit."""

    code = grpc.StatusCode.UNAVAILABLE
