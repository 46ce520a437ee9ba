"""Rollout discovery: static lists, DNS names, a watcher that reports joins and leaves, and newcomers
that join before they listen (real rollouts over real gRPC; only the DNS answers are made up)."""

from __future__ import annotations

import socket
import time

import pytest

from trainer_side import discovery
from trainer_side.discovery import Watcher, follow, resolve
from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb

from conftest import LoopThread, Rollout, start_rollout


def test_static_lists_pass_through() -> None:
    assert resolve("10.0.0.1:50051,10.0.0.2:50051,") == ["10.0.0.1:50051", "10.0.0.2:50051"]


def test_dns_names_resolve_to_every_address() -> None:
    assert resolve("dns:localhost:50051") in (["127.0.0.1:50051"], ["127.0.0.1:50051", "[::1]:50051"])
    assert resolve("dns:no-such-host.invalid:50051") == []
    with pytest.raises(ValueError, match="dns:NAME:PORT"):
        resolve("dns:localhost")


def test_watcher_reports_joins_and_leaves_and_survives_empty_answers() -> None:
    answers = [["a:1"], ["a:1", "b:1"], [], ["b:1", "c:1"]]
    changes: list[tuple[list[str], list[str]]] = []
    watcher = Watcher(
        "dns:svc:1", lambda joined, left: changes.append((joined, left)), resolver=lambda _: answers.pop(0)
    )
    watcher.poll()
    watcher.poll()
    watcher.poll()  # a failed lookup keeps what is known
    assert watcher.rollouts == ["a:1", "b:1"]
    watcher.poll()
    assert changes == [(["a:1"], []), (["b:1"], []), (["c:1"], ["a:1"])]
    assert watcher.rollouts == ["b:1", "c:1"]


# --- newcomers listed before they listen ------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the OS picked it, then it was let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeDns:
    """The DNS part only: answers what `members` holds now and counts the lookups."""

    def __init__(self, *members: str) -> None:
        self.members = list(members)
        self.lookups = 0

    def __call__(self, target: str) -> list[str]:
        self.lookups += 1
        return list(self.members)


def serving(rollout: Rollout) -> tuple[int, str]:
    status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    return status.weight_version, status.fingerprint


def stop(loop_thread: LoopThread, rollout: Rollout) -> None:
    rollout.channel.close()
    loop_thread.run(rollout.server.stop(grace=0))


def test_a_newcomer_listed_before_it_listens_is_pushed_once_it_does(  # type: ignore[no-untyped-def]
    rollout: Rollout, loop_thread: LoopThread, model_dir, trained_state
) -> None:
    late = f"127.0.0.1:{free_port()}"
    dns = FakeDns(rollout.address, late)
    with Publisher([rollout.address], progress=False, delta=True) as publisher:
        [first] = publisher.push(trained_state, 5)
        assert first.ok, first.error
        follower = follow(publisher, "dns:weightsync-rollout:50051", resolver=dns)  # the default 10 s poll
        try:
            assert publisher.rollouts == [rollout.address, late] and follower.waiting == [late]
            time.sleep(1)  # its pod has an IP; the rollout listens a moment later
            newcomer = start_rollout(loop_thread, model_dir, port=int(late.rsplit(":", 1)[1]))
            try:
                deadline = time.monotonic() + 60
                while serving(newcomer)[0] != 5:
                    assert time.monotonic() < deadline, "the newcomer was never pushed"
                    time.sleep(0.1)
                assert dns.lookups == 1, "it came from a poll, not from retrying the newcomer"
                assert serving(newcomer) == (5, first.fingerprint)
                assert follower.waiting == []
            finally:
                stop(loop_thread, newcomer)
        finally:
            follower.stop()


def test_a_newcomer_that_leaves_dns_is_no_longer_retried() -> None:
    member, gone = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    dns = FakeDns(member, gone)
    with Publisher([member], progress=False, delta=True) as publisher:
        follower = follow(publisher, "dns:weightsync-rollout:50051", resolver=dns)
        try:
            assert follower.waiting == [gone]
            dns.members.remove(gone)  # its pod was deleted before its rollout listened
            follower.poll()
            assert follower.waiting == [] and publisher.rollouts == [member]
        finally:
            follower.stop()


def test_stop_ends_the_retries(  # type: ignore[no-untyped-def]
    rollout: Rollout, loop_thread: LoopThread, model_dir, trained_state
) -> None:
    late = f"127.0.0.1:{free_port()}"
    with Publisher([rollout.address], progress=False, delta=True) as publisher:
        assert publisher.push(trained_state, 5)[0].ok
        follower = follow(publisher, "dns:weightsync-rollout:50051", resolver=FakeDns(rollout.address, late))
        follower.stop()
        newcomer = start_rollout(loop_thread, model_dir, port=int(late.rsplit(":", 1)[1]))
        try:
            time.sleep(10 * discovery.RETRY_EVERY)  # ten looks' worth: none comes
            assert serving(newcomer)[0] == 0 and follower.waiting == [late]
        finally:
            stop(loop_thread, newcomer)


def test_a_newcomer_that_never_listens_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    member, never = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    monkeypatch.setattr(discovery, "GIVE_UP_AFTER", 1.0)  # 10 minutes in use
    with Publisher([member], progress=False, delta=True) as publisher:
        follower = follow(publisher, "dns:weightsync-rollout:50051", resolver=FakeDns(member, never))
        try:
            deadline = time.monotonic() + 30
            while follower.waiting:
                assert time.monotonic() < deadline, "still retried past GIVE_UP_AFTER"
                time.sleep(0.1)
        finally:
            follower.stop()
    assert f"{never} never answered" in caplog.text
    assert publisher.rollouts == [member, never]  # still a member: pushes and reconcile rounds try it
