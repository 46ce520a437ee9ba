"""The update lifecycle on a fake engine, in milliseconds: every transition in the table, allowed or refused."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine, fake_state
from safetensors.torch import save_file

from rollout_side.serving.generation import Generation, GenerationRequest, VersionGate
from rollout_side.update import receiver as receiver_module
from rollout_side.update.core import Announcement, Updates
from rollout_side.update.incoming import Incoming
from rollout_side.update.lifecycle import RESTING, TRANSITIONS, Lifecycle, Phase
from rollout_side.update.reaper import Reaper
from rollout_side.update.receiver import Receiver
from weightsync.errors import Reason, WeightSyncError
from weightsync.manifest import Manifest, manifest_of_state, tensor_bytes, wire_tensors
from weightsync.wire import chunk_checksum, chunk_span

CHUNK = 4096


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an async test on a fresh event loop (fixtures still arrive by name)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


async def refused(reason: Reason, call: Callable[[], Any]) -> None:
    """`call` (sync, or returning an awaitable) raises a WeightSyncError with `reason`."""
    with pytest.raises(WeightSyncError) as info:
        result = call()
        if isinstance(result, Awaitable):
            await result
    assert info.value.reason is reason


async def booted(engine: FakeEngine | None = None, **receiver_args: Any) -> tuple[Receiver, FakeEngine]:
    engine = engine or FakeEngine()
    receiver = Receiver(engine, **receiver_args)
    await receiver.start()
    return receiver, engine


def announce(receiver: Receiver, version: int, seed: int | None = None, **begin_args: Any) -> Incoming:
    return receiver.begin(version, manifest_of_state(fake_state(seed or version)), CHUNK, **begin_args)


def send(receiver: Receiver, update: Incoming, seed: int, indexes: Iterable[int] | None = None) -> None:
    """Every chunk of `fake_state(seed)` (or those in `indexes`), in order."""
    flat = b"".join(bytes(tensor_bytes(t)) for _, t in wire_tensors(fake_state(seed)))
    for index in range(update.chunk_count) if indexes is None else indexes:
        start, end = chunk_span(index, len(flat), CHUNK)
        data = memoryview(flat)[start:end]
        receiver.put_chunk(update.id, index, chunk_checksum(data), data)


def stream(receiver: Receiver, update_id: str, seed: int, indexes: Iterable[int], error: str = "") -> Incoming:
    """One PushChunks stream that carries chunks `indexes` of `fake_state(seed)` and ends (failed, with `error`)."""
    update = receiver.stream_opened(update_id)
    send(receiver, update, seed, indexes)
    receiver.stream_closed(update, error)
    return update


async def push(receiver: Receiver, version: int, **begin_args: Any) -> str:
    """A whole update of version `version` (weights seeded by it); returns the committed fingerprint."""
    update = announce(receiver, version, **begin_args)
    send(receiver, update, version)
    committed, fingerprint, _ = await receiver.commit(update.id)
    assert committed == version
    return fingerprint


async def fail_a_load(receiver: Receiver, engine: FakeEngine, version: int) -> None:
    engine.fail_next_load = True
    update = announce(receiver, version)
    send(receiver, update, version)
    await refused(Reason.ENGINE_UNAVAILABLE, lambda: receiver.commit(update.id))


async def rest_in(phase: Phase) -> tuple[Receiver, FakeEngine]:
    """A receiver resting in `phase` (DUMMY, SERVING or FAILED)."""
    receiver, engine = await booted()
    if phase is not Phase.DUMMY:
        await push(receiver, 1)
    if phase is Phase.FAILED:
        await fail_a_load(receiver, engine, 2)
    assert receiver.lifecycle.phase is phase
    return receiver, engine


def generation(receiver: Receiver) -> Generation:
    return Generation(receiver.engine, VersionGate(receiver.lifecycle))


# -- the table itself --------------------------------------------------------------------------


class _Update:
    id = "u"


PATHS = {  # a way to reach each phase from BOOTING, through allowed moves only
    Phase.BOOTING: [],
    Phase.DUMMY: [Phase.DUMMY],
    Phase.SERVING: [Phase.SERVING],
    Phase.FAILED: [Phase.DUMMY, Phase.RECEIVING, Phase.COMMITTING, Phase.FAILED],
    Phase.RECEIVING: [Phase.DUMMY, Phase.RECEIVING],
    Phase.COMMITTING: [Phase.DUMMY, Phase.RECEIVING, Phase.COMMITTING],
    Phase.INTERRUPTED: [Phase.DUMMY, Phase.RECEIVING, Phase.INTERRUPTED],
}

# Refusals a caller meets, with the reason it hears; every other move outside the table is refused too.
REFUSALS = {
    (Phase.RECEIVING, Phase.RECEIVING): Reason.UPDATE_IN_PROGRESS,
    (Phase.COMMITTING, Phase.RECEIVING): Reason.UPDATE_IN_PROGRESS,
    **{(rest, Phase.COMMITTING): Reason.UNKNOWN_UPDATE for rest in RESTING},
    (Phase.COMMITTING, Phase.COMMITTING): Reason.UNKNOWN_UPDATE,
}


def at(phase: Phase) -> Lifecycle[_Update]:
    lifecycle: Lifecycle[_Update] = Lifecycle()
    for step in PATHS[phase]:
        lifecycle.move(step, _Update() if step is Phase.RECEIVING else None)
    return lifecycle


@pytest.mark.parametrize(("source", "target"), list(itertools.product(Phase, Phase)), ids=str)
def test_every_move_is_allowed_exactly_when_the_table_says(source: Phase, target: Phase) -> None:
    lifecycle = at(source)
    update = (lifecycle.held or _Update()) if target is Phase.RECEIVING else None  # an interrupted one resumes
    if target in TRANSITIONS[source]:
        lifecycle.move(target, update)
        assert lifecycle.phase is target
        assert (lifecycle.receiving is update) if target is Phase.RECEIVING else lifecycle.receiving is None
        return
    with pytest.raises(WeightSyncError) as info:
        lifecycle.move(target, update)
    assert info.value.reason is REFUSALS.get((source, target), info.value.reason)
    assert lifecycle.phase is source


def test_an_interrupted_update_resumes_as_itself_only() -> None:
    lifecycle = at(Phase.INTERRUPTED)
    held = lifecycle.held
    with pytest.raises(WeightSyncError):
        lifecycle.move(Phase.RECEIVING, _Update())  # another update: drop this one first
    assert lifecycle.phase is Phase.INTERRUPTED and lifecycle.held is held and lifecycle.receiving is None


@pytest.mark.parametrize("rest", [Phase.DUMMY, Phase.SERVING], ids=str)
def test_interrupted_shows_the_resting_phase_on_the_wire(rest: Phase) -> None:
    async def scenario() -> list[Phase]:
        heard: list[Phase] = []

        async def listener(phase: Phase) -> None:
            heard.append(phase)

        lifecycle = at(Phase.BOOTING)
        lifecycle.add_listener(listener)
        lifecycle.move(rest)
        update = _Update()
        lifecycle.move(Phase.RECEIVING, update)
        lifecycle.move(Phase.INTERRUPTED)
        assert lifecycle.wire is rest and lifecycle.held is update
        lifecycle.move(Phase.RECEIVING, update)
        lifecycle.move(Phase.INTERRUPTED)
        lifecycle.move(rest)
        await asyncio.sleep(0)
        return heard

    assert asyncio.run(scenario()) == [rest, Phase.RECEIVING, rest, Phase.RECEIVING, rest]


def test_committing_is_receiving_on_the_wire_and_listeners_hear_only_wire_changes() -> None:
    async def scenario() -> list[Phase]:
        heard: list[Phase] = []

        async def listener(phase: Phase) -> None:
            heard.append(phase)

        lifecycle = at(Phase.BOOTING)
        lifecycle.add_listener(listener)
        for step in [Phase.DUMMY, Phase.RECEIVING, Phase.COMMITTING, Phase.SERVING]:
            lifecycle.move(step, _Update() if step is Phase.RECEIVING else None)
        await asyncio.sleep(0)
        return heard

    assert asyncio.run(scenario()) == [Phase.DUMMY, Phase.RECEIVING, Phase.SERVING]
    assert Phase.COMMITTING.wire is Phase.RECEIVING
    assert all(phase.wire is phase for phase in Phase if phase is not Phase.COMMITTING)  # INTERRUPTED: Lifecycle.wire


# -- the receiver on a fake engine: allowed transitions -------------------------------------------


@run
async def test_boot_with_dummy_weights_rests_in_dummy() -> None:
    receiver, engine = await booted()
    status = receiver.status()
    assert (status.phase, status.weight_version, status.fingerprint) == (Phase.DUMMY, 0, "")
    assert engine.started


@run
async def test_boot_from_disk_serves_the_checkpoint(tmp_path: Path) -> None:
    save_file(fake_state(7), tmp_path / "model.safetensors")
    receiver = Receiver(FakeEngine())
    await receiver.start(tmp_path / "model.safetensors", 3)
    status = receiver.status()
    assert (status.phase, status.weight_version) == (Phase.SERVING, 3)
    assert status.fingerprint == manifest_of_state(fake_state(7)).fingerprint
    await refused(Reason.STALE_VERSION, lambda: announce(receiver, 3))


@pytest.mark.parametrize("rest", [Phase.DUMMY, Phase.SERVING, Phase.FAILED], ids=str)
@run
async def test_begin_from_each_resting_phase_receives(rest: Phase) -> None:
    receiver, _ = await rest_in(rest)
    update = announce(receiver, 5)
    status = receiver.status()
    assert (status.phase, status.update_id, status.receiving_version) == (Phase.RECEIVING, update.id, 5)


@run
async def test_commit_moves_through_committing_to_serving() -> None:
    receiver, engine = await booted(FakeEngine(load_delay=0.05))
    update = announce(receiver, 1)
    send(receiver, update, 1)
    commit = asyncio.ensure_future(receiver.commit(update.id))
    while receiver.lifecycle.phase is not Phase.COMMITTING:
        await asyncio.sleep(0.001)
    status = receiver.status()
    assert (status.phase, status.update_id) == (Phase.RECEIVING, "")  # COMMITTING is RECEIVING on the wire
    await refused(Reason.UPDATE_IN_PROGRESS, lambda: announce(receiver, 2))
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.commit(update.id))
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.abort(update.id, "late"))
    await refused(Reason.UNKNOWN_UPDATE, lambda: send(receiver, update, 1))
    _, fingerprint, _ = await commit
    status = receiver.status()
    assert (status.phase, status.weight_version, status.fingerprint) == (Phase.SERVING, 1, fingerprint)
    assert fingerprint == manifest_of_state(fake_state(1)).fingerprint
    assert engine.loads == [1]


@pytest.mark.parametrize("rest", [Phase.DUMMY, Phase.SERVING, Phase.FAILED], ids=str)
@run
async def test_abort_returns_to_the_resting_phase(rest: Phase) -> None:
    receiver, engine = await rest_in(rest)
    served = engine.weight_version
    update = announce(receiver, 5)
    receiver.abort(update.id, "the trainer aborted it")
    assert (receiver.lifecycle.phase, engine.weight_version) == (rest, served)
    await refused(Reason.UNKNOWN_UPDATE, lambda: send(receiver, update, 5))  # chunks after abort
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.commit(update.id))
    await push(receiver, 5)  # the next update is not blocked
    assert receiver.lifecycle.phase is Phase.SERVING


@run
async def test_a_bad_chunk_aborts_the_update() -> None:
    receiver, _ = await booted()
    update = announce(receiver, 1)
    data = memoryview(bytes(CHUNK))
    await refused(Reason.CHUNK_CORRUPT, lambda: receiver.put_chunk(update.id, 0, chunk_checksum(data) + 1, data))
    assert receiver.lifecycle.phase is Phase.DUMMY
    await refused(Reason.UNKNOWN_UPDATE, lambda: send(receiver, update, 1))


@run
async def test_load_failure_fails_and_the_next_commit_recovers() -> None:
    receiver, engine = await rest_in(Phase.SERVING)
    await fail_a_load(receiver, engine, 2)
    status = receiver.status()
    assert (status.phase, status.weight_version, status.fingerprint) == (Phase.FAILED, 0, "")
    assert status.detail
    await refused(Reason.NO_WEIGHTS, lambda: generation(receiver).generate(GenerationRequest(prompt="a b")))
    await push(receiver, 3)
    status = receiver.status()
    assert (status.phase, status.weight_version, status.detail) == (Phase.SERVING, 3, "")


@pytest.mark.parametrize("rest", [Phase.DUMMY, Phase.SERVING, Phase.FAILED], ids=str)
@run
async def test_a_refused_commit_returns_to_the_resting_phase(rest: Phase) -> None:
    receiver, engine = await rest_in(rest)
    served = (engine.weight_version, receiver.status().fingerprint)
    update = announce(receiver, 5)  # no chunks sent
    await refused(Reason.INCOMPLETE_UPDATE, lambda: receiver.commit(update.id))
    assert receiver.lifecycle.phase is rest
    assert (engine.weight_version, receiver.status().fingerprint) == served


@run
async def test_the_reaper_aborts_a_silent_update() -> None:
    receiver, _ = await booted(idle_timeout=0.05)
    update = announce(receiver, 1)
    await asyncio.sleep(0.3)  # the reaper looks every idle_timeout / 4
    assert receiver.lifecycle.phase is Phase.DUMMY
    await refused(Reason.UNKNOWN_UPDATE, lambda: send(receiver, update, 1))
    await receiver.close()


@run
async def test_begin_allocates_staging_off_the_event_loop() -> None:
    receiver, engine = await booted()
    await Updates(receiver).begin(Announcement(version=1, manifest=manifest_of_state(fake_state(1)), chunk_bytes=CHUNK))
    assert engine.allocated_on, "nothing was allocated: the test proves nothing"
    assert threading.current_thread().name not in engine.allocated_on, "staging was allocated on the event loop"


@run
async def test_commit_checks_the_whole_model_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing out-of-order chunks and the NaN scan read every byte: in a thread, not on the loop."""
    threads: list[str] = []
    for module, name in [(receiver_module, "check_finite"), (Incoming, "verify")]:
        check = getattr(module, name)

        def recording(*args: Any, _check: Any = check, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return _check(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    receiver, _ = await booted(reject_nonfinite=True)
    update = announce(receiver, 1)
    send(receiver, update, 1, reversed(range(update.chunk_count)))  # out of order: hashed at commit
    await receiver.commit(update.id)
    assert len(threads) == 2 and threading.current_thread().name not in threads


@run
async def test_the_reaper_survives_a_failing_sweep(caplog: pytest.LogCaptureFixture) -> None:
    sweeps: list[int] = []

    def reap() -> None:
        sweeps.append(len(sweeps))
        if len(sweeps) == 1:
            raise RuntimeError("the first sweep broke")

    reaper = Reaper(reap, 0.01)
    reaper.start()
    for _ in range(500):
        if len(sweeps) >= 3:
            break
        await asyncio.sleep(0.01)
    reaper.stop()
    assert len(sweeps) >= 3, "the reaper died with its first failing sweep"
    assert "the first sweep broke" in caplog.text


@run
async def test_a_failing_listener_is_logged_and_the_others_still_hear(caplog: pytest.LogCaptureFixture) -> None:
    lifecycle, heard = at(Phase.DUMMY), []

    async def broken(phase: Phase) -> None:
        raise RuntimeError("the listener broke")

    async def listener(phase: Phase) -> None:
        heard.append(phase)

    lifecycle.add_listener(broken)
    lifecycle.add_listener(listener)
    lifecycle.move(Phase.RECEIVING, _Update())
    await asyncio.sleep(0.01)
    assert heard == [Phase.RECEIVING]
    assert "a phase listener failed" in caplog.text and "the listener broke" in caplog.text


@run
async def test_refusals_at_begin_leave_the_phase_alone() -> None:
    receiver, _ = await rest_in(Phase.SERVING)
    await refused(Reason.STALE_VERSION, lambda: announce(receiver, 1, seed=9))  # another version 1
    await refused(Reason.STALE_VERSION, lambda: announce(receiver, 0))
    await refused(Reason.TOO_LARGE, lambda: receiver.begin(2, manifest_of_state(fake_state(2)), 1024))
    assert receiver.lifecycle.phase is Phase.SERVING
    announce(receiver, 2)
    await refused(Reason.UPDATE_IN_PROGRESS, lambda: announce(receiver, 3))
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.commit("no-such-update"))
    assert receiver.lifecycle.phase is Phase.RECEIVING


def booting() -> tuple[asyncio.Event, FakeEngine, Receiver]:
    """A receiver whose engine is booting until the returned event is set."""
    up = asyncio.Event()
    engine = FakeEngine(boot_gate=up)
    receiver = Receiver(engine)
    receiver.boot()
    return up, engine, receiver


@run
async def test_a_push_during_boot_commits_only_once_the_engine_is_up() -> None:
    up, engine, receiver = booting()
    assert receiver.status().phase is Phase.BOOTING
    update = announce(receiver, 1)
    send(receiver, update, 1)
    commit = asyncio.ensure_future(receiver.commit(update.id))
    await asyncio.sleep(0.05)
    assert not commit.done() and engine.expected == [True] and engine.offered == [1] and engine.loads == []
    assert receiver.status().phase is Phase.RECEIVING  # committing
    await refused(Reason.NO_WEIGHTS, lambda: generation(receiver).generate(GenerationRequest(prompt="a")))
    up.set()
    assert (await commit)[0] == 1
    assert (receiver.status().phase, engine.weight_version, engine.loads) == (Phase.SERVING, 1, [1])


@run
async def test_an_update_dropped_during_boot_rests_in_booting_then_dummy() -> None:
    up, engine, receiver = booting()
    update = announce(receiver, 1)
    receiver.abort(update.id, "test")
    assert receiver.status().phase is Phase.BOOTING
    update = announce(receiver, 1)
    await asyncio.sleep(0)
    assert engine.expected == [True, False, True]  # the engine's load step waits only while one arrives
    up.set()
    await receiver.boot()
    assert receiver.status().phase is Phase.RECEIVING
    receiver.abort(update.id, "test")
    assert receiver.status().phase is Phase.DUMMY


@run
async def test_health_listeners_hear_each_wire_phase_once() -> None:
    engine = FakeEngine()
    receiver = Receiver(engine)
    heard: list[Phase] = []

    async def listener(phase: Phase) -> None:
        heard.append(phase)

    receiver.add_listener(listener)
    await receiver.start()
    await push(receiver, 1)
    receiver.abort(announce(receiver, 2).id, "test")
    await fail_a_load(receiver, engine, 2)
    await asyncio.sleep(0)
    expected = [Phase.DUMMY, Phase.RECEIVING, Phase.SERVING, Phase.RECEIVING, Phase.SERVING]
    assert heard == [*expected, Phase.RECEIVING, Phase.FAILED]


# -- one owner of what is served: a commit whose caller leaves ----------------------------------


async def cancel_mid_load(receiver: Receiver, engine: FakeEngine, version: int) -> None:
    """Commits `version` and cancels the caller (a Commit past its deadline) while the engine loads."""
    update = announce(receiver, version)
    send(receiver, update, version)
    commit = asyncio.ensure_future(receiver.commit(update.id))
    while not engine.loading:
        await asyncio.sleep(0.001)
    commit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await commit
    assert receiver.lifecycle.phase is Phase.COMMITTING, "the load went with its caller"
    while receiver.lifecycle.phase is Phase.COMMITTING:
        await asyncio.sleep(0.005)


@run
async def test_a_commit_cancelled_mid_load_still_finishes_whole() -> None:
    receiver, engine = await booted(FakeEngine(load_delay=0.05))
    await push(receiver, 1)
    await cancel_mid_load(receiver, engine, 2)
    status = receiver.status()
    assert (status.phase, status.weight_version, status.fingerprint) == (
        Phase.SERVING,
        2,
        manifest_of_state(fake_state(2)).fingerprint,
    )
    assert (engine.weight_version, engine.loads) == (2, [1, 2])
    out = await generation(receiver).generate(GenerationRequest(prompt_token_ids=[1], max_tokens=2))
    assert (out.token_ids, out.weight_version) == ([2, 2], 2)
    await push(receiver, 3)  # nothing is left behind: the next update goes through
    await receiver.close()


@run
async def test_a_commit_cancelled_mid_load_that_fails_fails_whole() -> None:
    receiver, engine = await booted(FakeEngine(load_delay=0.05))
    await push(receiver, 1)
    engine.fail_next_load = True
    await cancel_mid_load(receiver, engine, 2)
    status = receiver.status()
    assert (status.phase, status.weight_version, status.fingerprint) == (Phase.FAILED, 0, "")
    assert "injected load failure" in status.detail
    assert receiver.lifecycle.served.failure == status.detail
    await refused(Reason.NO_WEIGHTS, lambda: generation(receiver).generate(GenerationRequest(prompt="a")))
    await push(receiver, 3)
    assert (receiver.status().weight_version, receiver.status().detail) == (3, "")


@run
async def test_the_gate_and_status_read_what_is_served_not_the_engine() -> None:
    """An engine whose own version runs ahead of any commit (a swap the receiver never finished) decides
    nothing: the gate and GetStatus answer from Lifecycle.served alone."""
    receiver, engine = await booted()
    await push(receiver, 1)
    engine._version = 2  # what a cancelled, unshielded commit left behind on the torch engine
    status = receiver.status()
    assert (status.weight_version, status.fingerprint) == (1, manifest_of_state(fake_state(1)).fingerprint)
    await refused(
        Reason.VERSION_NOT_REACHED,
        lambda: generation(receiver).generate(GenerationRequest(prompt="a", min_weight_version=2)),
    )


# -- Generate's version gate ---------------------------------------------------------------------


@run
async def test_the_version_gate() -> None:
    receiver, _ = await booted()
    core = generation(receiver)
    await refused(Reason.NO_WEIGHTS, lambda: core.generate(GenerationRequest(prompt="a b")))
    await push(receiver, 1)
    out = await core.generate(GenerationRequest(prompt_token_ids=[1, 2], max_tokens=3))
    assert (out.token_ids, out.weight_version) == ([1, 1, 1], 1)
    await refused(
        Reason.VERSION_NOT_REACHED, lambda: core.generate(GenerationRequest(prompt="a", min_weight_version=2))
    )
    await refused(
        Reason.VERSION_NOT_REACHED,
        lambda: core.generate(GenerationRequest(prompt="a", min_weight_version=2, wait_for_version=True), 0.05),
    )
    await refused(Reason.BAD_REQUEST, lambda: core.generate(GenerationRequest(prompt="a", prompt_token_ids=[1])))
    await refused(Reason.BAD_REQUEST, lambda: core.generate(GenerationRequest(prompt="a", max_tokens=10**6)))

    waiting = asyncio.ensure_future(
        core.generate(GenerationRequest(prompt="a", min_weight_version=2, wait_for_version=True, max_tokens=2), 5)
    )
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await push(receiver, 2)
    out = await waiting
    assert (out.token_ids, out.weight_version) == ([2, 2], 2)


# -- swap atomicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["generate", "stream"])
@run
async def test_a_swap_never_lands_inside_a_request(streamed: bool) -> None:
    receiver, engine = await booted(FakeEngine(token_delay=0.005))
    core = generation(receiver)
    await push(receiver, 1)
    request = GenerationRequest(prompt="slow", max_tokens=20)

    async def respond() -> tuple[list[int], set[int]]:
        if not streamed:
            out = await core.generate(request)
            return out.token_ids, {out.weight_version}
        pieces = [piece async for piece in core.generate_stream(request)]
        return [t for p in pieces for t in p.token_ids], {p.weight_version for p in pieces}

    slow = asyncio.ensure_future(respond())
    while len(engine.tokens) < 3:  # the request is under way
        await asyncio.sleep(0.001)
    await push(receiver, 2)  # lands after the request, never inside it
    tokens, versions = await slow
    assert len(tokens) == 20
    assert versions == set(tokens) == {1}, "a response mixed tokens from two versions"
    out = await core.generate(GenerationRequest(prompt="next", max_tokens=2))
    assert (out.token_ids, out.weight_version) == ([2, 2], 2)


# -- delta-base bookkeeping ------------------------------------------------------------------------


@run
async def test_the_delta_base_follows_commits_and_aborts() -> None:
    receiver, _ = await booted()
    fingerprint = await push(receiver, 1)
    assert receiver.delta_base.fingerprint == fingerprint  # the engine copied out: the spare is version 1

    await receiver.settle(delta=True)
    delta = announce(receiver, 2, base_fingerprint=fingerprint)  # accepted: the base is in place
    receiver.abort(delta.id, "test")
    assert receiver.delta_base.fingerprint == ""  # the dropped update wrote the spare

    await receiver.settle(delta=True)
    await refused(Reason.FULL_VERSION_NEEDED, lambda: announce(receiver, 2, base_fingerprint=fingerprint))
    await refused(Reason.FULL_VERSION_NEEDED, lambda: announce(receiver, 2, base_fingerprint="xxh3:other"))
    fingerprint = await push(receiver, 2)  # a full version restores the base
    assert receiver.delta_base.fingerprint == fingerprint
    await receiver.settle(delta=True)
    update = announce(receiver, 3, base_fingerprint=fingerprint)
    send(receiver, update, 3)  # every tensor sent in full against the base: still a delta update
    await receiver.commit(update.id)
    assert receiver.delta_base.fingerprint == receiver.status().fingerprint


@run
async def test_a_failed_load_forgets_the_delta_base() -> None:
    receiver, engine = await rest_in(Phase.SERVING)
    fingerprint = receiver.status().fingerprint
    await fail_a_load(receiver, engine, 2)
    assert receiver.delta_base.fingerprint == ""
    await receiver.settle(delta=True)
    await refused(Reason.FULL_VERSION_NEEDED, lambda: announce(receiver, 3, base_fingerprint=fingerprint))


# -- updates owned by a live trainer, and resumable -------------------------------------------------


def pending(seed: int) -> Manifest:
    """fake_state(seed)'s layout with its checksums left for Commit (checksums_at_commit)."""
    complete = manifest_of_state(fake_state(seed))
    return complete.with_piece_bytes(complete.piece_bytes)


async def commit_pending(receiver: Receiver, update: Incoming, seed: int) -> tuple[int, str, float]:
    complete = manifest_of_state(fake_state(seed))
    return await receiver.commit(update.id, [e.checksum for e in complete], complete.fingerprint)


@pytest.mark.parametrize("error", ["", "chunk message is truncated"], ids=["ended", "failed"])
@pytest.mark.parametrize("rest", [Phase.DUMMY, Phase.SERVING, Phase.FAILED], ids=str)
@run
async def test_a_stream_ending_without_every_chunk_interrupts_and_the_next_version_begins_at_once(
    rest: Phase, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, engine = await rest_in(rest)
    served = (engine.weight_version, receiver.status().fingerprint)
    update = announce(receiver, 5)
    stream(receiver, update.id, 5, [0], error)
    assert receiver.lifecycle.phase is Phase.INTERRUPTED
    status = receiver.status()
    assert (status.phase, status.update_id, status.received_bytes) == (rest, update.id, CHUNK)  # held, not in progress
    assert "interrupted" in caplog.text and (error or "ended") in caplog.text  # the log says why
    assert (engine.weight_version, receiver.status().fingerprint) == served
    await push(receiver, 6)  # another version: the interrupted one is dropped, nothing waits
    assert receiver.lifecycle.phase is Phase.SERVING and "dropped: version 6 began" in caplog.text


@run
async def test_a_begin_of_the_same_version_and_layout_resumes_with_the_chunks_held() -> None:
    receiver, _ = await booted()
    first = announce(receiver, 1, update_id="run-1")
    stream(receiver, first.id, 1, [1])
    again = announce(receiver, 1, update_id="run-2")
    assert again is first and again.id == "run-2" and receiver.lifecycle.phase is Phase.RECEIVING
    assert again.held_chunks() == [(1, 2)]
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.abort("run-1", "the old name is gone"))
    stream(receiver, again.id, 1, [0, 1])  # the rest; chunk 1 again is ignored
    version, fingerprint, _ = await receiver.commit(again.id)
    assert (version, fingerprint) == (1, manifest_of_state(fake_state(1)).fingerprint)


@run
async def test_resumed_chunks_are_verified_at_commit() -> None:
    """Same version and layout, other bytes: resumed (the layout is all a pending manifest shows), refused at commit."""
    receiver, engine = await rest_in(Phase.SERVING)
    first = receiver.begin(2, pending(2), CHUNK, checksums_at_commit=True)
    stream(receiver, first.id, 2, [0])  # chunk 0 of seed 2 ...
    again = receiver.begin(2, pending(3), CHUNK, checksums_at_commit=True)
    assert again is first and again.held_chunks() == [(0, 1)]
    stream(receiver, again.id, 3, [1])  # ... the rest of seed 3, committed as seed 3
    await refused(Reason.CHECKSUM_MISMATCH, lambda: commit_pending(receiver, again, 3))
    assert (receiver.lifecycle.phase, engine.weight_version) == (Phase.SERVING, 1)
    update = receiver.begin(2, pending(3), CHUNK, checksums_at_commit=True)  # a fresh update: nothing held
    assert update.held_chunks() == []
    stream(receiver, update.id, 3, range(update.chunk_count))
    assert (await commit_pending(receiver, update, 3))[1] == manifest_of_state(fake_state(3)).fingerprint


@run
async def test_other_checksums_or_chunk_size_do_not_resume() -> None:
    receiver, _ = await booted()
    first = announce(receiver, 1)
    stream(receiver, first.id, 1, [0])
    other = announce(receiver, 1, seed=2)  # a complete manifest with other checksums: a fresh update
    assert other is not first and other.held_chunks() == []
    stream(receiver, other.id, 2, [0])
    smaller = receiver.begin(1, manifest_of_state(fake_state(2)), CHUNK * 2)
    assert smaller is not other and smaller.held_chunks() == []


@run
async def test_a_live_update_refuses_a_second_trainer_with_its_version_age_and_peer() -> None:
    receiver, _ = await booted()
    update = announce(receiver, 1, peer="ipv4:10.0.0.7:41234")
    receiver.stream_opened(update.id)  # a live stream
    for other in (lambda: announce(receiver, 2), lambda: announce(receiver, 1)):  # even the same version
        with pytest.raises(WeightSyncError) as info:
            other()
        error = info.value
        assert error.reason is Reason.UPDATE_IN_PROGRESS
        assert error.metadata["version"] == "1" and error.metadata["peer"] == "ipv4:10.0.0.7:41234"
        assert error.metadata["update_id"] == update.id and float(error.metadata["age_seconds"]) >= 0
        assert "ipv4:10.0.0.7:41234" in str(error) and "version 1" in str(error)
    assert announce(receiver, 1, update_id=update.id) is update  # its own trainer, reconnected, takes it back
    receiver.stream_closed(update)
    assert receiver.lifecycle.phase is Phase.INTERRUPTED  # chunks missing


@run
async def test_an_update_no_stream_feeds_is_interrupted_after_a_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receiver_module, "STREAMLESS_GRACE", 0.0)
    receiver, _ = await booted()
    update = announce(receiver, 1)  # begun, never streamed (a trainer killed right after BeginUpdate)
    await asyncio.sleep(0.001)
    await push(receiver, 2)  # begin reaps first: the silent update does not block it
    assert receiver.status().weight_version == 2
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.commit(update.id))


@run
async def test_an_update_streamed_in_full_waits_for_its_commit() -> None:
    receiver, _ = await booted()
    update = announce(receiver, 1)
    stream(receiver, update.id, 1, range(update.chunk_count))
    assert receiver.lifecycle.phase is Phase.RECEIVING  # every chunk in: its trainer commits next
    await refused(Reason.UPDATE_IN_PROGRESS, lambda: announce(receiver, 2))
    await receiver.commit(update.id)


@run
async def test_an_interrupted_update_takes_chunks_commit_and_abort() -> None:
    receiver, _ = await booted()
    update = announce(receiver, 1)
    stream(receiver, update.id, 1, [0])
    stream(receiver, update.id, 1, [1])  # a stream of its own resumes it
    assert receiver.lifecycle.phase is Phase.RECEIVING
    receiver.lifecycle.move(Phase.INTERRUPTED)  # streamed in full, then quiet past the grace
    await receiver.commit(update.id)  # its trainer commits: INTERRUPTED -> COMMITTING -> SERVING
    assert receiver.status().weight_version == 1
    update = announce(receiver, 2)
    stream(receiver, update.id, 2, [0])
    receiver.abort(update.id, "python -m trainer_side abort")  # INTERRUPTED -> SERVING
    assert receiver.lifecycle.phase is Phase.SERVING and receiver.status().update_id == ""
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.stream_opened(update.id))


@run
async def test_an_interrupted_update_is_dropped_after_the_idle_timeout() -> None:
    receiver, _ = await booted(idle_timeout=0.05)
    update = announce(receiver, 1)
    stream(receiver, update.id, 1, [0])
    assert receiver.lifecycle.phase is Phase.INTERRUPTED
    await asyncio.sleep(0.3)  # the reaper looks every idle_timeout / 4
    assert receiver.lifecycle.phase is Phase.DUMMY and receiver.status().update_id == ""
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.commit(update.id))
    await receiver.close()


@run
async def test_the_committed_version_again_is_already_committed_not_stale() -> None:
    receiver, _ = await rest_in(Phase.SERVING)
    fingerprint = receiver.status().fingerprint
    with pytest.raises(WeightSyncError) as info:
        announce(receiver, 1)  # the same version and fingerprint: a retry after a lost Commit answer
    assert info.value.reason is Reason.ALREADY_COMMITTED and info.value.metadata["fingerprint"] == fingerprint
    with pytest.raises(WeightSyncError) as info:  # checksums pending: the layout matches, the trainer compares
        receiver.begin(1, pending(9), CHUNK, checksums_at_commit=True)
    assert info.value.reason is Reason.ALREADY_COMMITTED and info.value.metadata["fingerprint"] == fingerprint
    await refused(Reason.STALE_VERSION, lambda: announce(receiver, 1, seed=9))
    assert receiver.lifecycle.phase is Phase.SERVING


@run
async def test_a_refused_begin_keeps_the_interrupted_update() -> None:
    receiver, _ = await rest_in(Phase.SERVING)
    update = announce(receiver, 2)
    stream(receiver, update.id, 2, [0])
    await refused(Reason.STALE_VERSION, lambda: announce(receiver, 1, seed=9))
    await refused(Reason.TOO_LARGE, lambda: receiver.begin(3, manifest_of_state(fake_state(3)), 1024))
    assert receiver.lifecycle.phase is Phase.INTERRUPTED and receiver.lifecycle.held is update
    assert announce(receiver, 2).held_chunks() == [(0, 1)]  # still there to resume


class AnswersDuringLoad(FakeEngine):
    """Answers one request after its weights switched and before its load returns, as an engine whose
    read-back of the installed weights runs after the swap does: the version is not committed yet."""

    def __init__(self) -> None:
        super().__init__()
        self.generation: Generation | None = None
        self.answered: list[Any] = []

    async def load(self, staging: Any, manifest: Manifest, version: int, *, staged_sums: Any = ()) -> Any:
        spare = await super().load(staging, manifest, version, staged_sums=staged_sums)
        if self.generation is not None:
            request = GenerationRequest(prompt_token_ids=[1], max_tokens=1)
            self.answered.append(await self.generation.generate(request))
        return spare


@run
async def test_a_reply_names_the_base_and_adapter_version_of_its_own_version_even_before_it_commits() -> None:
    """What a reply says its version is comes from that version's record, not from what is served when it
    is answered (here: still the previous version)."""
    engine = AnswersDuringLoad()
    receiver, _ = await booted(engine)
    first = await push(receiver, 1)
    engine.generation = generation(receiver)
    second = await push(receiver, 2)
    [during] = engine.answered
    assert (during.weight_version, during.base_fingerprint, during.adapter_version) == (2, second, 0)
    assert receiver.lifecycle.served.lineage(1).base_fingerprint == first  # kept for replies still to come
