"""One table says which phase a rollout may move to from which; every phase change goes through it.

The phases are the wire's (weightsync.v1.RolloutState) plus two internal ones. COMMITTING is
RECEIVING on the wire: between Commit's arrival and its answer no second update may begin, and chunks
or an abort for the update find it gone. INTERRUPTED is an update no live trainer feeds (its chunk
streams all ended without Commit: a killed trainer, a cut connection, a malformed message): it is no
longer in progress, so the wire shows the phase the rollout rests in, but its verified chunks are held
for a resume until another version begins, an abort, or the idle timeout. `Lifecycle.move` refuses any
transition not in `TRANSITIONS` with the error a caller should see (a second begin is `BusyError`),
holds the update, and is the one place that tells listeners (the health service, Generate's version
gate) about phase changes. It also holds what the rollout serves (`Served`: version, fingerprint,
failure), changed only with the phase that goes with it (`serve`, `fail`). Nothing here knows about
protobuf, torch or the engine.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, Protocol, TypeVar

from rollout_side.update.served import Served
from weightsync.errors import BusyError, UnknownUpdate, WeightSyncError

__all__ = ["RESTING", "TRANSITIONS", "Lifecycle", "Phase", "resting_phase"]

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    """The rollout's phases; values 1 to 5 are weightsync.v1.RolloutState's."""

    BOOTING = 1
    DUMMY = 2
    RECEIVING = 3
    SERVING = 4
    FAILED = 5
    COMMITTING = 6  # internal: verifying and loading an update; RECEIVING on the wire
    INTERRUPTED = 7  # internal: an update no stream feeds, held for a resume; the resting phase on the wire

    @property
    def wire(self) -> Phase:
        """The phase as GetStatus and listeners see it (INTERRUPTED: see `Lifecycle.wire`)."""
        return Phase.RECEIVING if self is Phase.COMMITTING else self


# No update in progress, one may begin: a rollout receives while its engine boots (BOOTING), and a
# version committed then is loaded once the engine is up.
RESTING = frozenset({Phase.BOOTING, Phase.DUMMY, Phase.SERVING, Phase.FAILED})

TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    # booted with dummy weights, or standalone; begin while booting
    Phase.BOOTING: frozenset({Phase.DUMMY, Phase.SERVING, Phase.RECEIVING}),
    Phase.DUMMY: frozenset({Phase.RECEIVING}),  # begin
    Phase.SERVING: frozenset({Phase.RECEIVING, Phase.FAILED}),  # begin; a re-check (status --verify) failed
    Phase.FAILED: frozenset({Phase.RECEIVING}),  # begin: the next commit may recover
    # commit; its last stream ended without Commit: interrupted; abort, reaped or a bad chunk: back to rest
    Phase.RECEIVING: frozenset({Phase.COMMITTING, Phase.INTERRUPTED}) | RESTING,
    Phase.COMMITTING: RESTING,  # SERVING: committed; FAILED: the load failed; any: refused, back to rest
    # resumed (its chunks, or a begin of the same version and layout); its trainer commits; dropped (abort,
    # another version begins, idle timeout): back to rest
    Phase.INTERRUPTED: frozenset({Phase.RECEIVING, Phase.COMMITTING}) | RESTING,
}


def resting_phase(*, serving: bool, committed_before: bool, booted: bool = True) -> Phase:
    """Where a rollout rests with no update in progress: what it serves decides, not what it tried."""
    if serving:
        return Phase.SERVING
    if committed_before:
        return Phase.FAILED
    return Phase.DUMMY if booted else Phase.BOOTING


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


S = TypeVar("S", bound=_Identified)
Listener = Callable[[Phase], Awaitable[None]]


class Lifecycle(Generic[S]):
    """The current phase, the update in progress (`S`, anything with an `id`) and what is served."""

    def __init__(self) -> None:
        self.served = Served()  # read it anywhere; change it only through serve() and fail()
        self._phase = Phase.BOOTING
        self._update: S | None = None  # set in RECEIVING, INTERRUPTED and COMMITTING only
        self._rest = Phase.BOOTING  # the phase the update began from: INTERRUPTED shows it on the wire
        self._listeners: list[Listener] = []
        self._notifications: set[asyncio.Task[None]] = set()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def wire(self) -> Phase:
        """The phase as GetStatus and listeners see it: an interrupted update is not in progress."""
        return self._rest if self._phase is Phase.INTERRUPTED else self._phase.wire

    @property
    def receiving(self) -> S | None:
        """The update whose bytes are arriving (None while committing or interrupted)."""
        return self._update if self._phase is Phase.RECEIVING else None

    @property
    def committing(self) -> S | None:
        """The update being verified and loaded, if any."""
        return self._update if self._phase is Phase.COMMITTING else None

    @property
    def held(self) -> S | None:
        """The update whose bytes may still arrive: receiving, or interrupted and waiting for a resume."""
        return self._update if self._phase in (Phase.RECEIVING, Phase.INTERRUPTED) else None

    def current(self, update_id: str) -> S:
        """The update named `update_id`, receiving or interrupted; refused with UnknownUpdate otherwise."""
        update = self.held
        if update is None or update.id != update_id:
            raise UnknownUpdate(f"no update {update_id!r} in progress; begin a new one")
        return update

    def holds(self, update: S) -> bool:
        """Whether `update` is still the one receiving (it may be aborted while its caller awaits)."""
        return self.receiving is update

    def check(self, target: Phase) -> None:
        """Raises the error a caller sees if the rollout cannot move to `target` now."""
        if target not in TRANSITIONS[self._phase]:
            raise _refusal(self._phase, target, self._update)

    def move(self, target: Phase, update: S | None = None) -> None:
        """Moves to `target` (RECEIVING takes the new `update`), telling listeners if the wire phase changed."""
        self.check(target)
        if (target is Phase.RECEIVING) != (update is not None):
            raise WeightSyncError(f"moving to {target.name} {'needs' if update is None else 'takes no'} update")
        if self._phase is Phase.INTERRUPTED and target is Phase.RECEIVING and update is not self._update:
            raise WeightSyncError("an interrupted update resumes as itself; drop it before another begins")
        before, previous = self.wire, self._phase
        if previous in RESTING:
            self._rest = previous
        self._phase = target
        if target is Phase.RECEIVING:
            self._update = update
        elif target in RESTING:
            self._update = None
        logger.debug("phase %s -> %s", previous.name, target.name)
        if before is not self.wire:
            self._notify(self.wire)

    def serve(self, version: int, fingerprint: str, *, adapter_of: str = "") -> None:
        """`version` is loaded and served from now on: SERVING (from COMMITTING, or BOOTING standalone).

        `adapter_of`: it is a LoRA adapter merged into that base (rollout_side/update/adapter_base.py)."""
        self.check(Phase.SERVING)
        self.served.committed(version, fingerprint, adapter_of=adapter_of)
        self.move(Phase.SERVING)

    def loading(self, version: int, fingerprint: str, *, adapter_of: str = "") -> None:
        """The engine is about to load `version`: its lineage is known from now on (`Served.lineage`)."""
        self.served.loading(version, fingerprint, adapter_of=adapter_of)

    def fail(self, failure: str) -> None:
        """A load failed midway: the engine holds no version's weights, nothing is served (FAILED)."""
        self.check(Phase.FAILED)
        self.served.failed(failure)
        self.move(Phase.FAILED)

    def resting(self, *, committed_before: bool, booted: bool = True) -> Phase:
        """Where the rollout rests once the update in progress is gone (see `resting_phase`)."""
        return resting_phase(serving=self.served.ready, committed_before=committed_before, booted=booted)

    def booted(self) -> None:
        """The engine is up: BOOTING becomes DUMMY, now or (an update began while booting) as its rest."""
        if self._phase is Phase.BOOTING:
            self.move(Phase.DUMMY)
        elif self._rest is Phase.BOOTING:
            before, self._rest = self.wire, Phase.DUMMY
            if before is not self.wire:
                self._notify(self.wire)

    def add_listener(self, listener: Listener) -> None:
        """Calls `listener` with the wire phase on every change of it, in order."""
        self._listeners.append(listener)

    def _notify(self, phase: Phase) -> None:
        for listener in self._listeners:
            task = asyncio.get_running_loop().create_task(_call(listener, phase))
            self._notifications.add(task)
            task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Task[None]) -> None:
        """A listener ran; one that failed is logged (the phase moved on regardless), never left unread."""
        self._notifications.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("a phase listener failed: %r", error, exc_info=error)


async def _call(listener: Listener, phase: Phase) -> None:
    await listener(phase)


def _refusal(phase: Phase, target: Phase, update: _Identified | None) -> WeightSyncError:
    """Why `phase` -> `target` is not allowed, as the caller should hear it."""
    if target is Phase.RECEIVING and update is not None and phase is not Phase.INTERRUPTED:
        what = update.id if phase is Phase.RECEIVING else f"{update.id} (committing)"
        return BusyError(f"update {what} is in progress; one update at a time per rollout")
    if phase in RESTING or phase is Phase.COMMITTING:
        return UnknownUpdate("no update is in progress; begin a new one")
    return WeightSyncError(f"no transition from {phase.name} to {target.name}")
