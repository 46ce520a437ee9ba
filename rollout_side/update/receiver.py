"""One update at a time, from announcement to swap: validate, stage, verify, then swap atomically.

An update moves through begin -> chunks (or a shared-memory file) -> commit, or is aborted; its
phases and the transitions allowed between them live in rollout_side/update/lifecycle.py. An update is
owned by a live trainer: when its streams end without every chunk it is interrupted and held for a
resume (rollout_side/update/resume.py); commit checks every tensor against its checksum over the staged
bytes whichever run sent them, so a resume is never trusted. Any refusal
raises a `WeightSyncError` and leaves the served version untouched, because bytes are only ever
written into a staging buffer the engine does not read until `commit`. Nothing here knows about
protobuf or gRPC.

Delta updates (weightsync/delta.py) patch a staged copy of the committed version: the spare staging
buffer that doubles as the delta base (rollout_side/update/delta_base.py). A delta whose base is not exactly
what it holds is refused with FULL_VERSION_NEEDED, and every patched tensor is checked against its
manifest checksum before commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from rollout_side.engines.base import Engine
from rollout_side.engines.installed import Failpoints, Verification
from rollout_side.update import resume
from rollout_side.update.adapter_base import AdapterBase
from rollout_side.update.compat import check_adapter, check_manifest, max_update_bytes
from rollout_side.update.delta_base import DeltaBase
from rollout_side.update.incoming import Incoming, check_announcement, check_finite
from rollout_side.update.lifecycle import RESTING, Lifecycle, Listener, Phase
from rollout_side.update.reaper import Reaper
from rollout_side.update.staging import Router, Verifier
from rollout_side.update.standalone import boot_from_disk
from rollout_side.update.version_file import VersionFileReader, open_reader
from weightsync import metrics
from weightsync.adapter import AdapterConfig
from weightsync.delta import Encoding, TransferPlan
from weightsync.errors import (
    BadManifest,
    BadRequest,
    BusyError,
    ChunkCorrupt,
    EngineUnavailable,
    IncompleteUpdate,
    InstalledMismatch,
    NonFiniteWeights,
    NoWeights,
    SharedMemoryRefused,
    StaleVersion,
    TooLarge,
    WeightSyncError,
)
from weightsync.limits import MAX_VERSION, version_problem
from weightsync.manifest import Manifest, tensor_bytes
from weightsync.wire import chunk_count

__all__ = ["Phase", "Receiver", "Status"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 64 << 20
# An update no stream has fed for this long (begun but never streamed, or streamed in full and never
# committed) counts as interrupted: a live trainer opens its stream, or commits, within milliseconds.
STREAMLESS_GRACE = 2.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Status:
    phase: Phase  # as on the wire: never COMMITTING
    weight_version: int
    fingerprint: str
    update_id: str = ""
    receiving_version: int = 0
    received_bytes: int = 0
    detail: str = ""
    verification: Verification | None = None  # the last read-back of the installed weights
    base_fingerprint: str = ""  # the full version served, or the base of the LoRA adapter served
    adapter_version: int = 0  # the LoRA adapter version served; 0: none


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
        self.lifecycle: Lifecycle[Incoming] = Lifecycle()  # the phase, and what is served (lifecycle.served)
        self.delta_base = DeltaBase(engine)  # the next staging buffer, and the delta base
        self.adapters = AdapterBase()  # LoRA adapters: the copy of the base they merge into
        self._high_water = 0  # highest version ever committed: versions only move forward
        self._commits: set[asyncio.Task[tuple[int, str, float]]] = set()  # each runs to its end, caller or not
        self._reaper = Reaper(self.reap, min(idle_timeout / 4, 5.0))
        self._boot: asyncio.Task[None] | None = None  # the engine's dummy boot, while and after it runs
        self._reading_back: asyncio.Task[Verification] | None = None  # the on-demand read-back in flight
        self._specs = engine.param_specs()
        self._max_bytes = max_update_bytes(self._specs)
        self.failpoints = Failpoints.from_environ()  # tests only: corrupt-landed

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self, weights: Path | None = None, version: int = 1) -> None:
        """Boots the engine: dummy weights, or (standalone) real ones committed as `version`."""
        if weights is None:
            await self.boot()
            return
        self._reaper.start()
        manifest = await boot_from_disk(self.engine, self._specs, weights, version)
        self._high_water, self.delta_base.manifest = version, manifest
        metrics.Rollout.weight_version.set(version)
        self.lifecycle.serve(version, manifest.fingerprint)

    def boot(self) -> asyncio.Task[None]:
        """Starts the engine's dummy boot and returns its task, without waiting for it.

        Updates are received meanwhile; a commit is verified at once and loaded once the engine is up
        (the engine may even boot with it: `Engine.offer_at_boot`), so a rollout joining a running job
        serves the trainer's weights about when its engine is ready.
        """
        if self._boot is None:
            self._reaper.start()
            self.lifecycle.add_listener(self._while_booting)
            self._boot = asyncio.create_task(self._boot_engine())
        return self._boot

    async def _while_booting(self, phase: Phase) -> None:
        """Tells a booting engine whether an update is arriving, so its load step can wait for it."""
        if self.booting:
            self.engine.expect_at_boot(phase is Phase.RECEIVING)

    async def _boot_engine(self) -> None:
        await self.engine.start()
        self.lifecycle.booted()

    @property
    def booting(self) -> bool:
        return self._boot is not None and not self._boot.done()

    async def close(self) -> None:
        """Drops an update in progress, stops background work and the engine."""
        if (update := self.lifecycle.held) is not None:
            self.abort(update.id, "the rollout is shutting down")
        self._reaper.stop()
        if self._boot is not None:
            with contextlib.suppress(Exception):
                await self._boot  # a boot cannot be cut short: let it finish, then stop what it started
        # Nor a commit: the engine is never shut down under a load.
        await asyncio.gather(*self._commits, return_exceptions=True)
        self.delta_base.close()
        await self.engine.shutdown()

    def add_listener(self, listener: Listener) -> None:
        """Calls `listener` (e.g. the health service) on every phase change, in order."""
        self.lifecycle.add_listener(listener)

    def status(self) -> Status:
        """What is served, and the update receiving or (interrupted) held for a resume, if any."""
        self.reap()  # an update no stream has fed for the grace shows as interrupted now, not at the next sweep
        update, served = self.lifecycle.held, self.lifecycle.served
        return Status(
            phase=self.lifecycle.wire,
            weight_version=served.version,
            fingerprint=served.fingerprint,
            update_id=update.id if update else "",
            receiving_version=update.version if update else 0,
            received_bytes=update.received_bytes if update else 0,
            detail=served.failure or resume.held_detail(update),
            verification=self.engine.verification,
            base_fingerprint=served.base_fingerprint,
            adapter_version=served.adapter_version,
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
        peer: str = "",
        resumable: bool = True,
        adapter: AdapterConfig | None = None,
    ) -> Incoming:
        """Accepts or refuses an announced version; on success bytes may start to flow.

        With `base_fingerprint`, the update is a delta: `plan` says which tensors come as patches
        against the committed version. Call `settle(delta=True)` first, so the base is in place.
        With `checksums_at_commit`, the manifest carries no checksums: they come with `commit`.
        An interrupted update of the same version and layout is resumed (`resumable`) and returned
        with the chunks it holds (`Incoming.held_chunks`); any other interrupted update is dropped.
        A live one (a stream feeds it) refuses the begin with BusyError, unless `update_id` is its own.
        With `adapter`, the manifest is a LoRA adapter's to merge into the base it names (call
        `prepare_adapter` first, so a copy of that base is in place).
        """
        if version > MAX_VERSION:
            raise BadRequest(version_problem(version))
        self.reap()
        if (held := self.lifecycle.held) is not None:
            mine = bool(update_id) and update_id == held.id
            if not mine and self.lifecycle.phase is Phase.RECEIVING:
                raise resume.busy(self.lifecycle, held)
            if resume.resumes(
                held, version, manifest, chunk_bytes, plan, base_fingerprint, resumable=resumable, adapter=adapter
            ):
                check_announcement(manifest, checksums_at_commit, fingerprint, base_fingerprint, plan)
                if fingerprint and fingerprint != manifest.fingerprint:
                    raise BadManifest("announced fingerprint does not match the manifest")
                return resume.resume(self.lifecycle, held, update_id, peer)
        if (committing := self.lifecycle.committing) is not None:
            raise resume.busy(self.lifecycle, committing)
        if held is None:
            self.lifecycle.check(Phase.RECEIVING)
        if self.delta_base.busy:
            raise BusyError("the delta base is being brought up to date; await settle() before begin()")
        resume.check_already_committed(
            version,
            manifest,
            high_water=self._high_water,
            weight_version=self.lifecycle.served.version,
            committed=self.lifecycle.served.fingerprint,
            committed_manifest=self.delta_base.manifest,
        )
        if version <= self._high_water:
            raise StaleVersion(f"version {version} is not newer than committed version {self._high_water}")
        if manifest.total_bytes > self._max_bytes:
            raise TooLarge(f"update is {manifest.total_bytes} bytes; this model takes {self._max_bytes}")
        if not MIN_CHUNK_BYTES <= chunk_bytes <= self.max_chunk_bytes:
            raise TooLarge(f"chunk_bytes {chunk_bytes} outside [{MIN_CHUNK_BYTES}, {self.max_chunk_bytes}]")
        if adapter is None:
            check_manifest(self._specs, manifest)
        else:
            check_adapter(self._specs, adapter, manifest)
            if plan is not None or base_fingerprint or checksums_at_commit:
                raise BadManifest(
                    "an adapter comes whole with its checksums: no plan, delta base or checksums_at_commit"
                )
            self.adapters.check(adapter, self.lifecycle.served.base_fingerprint)
        check_announcement(manifest, checksums_at_commit, fingerprint, base_fingerprint, plan)
        if fingerprint and fingerprint != manifest.fingerprint:
            raise BadManifest("announced fingerprint does not match the manifest")
        plan = plan or TransferPlan.full(manifest)
        plan.check_against(manifest)
        if plan.patches and not base_fingerprint:
            raise BadManifest("a plan with patches needs base_fingerprint: the version they apply to")
        if held is not None:  # interrupted (or its own trainer's, begun again): a valid announcement replaces it
            why = "it began again" if held.id == update_id else f"version {version} began"
            self.abort(held.id, f"{held.interrupted or 'its trainer started over'}; dropped: {why}")
        if base_fingerprint:
            served = self.lifecycle.served
            self.delta_base.check_base(base_fingerprint, served.fingerprint, served.version, manifest)
        # An adapter is small and never the engine's to read: plain memory, not the spare.
        staging = (
            torch.empty(manifest.total_bytes, dtype=torch.uint8)
            if adapter
            else self.delta_base.take(manifest.total_bytes)
        )
        staged = tensor_bytes(staging)
        patches = memoryview(bytearray(sum(t.wire_bytes for t in plan.transfers if t.encoding == Encoding.PATCH)))
        update = Incoming(
            id=update_id or uuid.uuid4().hex,
            version=version,
            manifest=manifest,
            chunk_bytes=chunk_bytes,
            staging=staging,
            received=bytearray(chunk_count(plan.total_bytes, chunk_bytes)),
            plan=plan,
            router=Router(manifest, plan, staged, patches),
            verifier=Verifier(manifest, staged, plan, patches),
            base_fingerprint=base_fingerprint,
            peer=peer,
            adapter=adapter,
            flip_landed=self.failpoints.corrupt_landed,
        )
        self.lifecycle.move(Phase.RECEIVING, update)
        logger.info(
            "update %s: receiving version %d, %d tensors, %.1f MB%s",
            update.id,
            version,
            len(manifest),
            manifest.total_bytes / 1e6,
            f" as a delta of {plan.total_bytes / 1e6:.1f} MB ({plan.patches} patches)"
            if base_fingerprint
            else (f" as a LoRA adapter (rank {adapter.rank}) of base {adapter.base_fingerprint}" if adapter else ""),
        )
        return update

    async def settle(self, *, delta: bool = False) -> None:
        """Waits until the spare may be written; for a `delta`, rebuilds its copy of the base if needed."""
        idle = self.lifecycle.phase in RESTING
        await self.delta_base.settle(committed=self.lifecycle.served.fingerprint, rebuild=delta and idle)

    async def reserve(self, nbytes: int) -> None:
        """Allocates staging for an update of `nbytes` off the event loop, before `begin` takes it.

        Only a rollout that may begin now reserves, and only up to the model's size: a refused or hostile
        announcement costs at most the one spare buffer the next update uses anyway.
        """
        if nbytes <= self._max_bytes and self.lifecycle.phase not in (Phase.RECEIVING, Phase.COMMITTING):
            await self.delta_base.reserve(nbytes)

    async def prepare_adapter(self, adapter: AdapterConfig) -> None:
        """Copies the committed full version as the base `adapter` merges into, if it is that base and no
        copy is held yet, and reserves a buffer for the merged version; `begin` refuses the adapter if
        its base is still not held after this."""
        await self.settle()
        served = self.lifecycle.served
        if self.lifecycle.phase in RESTING and self.adapters.wants_copy(adapter, served):
            source = self.delta_base.committed_bytes(served.fingerprint)
            if source is not None and self.delta_base.manifest is not None:
                await self.adapters.keep(source, self.delta_base.manifest, served.fingerprint)
        if self.adapters.manifest is not None:
            await self.reserve(self.adapters.manifest.total_bytes)

    def stream_opened(self, update_id: str) -> Incoming:
        """A PushChunks stream starts feeding `update_id`; an interrupted update resumes."""
        return resume.stream_opened(self.lifecycle, update_id)

    def stream_closed(self, update: Incoming, error: str = "") -> None:
        """A stream that fed `update` ended, failed with `error` if set; the last one to end without every
        chunk (or failed) interrupts the update: its trainer is gone or lost its connection."""
        resume.stream_closed(self.lifecycle, update, error, self.idle_timeout)

    def put_chunk(self, update_id: str, index: int, checksum: int, data: memoryview) -> int:
        """Copies one chunk into staging and verifies it there; returns its bytes (0: it arrived before).

        A chunk that fails its checks aborts the whole update.
        """
        update = self.lifecycle.current(update_id)
        taken = self._or_abort(update, lambda: update.take_chunk(index, checksum, data))
        metrics.Rollout.received_bytes.inc(taken)
        return taken

    def open_file(self, update_id: str, name: str) -> None:
        """Takes the update's bytes from a co-located trainer's file (update/version_file.py), not chunks."""
        update = self.lifecycle.current(update_id)

        def opened() -> VersionFileReader:
            if update.plan.patches or update.base_fingerprint or update.adapter:
                raise SharedMemoryRefused("a shared-memory file carries a full version only")
            return open_reader(self.shared_memory_dir, name, update.wire_bytes)

        update.file = self._or_abort(update, opened)

    async def read_file(self, update_id: str, upto: int) -> int:
        """Reads the update's file up to byte `upto` (announced as written) into staging; returns bytes read."""
        update = self.lifecycle.current(update_id)
        if update.file is None:
            error = ChunkCorrupt("file progress for an update whose bytes come in chunks")
            self.abort(update.id, str(error))
            raise error
        try:
            got = await update.file.read(
                tensor_bytes(update.staging), upto, update.file_read, lambda: self.lifecycle.holds(update)
            )
        except ChunkCorrupt as error:
            self.abort(update.id, str(error))
            raise
        metrics.Rollout.received_bytes.inc(got)
        if update.file.position == update.wire_bytes:
            update.close_file()
        return got

    async def stage_file(self, update_id: str, name: str) -> int:
        """Reads a whole file the trainer has finished writing; returns its bytes."""
        self.open_file(update_id, name)
        update = self.lifecycle.current(update_id)
        update.streams += 1  # the read feeds it as a stream would: not interrupted meanwhile
        try:
            return await self.read_file(update_id, update.wire_bytes)
        finally:
            update.streams -= 1
            update.quiet_since = time.monotonic()

    async def commit(
        self, update_id: str, checksums: Sequence[str] = (), fingerprint: str = ""
    ) -> tuple[int, str, float]:
        """Verifies the staged version and swaps it in; returns (version, fingerprint, seconds).

        `checksums` and `fingerprint` complete the manifest of an update begun with checksums_at_commit.
        The commit runs as the receiver's own task, shielded from the caller: a caller cancelled midway
        (a Commit whose deadline passed while the engine loads) leaves it to finish, or roll back, whole,
        so what is served and what GetStatus says never part.
        """
        update = self.lifecycle.current(update_id)
        self.lifecycle.move(Phase.COMMITTING)
        task = asyncio.get_running_loop().create_task(self._commit(update, checksums, fingerprint))
        self._commits.add(task)
        task.add_done_callback(self._commit_ended)
        return await asyncio.shield(task)

    def _commit_ended(self, task: asyncio.Task[tuple[int, str, float]]) -> None:
        """A commit's outcome was logged by the commit itself; a caller that left does not retrieve it."""
        self._commits.discard(task)
        if not task.cancelled():
            task.exception()

    async def _commit(self, update: Incoming, checksums: Sequence[str], fingerprint: str) -> tuple[int, str, float]:
        started = time.perf_counter()
        update.close_file()  # what is not in staging by now never will be
        try:
            staging, manifest, returned = await self._verify_and_load(update, checksums, fingerprint)
        except (IncompleteUpdate, NonFiniteWeights, BadManifest) as error:
            logger.warning("update %s refused at commit: %s", update.id, error)
            metrics.Rollout.updates.labels("refused").inc()
            self._put_back(update)  # holds (part of) the refused version
            self.lifecycle.move(self._resting_phase())
            raise
        except BaseException:
            # The engine failed (FAILED, set below), or the loop is closing: never stay COMMITTING.
            if self.lifecycle.phase is Phase.COMMITTING:
                self.lifecycle.move(self._resting_phase())
            raise
        previous = self.lifecycle.served.fingerprint
        self._high_water = update.version
        self.delta_base.committed(
            staging,
            manifest,
            returned,
            previous=previous,
            fingerprint=update.manifest.fingerprint,
            base=update.base_fingerprint,
            changed=update.verifier.changed if update.adapter is None else [None] * len(manifest),
        )
        if update.adapter is None:
            self.adapters.full_committed(update.manifest.fingerprint)
        adapter_of = update.adapter.base_fingerprint if update.adapter else ""
        self.lifecycle.serve(update.version, update.manifest.fingerprint, adapter_of=adapter_of)
        seconds = time.perf_counter() - started
        metrics.Rollout.updates.labels("committed").inc()
        metrics.Rollout.sync_seconds.observe(time.monotonic() - update.started)
        metrics.Rollout.swap_seconds.observe(seconds)
        metrics.Rollout.weight_version.set(update.version)
        logger.info(
            "update %s: committed version %d in %.3f s (%s)",
            update.id,
            update.version,
            seconds,
            update.manifest.fingerprint,
        )
        return update.version, update.manifest.fingerprint, seconds

    def abort(self, update_id: str, reason: str) -> None:
        """Drops the update in progress; the served version is untouched."""
        update = self.lifecycle.current(update_id)
        logger.warning("update %s (version %d) aborted: %s", update.id, update.version, reason)
        metrics.Rollout.updates.labels("aborted").inc()
        update.close_file()
        self._put_back(update)  # partly written
        self.lifecycle.move(self._resting_phase())

    def reap(self) -> None:
        """Aborts an update whose trainer went silent or that has taken too long; interrupts one no stream
        has fed for STREAMLESS_GRACE; drops an interrupted one not resumed within the idle timeout."""
        resume.reap(self.lifecycle, self.abort, self.idle_timeout, self.max_update_seconds, STREAMLESS_GRACE)

    def drop_interrupted(
        self,
        version: int,
        manifest: Manifest,
        chunk_bytes: int,
        plan: TransferPlan | None,
        base_fingerprint: str,
        *,
        resumable: bool = True,
        adapter: AdapterConfig | None = None,
    ) -> None:
        """Drops an interrupted update this announcement will not resume, so the spare is free before `settle`."""
        held = self.lifecycle.held
        if held is None or self.lifecycle.phase is not Phase.INTERRUPTED:
            return
        if not resume.resumes(
            held, version, manifest, chunk_bytes, plan, base_fingerprint, resumable=resumable, adapter=adapter
        ):
            self.abort(held.id, f"{held.interrupted}; dropped: version {version} began")

    # -- helpers ------------------------------------------------------------------------------

    async def _verify_and_load(
        self, update: Incoming, checksums: Sequence[str], fingerprint: str
    ) -> tuple[torch.Tensor, Manifest, torch.Tensor | None]:
        """Checks that the staged bytes are the announced version, then loads them (an adapter merged into
        its base); returns the buffer and layout loaded, and the spare.

        The checks read the whole model (hashing chunks that came out of order or in a resumed run, and
        NaN scans): in a thread, so the event loop goes on serving meanwhile. Nothing else touches a
        committing update.
        """
        await asyncio.to_thread(update.verify, checksums, fingerprint, self._specs)
        if self.reject_nonfinite:
            await asyncio.to_thread(check_finite, update.manifest, update.staging)
        staging, manifest = update.staging, update.manifest
        if update.adapter is not None:
            base = self.lifecycle.served.base_fingerprint
            staging = self.delta_base.take(self.adapters.check(update.adapter, base).total_bytes)
            merge = self.adapters.merge
            manifest = await asyncio.to_thread(merge, update.adapter, update.manifest, update.staging, staging)
        adapter_of = update.adapter.base_fingerprint if update.adapter else ""
        self.lifecycle.loading(update.version, update.manifest.fingerprint, adapter_of=adapter_of)
        try:
            if self.booting:
                assert self._boot is not None
                await self.engine.offer_at_boot(staging, manifest, update.version)
                logger.info("update %s: verified; loading version %d once the engine is up", update.id, update.version)
                await asyncio.shield(self._boot)
            # Staged in place and verified there; an adapter's merge is other memory, which the engine hashes.
            sums = update.verifier.checksums if update.adapter is None else ()
            return staging, manifest, await self.engine.load(staging, manifest, update.version, staged_sums=sums)
        except BadManifest:
            raise  # refused before the engine touched its weights
        except InstalledMismatch as error:
            self._failed(f"update {update.id}: {error}")
            raise
        except Exception as error:
            failure = f"loading version {update.version} into the engine failed: {error}"
            self._failed(failure, exc_info=True)
            raise EngineUnavailable(failure) from error

    def _put_back(self, update: Incoming) -> None:
        """Returns an update's staging buffer as the spare; an adapter's is its own, never the spare."""
        if update.adapter is None:
            self.delta_base.put_back(update.staging)

    def _failed(self, detail: str, *, exc_info: bool = False) -> None:
        """The engine holds no version it can vouch for: FAILED, serving nothing, until a later commit."""
        metrics.Rollout.updates.labels("failed").inc()
        metrics.Rollout.weight_version.set(0)
        logger.error("%s", detail, exc_info=exc_info)
        self.delta_base.forget()
        self.lifecycle.fail(detail)

    async def verify_installed(self) -> Verification:
        """Reads back what the engine serves and holds it to the committed manifest (`status --verify`).

        Callers asking while a read-back runs share it: one read-back at a time, however many ask (each
        hashes every weight, so a flood of GetStatus(verify) or /weight_checker would otherwise take the cores).

        Raises:
            NoWeights: nothing is served.
            InstalledMismatch: the engine no longer holds the committed version; it then serves nothing.
        """
        if self._reading_back is None or self._reading_back.done():
            self._reading_back = asyncio.ensure_future(self._verify_installed())
            self._reading_back.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved
        return await asyncio.shield(self._reading_back)  # a caller that leaves does not cancel the others'

    async def _verify_installed(self) -> Verification:
        manifest, version = self.delta_base.manifest, self.lifecycle.served.version
        if manifest is None or not version or self.lifecycle.phase is Phase.COMMITTING:
            raise NoWeights("no committed version is served, so there is nothing to verify")
        try:
            return await self.engine.verify(manifest, version)
        except InstalledMismatch as error:
            if self.lifecycle.phase in RESTING:
                self._failed(f"on-demand verification: {error}")
            raise

    async def read_back(self) -> Verification:
        """verify_installed, returning a failed read-back rather than raising it (the HTTP /weight_checker
        reports the digests either way; a mismatch withdraws the version all the same)."""
        try:
            return await self.verify_installed()
        except InstalledMismatch:
            if self.engine.verification is None:
                raise
            return self.engine.verification

    def _or_abort(self, update: Incoming, step: Callable[[], T]) -> T:
        """Runs `step`; a refusal from it aborts the whole update before it reaches the caller."""
        try:
            return step()
        except WeightSyncError as error:
            self.abort(update.id, str(error))
            raise

    def _resting_phase(self) -> Phase:
        return self.lifecycle.resting(committed_before=bool(self._high_water), booted=not self.booting)
