"""weightsync itself: real rollout processes, pushes from this process, raw sockets run beside them.

Every measured push is paired with a raw-socket transfer of the same bytes just before it, so
each ratio compares two runs seconds apart on the same (noisy) machine.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.baselines import GrpcAlone, SocketSink, socket_fanout_seconds
from bench.measure import Cpu, cpu_seconds, peak_rss, reset_peak_rss, rss
from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from weightsync.manifest import tensor_bytes

__all__ = ["Rollout", "SyncRuns", "measure_sync"]

ROOT = Path(__file__).resolve().parents[1]


class Rollout(RolloutProcess):
    """`python -m rollout_side serve --engine torch` in its own process, on TCP or a Unix socket."""

    def __init__(self, model_dir: Path, *, unix: bool = False, shared_memory: Path | None = None) -> None:
        args = ["--log-level", "WARNING"]
        if shared_memory:
            args += ["--shared-memory-dir", str(shared_memory)]
        super().__init__(model_dir, engine="torch", args=args, unix=unix)


@dataclass(kw_only=True)
class SyncRuns:
    """One configuration's measured pushes, each beside a raw-socket run of the same bytes."""

    seconds: list[float] = field(default_factory=list)  # wall time of push(), all rollouts committed
    socket_seconds: list[float] = field(default_factory=list)
    swap_seconds: list[float] = field(default_factory=list)  # the slowest rollout's commit -> serving
    # the slowest rollout's read-back of the installed weights (inside the swap: before the version serves)
    verify_seconds: list[float] = field(default_factory=list)
    rollout_peak_rss: list[int] = field(default_factory=list)
    rollout_idle_rss: list[int] = field(default_factory=list)
    trainer_rss_added: int = 0  # peak during all pushes (warm-up included) minus RSS before them
    cpu: Cpu = field(default_factory=Cpu)  # this process while it pushes; the rollouts together
    socket_cpu: Cpu = field(default_factory=Cpu)  # this process while it sends; the sinks together
    alone_seconds: list[float] = field(default_factory=list)  # gRPC alone beside each push, if asked for
    alone_cpu: Cpu = field(default_factory=Cpu)  # this process while it sends; gRPC alone's receiver


_versions = itertools.count(1)


def measure_sync(
    state: dict[str, torch.Tensor],
    rollouts: Sequence[Rollout],
    sinks: Sequence[SocketSink],
    *,
    runs: int,
    warmup: int,
    chunk_bytes: int | None = None,
    streams: int | None = None,
    shared_memory: Path | None = None,
    on_run: Callable[[int, float, float], None] | None = None,
    alone: GrpcAlone | None = None,
) -> SyncRuns:
    """Pushes `state` to every rollout `warmup + runs` times; pairs each with a socket fan-out, and with
    gRPC alone moving the same bytes (`alone`), each just before the push."""
    options: dict[str, object] = {"shared_memory": shared_memory}
    if chunk_bytes:
        options["chunk_bytes"] = chunk_bytes
    if streams:
        options["streams"] = streams
    views = [tensor_bytes(t) for t in state.values()]
    out = SyncRuns()
    with Publisher([r.address for r in rollouts], progress=False, **options) as publisher:  # type: ignore[arg-type]
        trainer_before = rss()  # the state and channels exist; what pushing adds is measured
        reset_peak_rss()
        for i in range(warmup + runs):
            measured = i >= warmup
            if i == warmup:
                out.rollout_idle_rss = [rss(r.pid) for r in rollouts]
                for r in rollouts:
                    reset_peak_rss(r.pid)
            before = _cpu(rollouts, sinks)
            socket_s = socket_fanout_seconds(sinks, views)
            sent = _cpu(rollouts, sinks)
            beside = _alone(alone) if alone is not None else None
            ready = _cpu(rollouts, sinks)
            version = next(_versions)
            started = time.perf_counter()
            results = publisher.push(state, version)
            seconds = time.perf_counter() - started
            pushed = _cpu(rollouts, sinks)
            failed = [r.line() for r in results if not r.ok]
            if failed:
                raise RuntimeError("push failed: " + "; ".join(failed))
            if measured:
                out.seconds.append(seconds)
                out.socket_seconds.append(socket_s)
                out.swap_seconds.append(max(r.swap_seconds for r in results))
                out.verify_seconds.append(_verify_seconds(publisher))
                out.socket_cpu.sender.append(sent[0] - before[0])
                out.socket_cpu.receiver.append(sent[2] - before[2])
                out.cpu.sender.append(pushed[0] - ready[0])
                out.cpu.receiver.append(pushed[1] - ready[1])
                if beside is not None:
                    out.alone_seconds.append(beside[0])
                    out.alone_cpu.sender.append(beside[1])
                    out.alone_cpu.receiver.append(beside[2])
                if on_run:
                    on_run(i - warmup, seconds, socket_s)
        out.rollout_peak_rss = [peak_rss(r.pid) for r in rollouts]
        out.trainer_rss_added = max(0, peak_rss() - trainer_before)
    return out


def _alone(alone: GrpcAlone) -> tuple[float, float, float]:
    """One run of gRPC alone: its seconds, and the CPU seconds this process and its receiver used."""
    server = alone.process.pid
    assert server is not None
    sender, receiver = cpu_seconds(), cpu_seconds(server)
    seconds = alone.seconds()
    return seconds, cpu_seconds() - sender, cpu_seconds(server) - receiver


def _verify_seconds(publisher: Publisher) -> float:
    """How long the last load's installed-weight verification took, on the slowest rollout (GetStatus)."""
    statuses = publisher.status().values()
    return max((s.verification.seconds for s in statuses if not isinstance(s, str)), default=0.0)


def _cpu(rollouts: Sequence[Rollout], sinks: Sequence[SocketSink]) -> tuple[float, float, float]:
    """CPU seconds so far of this process, of the rollouts together and of the sinks together."""
    return (
        cpu_seconds(),
        sum(cpu_seconds(r.pid) for r in rollouts),
        sum(cpu_seconds(s.process.pid) for s in sinks),  # type: ignore[misc]
    )
