"""Rollout discovery: static lists, DNS names, and a watcher that reports joins and leaves."""

from __future__ import annotations

import pytest

from trainer_side.discovery import Watcher, resolve


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
