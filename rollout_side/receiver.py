"""The rollout's side of the version handshake: validate, stage, verify, then swap atomically.

Nothing here knows about protobuf or gRPC. An update moves through begin -> chunks -> commit;
any refusal raises a `WeightSyncError` and leaves the served version untouched, because bytes
are only ever written into a staging buffer the engine does not read until `commit`.

Delta updates (weightsync/delta.py) patch a staged copy of the committed version: the spare
staging buffer, kept equal to the committed version's bytes where that is cheap (rollout_side/spare.py).
A delta whose base is not exactly what the spare holds is refused with "send a full version", and
every patched tensor is checked against its manifest checksum before commit.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rollout_side.engines.base import Engine, ParamSpec
from rollout_side.shared_file import SharedFile, resolve
from rollout_side.spare import Spare
from rollout_side.staging import Router, Verifier
from weightsync import metrics
from weightsync.checkpoint import load_checkpoint
from weightsync.delta import Encoding, TransferPlan
from weightsync.errors import (
    BadManifest,
    BusyError,
    ChecksumMismatch,
    ChunkCorrupt,
    EngineUnavailable,
    IncompleteUpdate,
    NonFiniteWeights,
    Reason,
    SharedMemoryRefused,
    StaleVersion,
    TooLarge,
    UnknownUpdate,
    VersionNotReached,
    WeightSyncError,
)
from weightsync.manifest import Manifest, TensorEntry, manifest_of_state, tensor_bytes
from weightsync.wire import chunk_checksum, chunk_count, chunk_span

__all__ = ["Phase", "Receiver", "Status"]

logger = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 64 << 20


class Phase(enum.Enum):
    """Mirrors weightsync.v1.RolloutState."""

    BOOTING = 1
    DUMMY = 2
    RECEIVING = 3
    SERVING = 4
    FAILED = 5


@dataclass(frozen=True, kw_only=True, slots=True)
class Status:
    phase: Phase
    weight_version: int
    fingerprint: str
    update_id: str = ""
    receiving_version: int = 0
    received_bytes: int = 0
    detail: str = ""


@dataclass(kw_only=True, slots=True)
class _Update:
    id: str
    version: int
    manifest: Manifest
    chunk_bytes: int
    expected_fingerprint: str
    staging: torch.Tensor
    received: bytearray
    plan: TransferPlan
    router: Router
    verifier: Verifier
    base_fingerprint: str = ""  # a delta's base: the committed version when it began
    file: SharedFile | None = None  # where the bytes come from instead of chunks (shared memory)
    received_chunks: int = 0
    received_bytes: int = 0
    contiguous: int = 0  # the first chunk not yet received: every wire byte before it has arrived
    last_activity: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)

    @property
    def chunk_count(self) -> int:
        return len(self.received)

    @property
    def wire_bytes(self) -> int:
        """Bytes the chunks carry: the manifest's total for a full update, less for a delta."""
        return self.plan.total_bytes


class Receiver:
    """Owns the update in progress and the committed version's identity for one engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        idle_timeout: float = 60.0,
        max_update_seconds: float = 1800.0,
        reject_nonfinite: bool = False,
        shared_memory_dir: Path | None = None,
    ) -> None:
        self.engine = engine
        self.shared_memory_dir = shared_memory_dir.resolve() if shared_memory_dir else None
        self.max_chunk_bytes = max_chunk_bytes
        self.idle_timeout = idle_timeout
        self.max_update_seconds = max_update_seconds
        self.reject_nonfinite = reject_nonfinite
        self._listeners: list[Callable[[Phase], Awaitable[None]]] = []
        self._notifications: set[asyncio.Task[None]] = set()
        self._phase = Phase.BOOTING
        self._update: _Update | None = None
        self._spare = Spare(engine)  # the next staging buffer, and the delta base
        self._fingerprint = ""
        self._high_water = 0  # highest version ever committed: versions only move forward
        self._detail = ""
        self._committing = False
        self._committed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        self._specs = engine.param_specs()
        self._max_bytes = _max_bytes(self._specs)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self, weights: Path | None = None, version: int = 1) -> None:
        """Boots the engine: dummy weights, or (standalone) real ones committed as `version`."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())
        if weights is None:
            await self.engine.start()
            self._set_phase(Phase.DUMMY)
            return
        manifest = manifest_of_state(load_checkpoint(weights))
        self._check_names(manifest)
        await self.engine.start(weights, version)
        self._fingerprint, self._high_water, self._spare.manifest = manifest.fingerprint, version, manifest
        metrics.Rollout.weight_version.set(version)
        logger.info("standalone: serving %s as version %d (%s)", weights, version, self._fingerprint)
        self._set_phase(Phase.SERVING)

    async def close(self) -> None:
        """Drops an update in progress, stops background work and the engine."""
        if self._update is not None:
            self.abort(self._update.id, "the rollout is shutting down")
        if self._reaper is not None:
            self._reaper.cancel()
        self._spare.close()
        await self.engine.shutdown()

    def status(self) -> Status:
        update = self._update
        return Status(
            phase=self._phase,
            weight_version=self.engine.weight_version,
            fingerprint=self._fingerprint if self.engine.weight_version else "",
            update_id=update.id if update else "",
            receiving_version=update.version if update else 0,
            received_bytes=update.received_bytes if update else 0,
            detail=self._detail,
        )

    # -- the handshake ------------------------------------------------------------------------

    def begin(
        self,
        version: int,
        manifest: Manifest,
        chunk_bytes: int,
        fingerprint: str = "",
        update_id: str = "",
        *,
        base_fingerprint: str = "",
        plan: TransferPlan | None = None,
        checksums_at_commit: bool = False,
    ) -> _Update:
        """Accepts or refuses an announced version; on success bytes may start to flow.

        With `base_fingerprint`, the update is a delta: `plan` says which tensors come as patches
        against the committed version. Call `settle(delta=True)` first, so the base is in place.
        With `checksums_at_commit`, the manifest carries no checksums: they come with `commit`.
        """
        self._reap_idle()
        if self._update is not None or self._committing:
            raise BusyError(
                f"update {self._update.id if self._update else '(committing)'} is in progress; "
                "one update at a time per rollout"
            )
        if self._spare.busy:
            raise BusyError("the delta base is being brought up to date; await settle() before begin()")
        if version <= self._high_water:
            raise StaleVersion(f"version {version} is not newer than committed version {self._high_water}")
        if manifest.total_bytes > self._max_bytes:
            raise TooLarge(f"update is {manifest.total_bytes} bytes; this model takes {self._max_bytes}")
        if not MIN_CHUNK_BYTES <= chunk_bytes <= self.max_chunk_bytes:
            raise TooLarge(f"chunk_bytes {chunk_bytes} outside [{MIN_CHUNK_BYTES}, {self.max_chunk_bytes}]")
        self._check_names(manifest)
        _check_checksums_at_commit(manifest, checksums_at_commit, fingerprint, base_fingerprint, plan)
        if fingerprint and fingerprint != manifest.fingerprint:
            raise BadManifest("announced fingerprint does not match the manifest")
        plan = plan or TransferPlan.full(manifest)
        plan.check_against(manifest)
        if plan.patches and not base_fingerprint:
            raise BadManifest("a plan with patches needs base_fingerprint: the version they apply to")
        if base_fingerprint:
            committed = self._fingerprint if self.engine.weight_version else ""
            self._spare.check_base(base_fingerprint, committed, self.engine.weight_version, manifest)
        staging = self._spare.take(manifest.total_bytes)
        staged = tensor_bytes(staging)
        patches = memoryview(bytearray(sum(t.wire_bytes for t in plan.transfers if t.encoding == Encoding.PATCH)))
        update = _Update(
            id=update_id or uuid.uuid4().hex,
            version=version,
            manifest=manifest,
            chunk_bytes=chunk_bytes,
            expected_fingerprint="" if manifest.pending else manifest.fingerprint,
            staging=staging,
            received=bytearray(chunk_count(plan.total_bytes, chunk_bytes)),
            plan=plan,
            router=Router(manifest, plan, staged, patches),
            verifier=Verifier(manifest, staged, plan, patches),
            base_fingerprint=base_fingerprint,
        )
        self._update = update
        self._set_phase(Phase.RECEIVING)
        logger.info(
            "update %s: receiving version %d, %d tensors, %.1f MB%s",
            update.id,
            version,
            len(manifest),
            manifest.total_bytes / 1e6,
            f" as a delta of {plan.total_bytes / 1e6:.1f} MB ({plan.patches} patches)" if base_fingerprint else "",
        )
        return update

    async def settle(self, *, delta: bool = False) -> None:
        """Waits until the spare may be written; for a `delta`, rebuilds its copy of the base if needed."""
        idle = self._update is None and not self._committing
        committed = self._fingerprint if self.engine.weight_version else ""
        await self._spare.settle(committed=committed, rebuild=delta and idle)

    def put_chunk(self, update_id: str, index: int, checksum: int, data: memoryview) -> int:
        """Verifies one chunk and copies it into staging; any fault aborts the whole update."""
        update = self._current(update_id)
        try:
            if update.file is not None:
                raise ChunkCorrupt("this update's bytes come from its shared-memory file, not in chunks")
            if index >= update.chunk_count:
                raise ChunkCorrupt(f"chunk {index} is outside the layout ({update.chunk_count} chunks)")
            start, end = chunk_span(index, update.wire_bytes, update.chunk_bytes)
            if data.nbytes != end - start:
                raise ChunkCorrupt(f"chunk {index} has {data.nbytes} bytes, expected {end - start}")
            if update.received[index]:
                raise ChunkCorrupt(f"chunk {index} arrived twice")
            if chunk_checksum(data) != checksum:
                raise ChunkCorrupt(f"chunk {index} failed its checksum")
        except ChunkCorrupt as error:
            self.abort(update.id, str(error))
            raise
        update.router.write(start, data)
        update.received[index] = 1
        update.received_chunks += 1
        update.received_bytes += data.nbytes
        metrics.Rollout.received_bytes.inc(data.nbytes)
        update.last_activity = time.monotonic()
        # Checksum tensors while their bytes are still in cache: commit then only reads the result. Only bytes
        # with no gap before them count (an earlier chunk may still be missing), and a patch only once all of it
        # has arrived, so the verifier may stop short of this chunk's end until a later chunk lands.
        while update.contiguous < update.chunk_count and update.received[update.contiguous]:
            update.contiguous += 1
        ready = min(update.contiguous * update.chunk_bytes, update.wire_bytes)
        if ready > update.verifier.position:
            update.verifier.feed(ready)
        return data.nbytes

    def open_file(self, update_id: str, name: str) -> None:
        """Takes the update's bytes from a co-located trainer's file (rollout_side/shared_file.py), not chunks."""
        update = self._current(update_id)
        try:
            if update.plan.patches or update.base_fingerprint:
                raise SharedMemoryRefused("a shared-memory file carries a full version only")
            update.file = SharedFile(resolve(self.shared_memory_dir, name), update.wire_bytes)
        except (OSError, ValueError) as error:
            self.abort(update.id, f"cannot read {name}: {error}")
            raise SharedMemoryRefused(f"cannot read the shared-memory file {name!r}: {error}") from None
        except WeightSyncError as error:
            self.abort(update.id, str(error))
            raise

    async def read_file(self, update_id: str, upto: int) -> int:
        """Reads the update's file up to byte `upto` (announced as written) into staging; returns bytes read."""
        update = self._current(update_id)
        try:
            if update.file is None:
                raise ChunkCorrupt("file progress for an update whose bytes come in chunks")

            def block_done(end: int) -> None:
                update.verifier.feed(end)
                update.received_bytes = end
                update.last_activity = time.monotonic()

            got = await update.file.read(tensor_bytes(update.staging), upto, block_done, lambda: self._update is update)
        except ChunkCorrupt as error:
            self.abort(update.id, str(error))
            raise
        metrics.Rollout.received_bytes.inc(got)
        if update.file.position == update.wire_bytes:
            update.received[:] = b"\x01" * update.chunk_count
            update.received_chunks = update.contiguous = update.chunk_count
            update.file.close()
        return got

    async def stage_file(self, update_id: str, name: str) -> int:
        """Reads a whole file the trainer has finished writing; returns its bytes."""
        self.open_file(update_id, name)
        return await self.read_file(update_id, self._current(update_id).wire_bytes)

    async def commit(
        self, update_id: str, checksums: Sequence[str] = (), fingerprint: str = ""
    ) -> tuple[int, str, float]:
        """Verifies the staged version and swaps it in; returns (version, fingerprint, seconds).

        `checksums` and `fingerprint` complete the manifest of an update begun with checksums_at_commit.
        """
        update = self._current(update_id)
        started = time.perf_counter()
        self._committing = True
        self._update = None
        if update.file is not None:
            update.file.close()  # what is not in staging by now never will be
        try:
            self._verify(update, checksums, fingerprint)
            if self.reject_nonfinite:
                _check_finite(update.manifest, update.staging)
            try:
                returned = await self.engine.load(update.staging, update.manifest, update.version)
            except BadManifest:
                raise  # refused before the engine touched its weights
            except Exception as error:
                metrics.Rollout.updates.labels("failed").inc()
                metrics.Rollout.weight_version.set(0)
                self._detail = f"loading version {update.version} into the engine failed: {error}"
                logger.exception("update %s: %s", update.id, self._detail)
                self._spare.forget()
                self._set_phase(Phase.FAILED)
                raise EngineUnavailable(self._detail) from error
        except (IncompleteUpdate, NonFiniteWeights, BadManifest) as error:
            logger.warning("update %s refused at commit: %s", update.id, error)
            metrics.Rollout.updates.labels("refused").inc()
            self._spare.put_back(update.staging)  # holds (part of) the refused version
            self._set_phase(self._resting_phase())
            raise
        finally:
            self._committing = False
        previous = self._fingerprint if self.engine.weight_version else ""
        self._fingerprint, self._high_water, self._detail = update.manifest.fingerprint, update.version, ""
        self._spare.committed(
            update.staging,
            update.manifest,
            returned,
            previous=previous,
            fingerprint=self._fingerprint,
            base=update.base_fingerprint,
            changed=update.verifier.changed,
        )
        self._set_phase(Phase.SERVING)
        seconds = time.perf_counter() - started
        metrics.Rollout.updates.labels("committed").inc()
        metrics.Rollout.sync_seconds.observe(time.monotonic() - update.started)
        metrics.Rollout.swap_seconds.observe(seconds)
        metrics.Rollout.weight_version.set(update.version)
        logger.info(
            "update %s: committed version %d in %.3f s (%s)", update.id, update.version, seconds, self._fingerprint
        )
        async with self._committed:
            self._committed.notify_all()
        return update.version, self._fingerprint, seconds

    def abort(self, update_id: str, reason: str) -> None:
        """Drops the update in progress; the served version is untouched."""
        update = self._current(update_id)
        logger.warning("update %s (version %d) aborted: %s", update.id, update.version, reason)
        metrics.Rollout.updates.labels("aborted").inc()
        self._update = None
        if update.file is not None:
            update.file.close()
        self._spare.put_back(update.staging)  # partly written
        self._set_phase(self._resting_phase())

    async def wait_for_version(self, version: int, timeout: float | None) -> None:
        """Waits until `version` or newer is served; raises VersionNotReached at the deadline."""
        async with self._committed:
            try:
                await asyncio.wait_for(self._committed.wait_for(lambda: self.engine.weight_version >= version), timeout)
            except TimeoutError:
                raise VersionNotReached(
                    f"version {version} was not committed before the deadline (serving {self.engine.weight_version})"
                ) from None

    # -- helpers ------------------------------------------------------------------------------

    def _current(self, update_id: str) -> _Update:
        update = self._update
        if update is None or update.id != update_id:
            raise UnknownUpdate(f"no update {update_id!r} in progress; begin a new one")
        return update

    def _check_names(self, manifest: Manifest) -> None:
        covered: dict[str, TensorEntry] = {}
        for entry in manifest:
            spec = self._specs.get(entry.name)
            if spec is None:
                raise BadManifest(f"unknown tensor {entry.name!r}: this model has no such parameter")
            if entry.shape != spec.shape:
                raise BadManifest(
                    f"tensor {entry.name!r} has shape {list(entry.shape)}, model expects {list(spec.shape)}"
                )
            if entry.dtype != spec.dtype:
                raise BadManifest(f"tensor {entry.name!r} is {entry.dtype}, this rollout takes {spec.dtype}")
            first = covered.setdefault(spec.key, entry)
            if first.checksum != entry.checksum:
                raise BadManifest(f"tensors {first.name!r} and {entry.name!r} are tied in this model but differ")
        missing = sorted({s.key for s in self._specs.values()} - covered.keys())
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise BadManifest(f"missing tensors: {shown}; a full version must carry every parameter")

    def _verify(self, update: _Update, checksums: Sequence[str], fingerprint: str) -> None:
        if update.file is not None and update.file.position < update.wire_bytes:
            raise IncompleteUpdate(
                f"the shared-memory file was announced up to byte {update.file.position} of {update.wire_bytes}"
            )
        missing = update.chunk_count - update.received_chunks
        if missing:
            raise IncompleteUpdate(f"{missing} of {update.chunk_count} chunks have not arrived")
        update.verifier.feed(update.wire_bytes)  # a no-op unless chunks came out of order
        if update.verifier.mismatch is not None:
            message = f"tensor {update.verifier.mismatch!r} {update.verifier.reason}"
            if update.base_fingerprint:
                raise ChecksumMismatch(f"{message}; send a full version", reason=Reason.FULL_VERSION_NEEDED)
            raise ChecksumMismatch(message)
        if not update.manifest.pending:
            if checksums or fingerprint:
                raise BadManifest("checksums come with Commit only for an update begun with checksums_at_commit")
            return
        if not fingerprint:
            raise BadManifest("this update was begun with checksums_at_commit: Commit must carry the fingerprint")
        manifest = update.manifest.with_checksums(checksums)
        for entry, got in zip(manifest, update.verifier.checksums, strict=True):
            if got != entry.checksum:
                raise ChecksumMismatch(f"tensor {entry.name!r} does not match its checksum")
        if fingerprint != manifest.fingerprint:
            raise BadManifest("the fingerprint in Commit does not match the checksums it completes")
        self._check_names(manifest)  # tied tensors must be equal, which only checksums show
        update.manifest = manifest

    async def _reap_forever(self) -> None:
        """Aborts an update whose trainer went silent, so it never blocks the next one for long."""
        while True:
            await asyncio.sleep(min(self.idle_timeout / 4, 5.0))
            self._reap_idle()

    def _reap_idle(self) -> None:
        update = self._update
        if update is None:
            return
        now = time.monotonic()
        if now - update.last_activity > self.idle_timeout:
            self.abort(update.id, f"no activity for {self.idle_timeout:.0f} s")
        elif now - update.started > self.max_update_seconds:
            self.abort(update.id, f"not committed within {self.max_update_seconds:.0f} s")

    def _resting_phase(self) -> Phase:
        if self.engine.weight_version:
            return Phase.SERVING
        return Phase.FAILED if self._high_water else Phase.DUMMY

    def add_listener(self, listener: Callable[[Phase], Awaitable[None]]) -> None:
        """Calls `listener` (e.g. the health service) on every phase change, in order."""
        self._listeners.append(listener)

    def _set_phase(self, phase: Phase) -> None:
        self._phase = phase
        for listener in self._listeners:
            task = asyncio.get_running_loop().create_task(listener(phase))
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)


_Verifier = Verifier  # the name tests and older callers import


def _check_checksums_at_commit(
    manifest: Manifest, at_commit: bool, fingerprint: str, base_fingerprint: str, plan: TransferPlan | None
) -> None:
    """A manifest comes with its checksums, or (checksums_at_commit, full versions only) without any."""
    if not at_commit:
        if manifest.pending:
            raise BadManifest("the manifest has no checksums; set checksums_at_commit to send them with Commit")
        return
    if not manifest.pending:
        raise BadManifest("checksums_at_commit: the manifest must leave every checksum empty")
    if fingerprint:
        raise BadManifest("checksums_at_commit: the fingerprint comes with Commit, not BeginUpdate")
    if base_fingerprint or plan is not None:
        raise BadManifest("checksums_at_commit is for full versions, not deltas")


def _check_finite(manifest: Manifest, staging: torch.Tensor) -> None:
    """Refuses a version holding NaN or infinity: almost always a diverged trainer, never wanted."""
    for name, view in manifest.views(staging):
        if not bool(torch.isfinite(view).all()):
            raise NonFiniteWeights(f"tensor {name!r} holds NaN or infinite values; refused (--reject-nonfinite)")


def _max_bytes(specs: Mapping[str, ParamSpec]) -> int:
    """The largest valid update: every name once, tied aliases included."""
    return sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())
