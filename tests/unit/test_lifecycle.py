"""The update lifecycle on a fake engine, in milliseconds: every transition in the table, allowed or refused."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine, fake_state
from safetensors.torch import save_file

from rollout_side.generation import Generation, GenerationRequest, VersionGate
from rollout_side.incoming import Incoming
from rollout_side.lifecycle import RESTING, TRANSITIONS, Lifecycle, Phase
from rollout_side.receiver import Receiver
from weightsync.errors import Reason, WeightSyncError
from weightsync.manifest import manifest_of_state, tensor_bytes, wire_tensors
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


def send(receiver: Receiver, update: Incoming, seed: int) -> None:
    """Every chunk of `fake_state(seed)`, in order."""
    flat = b"".join(bytes(tensor_bytes(t)) for _, t in wire_tensors(fake_state(seed)))
    for index in range(update.chunk_count):
        start, end = chunk_span(index, len(flat), CHUNK)
        data = memoryview(flat)[start:end]
        receiver.put_chunk(update.id, index, chunk_checksum(data), data)


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
    return Generation(receiver.engine, VersionGate(receiver.engine, receiver.lifecycle))


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
}

# Refusals a caller meets, with the reason it hears; every other move outside the table is refused too.
REFUSALS = {
    (Phase.BOOTING, Phase.RECEIVING): Reason.ENGINE_UNAVAILABLE,
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
    update = _Update() if target is Phase.RECEIVING else None
    if target in TRANSITIONS[source]:
        lifecycle.move(target, update)
        assert lifecycle.phase is target
        assert (lifecycle.receiving is update) if target is Phase.RECEIVING else lifecycle.receiving is None
        return
    with pytest.raises(WeightSyncError) as info:
        lifecycle.move(target, update)
    assert info.value.reason is REFUSALS.get((source, target), info.value.reason)
    assert lifecycle.phase is source


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
    assert all(phase.wire is phase for phase in Phase if phase is not Phase.COMMITTING)


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
async def test_refusals_at_begin_leave_the_phase_alone() -> None:
    receiver, _ = await rest_in(Phase.SERVING)
    await refused(Reason.STALE_VERSION, lambda: announce(receiver, 1))
    await refused(Reason.TOO_LARGE, lambda: receiver.begin(2, manifest_of_state(fake_state(2)), 1024))
    assert receiver.lifecycle.phase is Phase.SERVING
    announce(receiver, 2)
    await refused(Reason.UPDATE_IN_PROGRESS, lambda: announce(receiver, 3))
    await refused(Reason.UNKNOWN_UPDATE, lambda: receiver.commit("no-such-update"))
    assert receiver.lifecycle.phase is Phase.RECEIVING


@run
async def test_begin_before_boot_is_refused() -> None:
    receiver = Receiver(FakeEngine())
    await refused(Reason.ENGINE_UNAVAILABLE, lambda: announce(receiver, 1))


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
