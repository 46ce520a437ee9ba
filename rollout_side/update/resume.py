"""An update is owned by a live trainer, so what becomes of it when that trainer goes, and what its
next begin meets, is one policy kept apart from the update session (rollout_side/update/receiver.py).

When an update's last chunk stream ends without every chunk (a killed trainer, a cut connection, a
malformed message) it is interrupted at once, so the next begin need not wait for the idle timeout;
its verified chunks stay, and a begin of the same version and layout resumes it (the trainer then
sends only the chunks missing). Commit checks every tensor against its checksum over the staged bytes
whichever run sent them, so a resume is never trusted. A second trainer meanwhile hears who holds
the update (`busy`), and a trainer retrying a begin after a lost Commit answer hears that its version
is already committed (`check_already_committed`). Nothing here knows about protobuf or gRPC.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from rollout_side.update.delta_base import same_layout
from rollout_side.update.incoming import Incoming
from rollout_side.update.lifecycle import Lifecycle, Phase
from rollout_side.update.reaper import overdue
from weightsync import metrics
from weightsync.adapter import AdapterConfig
from weightsync.delta import TransferPlan
from weightsync.errors import AlreadyCommitted, BusyError
from weightsync.manifest import Manifest

__all__ = [
    "busy",
    "check_already_committed",
    "held_detail",
    "interrupt",
    "reap",
    "resume",
    "resumes",
    "stream_closed",
    "stream_opened",
]

logger = logging.getLogger(__name__)


def held_detail(update: Incoming | None) -> str:
    """What status() says of an update interrupted and held for a resume ("" for any other)."""
    if update is None or not update.interrupted:
        return ""
    return f"update {update.id} (version {update.version}) interrupted, held for a resume: {update.interrupted}"


def resumes(
    held: Incoming,
    version: int,
    manifest: Manifest,
    chunk_bytes: int,
    plan: TransferPlan | None,
    base_fingerprint: str,
    *,
    resumable: bool,
    adapter: AdapterConfig | None = None,
) -> bool:
    """Whether an announcement takes over the `held` update rather than replacing it."""
    full = plan or TransferPlan.full(manifest)
    return resumable and held.resumes(version, manifest, chunk_bytes, full, base_fingerprint, adapter)


def stream_opened(lifecycle: Lifecycle[Incoming], update_id: str) -> Incoming:
    """A PushChunks stream starts feeding `update_id`; an interrupted update resumes."""
    update = lifecycle.current(update_id)
    if lifecycle.phase is Phase.INTERRUPTED:
        logger.info("update %s: resumed by a chunk stream", update.id)
        update.interrupted = ""
        lifecycle.move(Phase.RECEIVING, update)
    update.streams += 1
    return update


def stream_closed(lifecycle: Lifecycle[Incoming], update: Incoming, error: str, hold_seconds: float) -> None:
    """A stream that fed `update` ended, failed with `error` if set; the last one to end without every
    chunk (or failed) interrupts the update: its trainer is gone or lost its connection."""
    update.streams -= 1
    if update.streams or lifecycle.receiving is not update:
        return  # others still feed it, or it was committed, aborted or dropped meanwhile
    update.quiet_since = time.monotonic()
    missing = update.chunk_count - update.received_chunks
    if error or missing:
        ended = f"its chunk stream failed ({error})" if error else "its chunk stream ended (closed, cancelled or cut)"
        interrupt(lifecycle, update, f"{ended} with {missing} of {update.chunk_count} chunks missing", hold_seconds)


def reap(
    lifecycle: Lifecycle[Incoming],
    abort: Callable[[str, str], None],
    idle_timeout: float,
    max_seconds: float,
    grace: float,
) -> None:
    """Aborts (`abort(update_id, reason)`) an update whose trainer went silent or that has taken too long;
    interrupts one no stream has fed for `grace`; drops an interrupted one not resumed within `idle_timeout`."""
    update = lifecycle.held
    if update is None:
        return
    now = time.monotonic()
    reason = overdue(
        idle=now - update.last_activity,
        age=now - update.started,
        idle_timeout=idle_timeout,
        max_seconds=max_seconds,
    )
    if reason:
        abort(update.id, f"interrupted ({update.interrupted}), then {reason}" if update.interrupted else reason)
    elif lifecycle.phase is Phase.RECEIVING and not update.streams and now - update.quiet_since > grace:
        why = f"no chunk stream has fed it for {now - update.quiet_since:.0f} s"
        interrupt(lifecycle, update, why, idle_timeout)


def resume(lifecycle: Lifecycle[Incoming], update: Incoming, update_id: str, peer: str) -> Incoming:
    """Hands the held `update` to the trainer that announced it again, under that trainer's id."""
    was = update.interrupted
    update.id, update.peer = update_id or update.id, peer or update.peer
    update.interrupted = ""
    update.quiet_since = update.last_activity = time.monotonic()
    if lifecycle.phase is Phase.INTERRUPTED:
        lifecycle.move(Phase.RECEIVING, update)
    metrics.Rollout.updates.labels("resumed").inc()
    logger.info(
        "update %s: resuming version %d with %d of %d chunks held (%.1f of %.1f MB)%s",
        update.id,
        update.version,
        update.received_chunks,
        update.chunk_count,
        update.received_bytes / 1e6,
        update.wire_bytes / 1e6,
        f"; it was interrupted: {was}" if was else "",
    )
    return update


def interrupt(lifecycle: Lifecycle[Incoming], update: Incoming, why: str, hold_seconds: float) -> None:
    """Marks `update` interrupted for `why`; it is held for a resume for `hold_seconds` (the idle timeout)."""
    update.interrupted = why
    lifecycle.move(Phase.INTERRUPTED)
    metrics.Rollout.updates.labels("interrupted").inc()
    logger.warning(
        "update %s (version %d) interrupted: %s; %.1f of %.1f MB held for a resume for %.0f s",
        update.id,
        update.version,
        why,
        update.received_bytes / 1e6,
        update.wire_bytes / 1e6,
        hold_seconds,
    )


def busy(lifecycle: Lifecycle[Incoming], update: Incoming) -> BusyError:
    """The refusal a second trainer hears while `update` is live: whose it is, how old, which version."""
    age = time.monotonic() - update.started
    committing = " (committing)" if lifecycle.phase is Phase.COMMITTING else ""
    return BusyError(
        f"update {update.id}{committing} of version {update.version}, begun {age:.0f} s ago by "
        f"{update.peer or 'an unknown peer'}, is in progress; one update at a time per rollout "
        "(python -m trainer_side abort drops it)",
        metadata={
            "update_id": update.id,
            "version": str(update.version),
            "age_seconds": f"{age:.1f}",
            "peer": update.peer,
        },
    )


def check_already_committed(
    version: int,
    manifest: Manifest,
    *,
    high_water: int,
    weight_version: int,
    committed: str,
    committed_manifest: Manifest | None,
) -> None:
    """Refuses a begin of the version served, if it is the same version: a retry after a lost Commit answer.

    With checksums pending the fingerprint is not known yet: the same layout is reported, and the trainer
    compares the committed fingerprint (in the error's metadata) with its own.
    """
    if not version or version != high_water or version != weight_version:
        return
    if manifest.pending:
        same = committed_manifest is not None and same_layout(committed_manifest, manifest)
    else:
        same = manifest.fingerprint == committed
    if same:
        raise AlreadyCommitted(
            f"version {version} is already committed here with fingerprint {committed}",
            metadata={"version": str(version), "fingerprint": committed},
        )
