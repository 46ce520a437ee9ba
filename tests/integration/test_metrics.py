"""The Prometheus endpoint moves consistently with what pushes and Generate calls report."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer_side.publisher import Publisher
from weightsync.metrics import serve_metrics
from weightsync.v1 import weightsync_pb2 as pb


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return serve_metrics(0, "127.0.0.1")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counters_follow_pushes_and_generate(rollout, trained_state, metrics_port: int) -> None:  # type: ignore[no-untyped-def]
    before = scrape(metrics_port)
    with Publisher([rollout.address], progress=False) as publisher:
        [first] = publisher.push(trained_state, 3)
        [stale] = publisher.push(trained_state, 2)
    assert first.ok and not stale.ok
    for _ in range(4):
        assert rollout.generate.Generate(pb.GenerateRequest(prompt="red", max_tokens=2), timeout=30).weight_version == 3
    with pytest.raises(grpc.RpcError):
        rollout.generate.Generate(pb.GenerateRequest(prompt="red", min_weight_version=9), timeout=10)
    after = scrape(metrics_port)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("weightsync_rollout_received_bytes_total") == first.bytes_sent > 0
    assert delta("weightsync_trainer_sent_bytes_total", rollout=rollout.address) == first.bytes_sent
    assert delta("weightsync_rollout_updates_total", outcome="committed") == 1
    assert after[("weightsync_rollout_weight_version", ())] == 3
    assert after[("weightsync_trainer_confirmed_version", (("rollout", rollout.address),))] == 3
    assert delta("weightsync_trainer_pushes_total", rollout=rollout.address, outcome="ok") == 1
    assert delta("weightsync_trainer_pushes_total", rollout=rollout.address, outcome="failed") == 1
    assert delta("weightsync_rollout_refused_total", method="BeginUpdate", code="FAILED_PRECONDITION") == 1
    assert delta("weightsync_rollout_refused_total", method="Generate", code="FAILED_PRECONDITION") == 1
    assert delta("weightsync_generate_requests_total", version="3") == 4
    assert delta("weightsync_generate_seconds_count", version="3") == 4
    assert delta("weightsync_rollout_sync_seconds_count") == 1
