"""Prometheus metrics: one registry per process, served over HTTP when asked for."""

from __future__ import annotations

import logging
from typing import ClassVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

__all__ = ["Rollout", "Trainer", "record_push", "serve_metrics"]

logger = logging.getLogger(__name__)

_SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Rollout:
    """What a rollout counts."""

    received_bytes = Counter("weightsync_rollout_received_bytes", "Chunk payload bytes staged")
    updates = Counter("weightsync_rollout_updates", "Updates by outcome", ["outcome"])
    refused = Counter("weightsync_rollout_refused", "Calls refused, by method and status", ["method", "code"])
    sync_seconds = Histogram(
        "weightsync_rollout_sync_seconds", "BeginUpdate to committed, per update", buckets=_SYNC_BUCKETS
    )
    swap_seconds = Histogram("weightsync_rollout_swap_seconds", "Commit request to serving", buckets=_SYNC_BUCKETS)
    # The stall generation sees: how long a swap held the engine's one generating thread (torch engine).
    swap_pause_seconds = Histogram(
        "weightsync_rollout_swap_pause_seconds", "Generation held by a swap, per load", buckets=_PAUSE_BUCKETS
    )
    weight_version = Gauge("weightsync_rollout_weight_version", "Version served; 0 = none")
    generate_requests = Counter("weightsync_generate_requests", "Generate calls answered, by version", ["version"])
    generate_seconds = Histogram(
        "weightsync_generate_seconds", "Generate latency, by version", ["version"], buckets=_LATENCY_BUCKETS
    )
    _versions: ClassVar[list[str]] = []
    KEEP_VERSIONS = 4  # label sets kept per metric: versions are unbounded over a run

    @classmethod
    def observe_generate(cls, version: int, seconds: float) -> None:
        label = str(version)
        if label not in cls._versions:
            cls._versions.append(label)
            while len(cls._versions) > cls.KEEP_VERSIONS:
                old = cls._versions.pop(0)
                cls.generate_requests.remove(old)
                cls.generate_seconds.remove(old)
        cls.generate_requests.labels(label).inc()
        cls.generate_seconds.labels(label).observe(seconds)


class Trainer:
    """What a trainer's publisher counts."""

    sent_bytes = Counter("weightsync_trainer_sent_bytes", "Chunk payload bytes confirmed by rollouts", ["rollout"])
    pushes = Counter("weightsync_trainer_pushes", "Pushes per rollout by outcome", ["rollout", "outcome"])
    push_seconds = Histogram(
        "weightsync_trainer_push_seconds", "Push duration per rollout", ["rollout"], buckets=_SYNC_BUCKETS
    )
    confirmed_version = Gauge("weightsync_trainer_confirmed_version", "Last version a rollout confirmed", ["rollout"])


def record_push(address: str, ok: bool, version: int, seconds: float, bytes_sent: int) -> None:
    Trainer.pushes.labels(address, "ok" if ok else "failed").inc()
    if ok:
        Trainer.sent_bytes.labels(address).inc(bytes_sent)
        Trainer.push_seconds.labels(address).observe(seconds)
        Trainer.confirmed_version.labels(address).set(version)


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    """Serves /metrics on `port` (0 picks one); returns the port."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_address[1])
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
