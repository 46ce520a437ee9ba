"""Relay fan-out over real gRPC: the trainer sends to one rollout, which forwards to the rest."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from rollout_side.process import RolloutProcess
from rollout_side.update.receiver import STREAMLESS_GRACE
from trainer_side.publisher import Publisher
from weightsync import wire
from weightsync.manifest import manifest_of_state
from weightsync.relay_tree import relay_tree, subtree_addresses
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import LoopThread, Rollout, start_rollout


@pytest.fixture
def three(loop_thread: LoopThread, model_dir) -> Iterator[list[Rollout]]:  # type: ignore[no-untyped-def]
    rollouts = [start_rollout(loop_thread, model_dir) for _ in range(3)]
    yield rollouts
    for r in rollouts:
        r.channel.close()
        loop_thread.run(r.server.stop(grace=0))


@pytest.mark.parametrize(("count", "fanout"), [(4, 1), (7, 2)])
def test_relay_tree_covers_every_rollout_once(count: int, fanout: int) -> None:
    addresses = [f"r{i}:1" for i in range(count)]
    root, downstream = relay_tree(addresses, fanout)
    assert root == "r0:1" and sorted(subtree_addresses(downstream)) == sorted(addresses[1:])
    assert all(len(t.downstream) <= fanout for t in downstream)


@pytest.mark.parametrize("fanout", [1, 2])
def test_relay_delivers_the_version_to_every_rollout(three: list[Rollout], trained_state, fanout: int) -> None:  # type: ignore[no-untyped-def]
    addresses = [r.address for r in three]
    with Publisher(addresses, progress=False, relay_fanout=fanout) as publisher:
        results = publisher.push(trained_state, 1)
    assert [r.ok for r in results] == [True, True, True], [r.error for r in results]
    root, *rest = results
    assert root.bytes_sent > 0 and {r.relayed_by for r in rest} == {addresses[0]}
    assert all(r.bytes_sent == 0 for r in rest)  # the trainer sent each byte once, to the root
    fingerprint = manifest_of_state(trained_state).fingerprint
    for rollout in three:
        status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert (status.weight_version, status.fingerprint) == (1, fingerprint)
        reply = rollout.generate.Generate(pb.GenerateRequest(prompt="red", max_tokens=4), timeout=30)
        assert reply.weight_version == 1


def test_a_dead_relay_is_routed_around(three: list[Rollout], loop_thread: LoopThread, trained_state) -> None:  # type: ignore[no-untyped-def]
    addresses = [r.address for r in three]
    loop_thread.run(three[1].server.stop(grace=0))  # the chain's middle link is gone
    with Publisher(addresses, progress=False, relay_fanout=1, timeout=10) as publisher:
        results = publisher.push(trained_state, 1)
    assert [r.ok for r in results] == [True, False, True], [r.error for r in results]
    assert results[2].relayed_by == "" and results[2].bytes_sent > 0  # pushed directly instead
    assert three[2].weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5).weight_version == 1


def test_a_relayed_update_reaped_before_any_stream_drops_its_downstream(three: list[Rollout], trained_state) -> None:  # type: ignore[no-untyped-def]
    """A trainer that begins a relayed update and dies before its stream opens: the relay reaps the update
    (unfed for STREAMLESS_GRACE), and its downstream, fed by the relay's own open stream, goes with it."""
    relay, downstream = three[0], three[1]
    _, manifest = raw.prepare(trained_state)
    relay.weight_sync.BeginUpdate(
        pb.BeginUpdateRequest(
            version=1,
            manifest=wire.manifest_to_proto(manifest),
            chunk_bytes=raw.CHUNK,
            fingerprint=manifest.fingerprint,
            update_id="relayed",  # as the Publisher names a relayed update: one id down the tree
            relay_to=[pb.RelayTarget(address=downstream.address)],
        ),
        timeout=30,
    )
    assert downstream.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5).state == pb.ROLLOUT_STATE_RECEIVING
    time.sleep(STREAMLESS_GRACE + 0.5)
    assert relay.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5).state == pb.ROLLOUT_STATE_DUMMY  # reaped
    deadline = time.monotonic() + 10  # far below the downstream's own 60 s idle timeout
    while (status := downstream.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)).update_id:
        assert time.monotonic() < deadline, f"the downstream still holds the update: {status}"
        time.sleep(0.05)
    assert status.state == pb.ROLLOUT_STATE_DUMMY


def test_relay_on_a_simulated_cluster_sends_each_byte_once() -> None:
    """Namespaces + rate-limited veth links: relay and direct fan-out to 4 rollouts, correctness and trainer bytes."""
    from bench import netsim, relay

    if reason := netsim.unavailable_reason():
        pytest.skip(f"simulated cluster unavailable: {reason}")
    result = relay.run(rollouts=4, rate="100mbit", size="tiny", runs=1)
    model = result["model_bytes"]
    lines = result["status"].splitlines()[1:]
    assert len(lines) == 4 and all(" SERVING " in line for line in lines), result["status"]
    assert len({line.split()[-1] for line in lines}) == 1  # one fingerprint everywhere
    relayed, direct = result["relay"]["trainer_tx_bytes"][0], result["direct"]["trainer_tx_bytes"][0]
    assert model <= relayed < 1.2 * model, (relayed, model)  # the trainer sent each byte once
    assert direct > 3.8 * model  # direct fan-out sends it once per rollout


def test_late_and_restarted_rollouts_catch_up(
    three: list[Rollout], loop_thread: LoopThread, model_dir, trained_state
) -> None:  # type: ignore[no-untyped-def]
    """A newcomer found by discovery, and a relay that died and came back, both end on the current version."""
    from trainer_side.discovery import follow

    first, middle, late = three
    members = [first.address, middle.address]
    loop_thread.run(middle.server.stop(grace=0))  # dies before the push: the relay chain breaks there
    with Publisher(members, progress=False, relay_fanout=1, delta=True, timeout=10, reconcile_every=0.5) as publisher:
        results = publisher.push(trained_state, 5)
        assert [r.ok for r in results] == [True, False]
        watcher = follow(publisher, "dns:weightsync-rollout:50051", interval=3600, resolver=lambda _: list(members))
        try:
            revived = start_rollout(loop_thread, model_dir, port=int(middle.address.rsplit(":", 1)[1]))
            members.append(late.address)  # a newcomer appears in DNS
            watcher.poll()
            assert publisher.rollouts == [first.address, middle.address, late.address]
            fingerprint = manifest_of_state(trained_state).fingerprint
            deadline = time.monotonic() + 30
            for rollout in (first, revived, late):  # the reconcile thread brings each one up to date
                while (status := rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)).weight_version < 5:
                    assert time.monotonic() < deadline, f"{rollout.address} never caught up"
                    time.sleep(0.2)
                assert (status.weight_version, status.fingerprint) == (5, fingerprint), rollout.address
        finally:
            watcher.stop()
    revived.channel.close()
    loop_thread.run(revived.server.stop(grace=0))


def test_relay_killed_mid_stream_then_restarted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the middle of a relay chain while it forwards: nobody serves a partial version, the
    rollout past it gets a direct push, and the killed one, restarted, catches up by reconcile."""
    from bench.models import make_model, random_state

    model = make_model("64MiB", tmp_path)
    state = random_state(model)
    fingerprint = manifest_of_state(state).fingerprint
    procs = [RolloutProcess(model, args=["--log-level", "WARNING"]) for _ in range(3)]
    _, middle, last = procs
    status_of = {p.address: pb_grpc.WeightSyncStub(grpc.insecure_channel(p.address)) for p in procs}
    try:
        with Publisher(
            [p.address for p in procs], progress=False, relay_fanout=1, delta=True, timeout=20, reconcile_every=0.5
        ) as publisher:
            outcome: list[list] = []  # type: ignore[type-arg]
            pushing = threading.Thread(target=lambda: outcome.append(publisher.push(state, 1)))
            pushing.start()
            deadline = time.monotonic() + 60
            while status_of[middle.address].GetStatus(pb.GetStatusRequest(), timeout=5).received_bytes == 0:
                assert time.monotonic() < deadline and pushing.is_alive(), "the relay never started forwarding"
                time.sleep(0.01)
            middle.kill()  # mid-stream: it has staged part of the version and forwarded part of it
            pushing.join(120)
            [root, killed, past] = outcome[0]
            assert root.ok and not killed.ok and past.ok and past.relayed_by == ""
            assert status_of[last.address].GetStatus(pb.GetStatusRequest(), timeout=5).fingerprint == fingerprint
            revived = RolloutProcess(model, args=["--log-level", "WARNING"], port=middle.port)
            try:
                deadline = time.monotonic() + 60
                while (
                    status := status_of[middle.address].GetStatus(pb.GetStatusRequest(), timeout=5)
                ).weight_version < 1:
                    assert time.monotonic() < deadline, "the restarted relay never caught up"
                    time.sleep(0.2)
                assert status.fingerprint == fingerprint
            finally:
                revived.stop()
    finally:
        for p in procs:
            p.kill()
