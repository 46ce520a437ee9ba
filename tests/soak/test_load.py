"""Generate under many concurrent clients while pushes commit again and again, on a real rollout process.

`make test` runs it briefly; `make soak` runs it for minutes (SOAK_SECONDS) and writes the figures to
bench/results/soak.json. Zero failed requests, one version per response, versions monotonic per
client, and the rollout's memory flat.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from trainer_side.train import new_model
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
ENGINE = os.environ.get("SOAK_ENGINE", "vllm")
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "16"))


def rss(pid: int) -> int:
    """Resident memory of the rollout and its children (vLLM's engine core runs in one)."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@pytest.fixture
def rollout_process(model_dir: Path):  # type: ignore[no-untyped-def]
    if ENGINE == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed; set SOAK_ENGINE=torch")
    args = ["--log-level", "WARNING", *(["--kv-cache-gib", "0.25"] if ENGINE == "vllm" else [])]
    with RolloutProcess(model_dir, engine=ENGINE, args=args) as rollout:
        yield rollout.process, rollout.address


def test_generate_under_load_while_pushes_commit(rollout_process, model_dir, trained_state) -> None:  # type: ignore[no-untyped-def]
    proc, address = rollout_process
    states = [trained_state, new_model(model_dir, seed=4).state_dict()]
    channel = grpc.insecure_channel(address)
    generate = pb_grpc.GenerateStub(channel)
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    seen: dict[int, list[int]] = {i: [] for i in range(CLIENTS)}
    pushed: list[int] = []

    with Publisher([address], progress=False) as publisher:
        assert publisher.push(states[0], 1)[0].ok
        pushed.append(1)

        def client(i: int) -> None:
            request = pb.GenerateRequest(prompt=["the cat", "monday", "one two", "red"][i % 4], max_tokens=8)
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    if i % 3 == 0:
                        stream = generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=60)
                        tags = {piece.weight_version for piece in stream}
                        if len(tags) != 1:
                            failures.append(f"stream mixed versions {tags}")
                        version = tags.pop()
                    else:
                        version = generate.Generate(request, timeout=60).weight_version
                except grpc.RpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")
                    continue
                latencies.append(time.perf_counter() - start)
                seen[i].append(version)

        def trainer() -> None:
            version = 1
            while not stop.is_set():
                version += 1
                [result] = publisher.push(states[version % 2], version)
                if not result.ok:
                    failures.append(f"push {version}: {result.error}")
                pushed.append(version)
                time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=trainer))
        started = time.perf_counter()
        for t in threads:
            t.start()
        memory = []
        while time.perf_counter() - started < SECONDS:
            time.sleep(min(1.0, SECONDS / 10))
            memory.append(rss(proc.pid))
        stop.set()
        for t in threads:
            t.join(120)
        elapsed = time.perf_counter() - started

    assert not failures, failures[:5]
    for versions in seen.values():
        assert versions == sorted(versions), "a client saw versions go backwards"
    assert len(pushed) >= 3 and max(max(v) for v in seen.values() if v) >= pushed[-2]
    # Flat: after the first fifth of the run (warm-up, first swaps), RSS grows by less than 10% + 64 MiB.
    settled = memory[len(memory) // 5]
    assert max(memory) <= settled * 1.10 + (64 << 20), [m >> 20 for m in memory]

    ordered = sorted(latencies)
    report = {
        "engine": ENGINE,
        "seconds": elapsed,
        "clients": CLIENTS,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "pushes": len(pushed),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "rss_mib_settled": settled >> 20,
        "rss_mib_max": max(memory) >> 20,
        "failed_requests": len(failures),
    }
    print(json.dumps(report))
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(json.dumps(report, indent=2))
