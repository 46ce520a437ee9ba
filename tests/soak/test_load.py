"""Generate under many concurrent clients while pushes commit again and again, on a real rollout process.

`make test` runs it briefly; `make soak` runs it for minutes (SOAK_SECONDS) and writes the figures to
bench/results/soak.json. Zero failed requests, one version per response, versions monotonic per
client, and the rollout's memory flat.

Then an attack phase (SOAK_ATTACK_SECONDS): hostile callers send oversized manifests, huge prompts and
abandon long requests, while clients keep generating; the report gives Generate latency and the
rollout's memory during it. Every attack must be refused with its clear status, and no client fail.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

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
ATTACK_SECONDS = float(os.environ.get("SOAK_ATTACK_SECONDS", str(max(5.0, SECONDS / 4))))
MIB = 1 << 20


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

    calm = attack_phase(proc.pid, address, generate, attacks=False)  # the same clients, unattacked
    attack = attack_phase(proc.pid, address, generate)
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
        "before_attack": calm,
        "attack": attack,
    }
    print(json.dumps(report))
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(json.dumps(report, indent=2))


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies) or [float("nan")]
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))]}


def oversized_begin_update(size: int) -> bytes:
    """A BeginUpdateRequest of about `size` bytes: a manifest of plausible entries, far more than any model has."""
    spec = pb.TensorSpec(name="model.layers.0.mlp.up_proj.weight", shape=[256, 256], byte_size=1 << 17)
    entry = spec.SerializeToString()
    entry = b"\x0a" + _varint(len(entry)) + entry  # Manifest.tensors
    tensors = entry * (size // len(entry))
    return b"\x12" + _varint(len(tensors)) + tensors  # BeginUpdateRequest.manifest


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def attack_phase(pid: int, address: str, generate: pb_grpc.GenerateStub, *, attacks: bool = True) -> dict[str, object]:
    """Hostile callers for ATTACK_SECONDS while clients generate; returns latency and memory during it.

    With `attacks` False the same clients run alone: the baseline the attack's latency compares with.

    Each attacker has its own connection, as a separate client would. Oversized requests are refused by
    size before they are parsed (RESOURCE_EXHAUSTED), prompts the model cannot hold before they are
    tokenized (INVALID_ARGUMENT), and abandoned requests stop using the engine.
    """
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    answers: collections.Counter[str] = collections.Counter()  # "attack: status" -> count
    expected = {
        "oversized manifest": {"RESOURCE_EXHAUSTED"},
        "32 MB prompt": {"RESOURCE_EXHAUSTED"},
        "3 MB prompt": {"INVALID_ARGUMENT"},
        "abandoned generate": {"DEADLINE_EXCEEDED", "OK"},
        "abandoned stream": {"CANCELLED", "OK"},
    }
    manifest = oversized_begin_update(60 * MIB)
    prompts = {
        "32 MB prompt": pb.GenerateRequest(prompt="x" * (32 * MIB)).SerializeToString(),
        "3 MB prompt": pb.GenerateRequest(prompt="the cat sat " * (3 * MIB // 12)).SerializeToString(),
    }
    long = pb.GenerateRequest(prompt="once upon a time", max_tokens=400)

    def client(i: int) -> None:
        request = pb.GenerateRequest(prompt=["the cat", "monday", "one two", "red"][i % 4], max_tokens=8)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                generate.Generate(request, timeout=60)
            except grpc.RpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
                continue
            latencies.append(time.perf_counter() - started)

    def attacker(kind: str) -> None:
        with grpc.insecure_channel(address) as channel:
            raw: dict[str, Any] = {
                method: channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                for method in ("/weightsync.v1.WeightSync/BeginUpdate", "/weightsync.v1.Generate/Generate")
            }
            stub = pb_grpc.GenerateStub(channel)
            while not stop.is_set():
                code = "OK"
                try:
                    if kind == "oversized manifest":
                        raw["/weightsync.v1.WeightSync/BeginUpdate"](manifest, timeout=60)
                    elif kind in prompts:
                        raw["/weightsync.v1.Generate/Generate"](prompts[kind], timeout=60)
                    elif kind == "abandoned generate":
                        stub.Generate(long, timeout=0.3)
                    else:
                        stream = stub.GenerateStream(pb.GenerateStreamRequest(request=long), timeout=60)
                        next(stream, None)
                        stream.cancel()
                        list(stream)
                except grpc.RpcError as error:
                    code = error.code().name
                answers[f"{kind}: {code}"] += 1
                if code not in expected[kind]:
                    failures.append(f"{kind} answered {code}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(max(2, CLIENTS // 4))]
    threads += [threading.Thread(target=attacker, args=(kind,)) for kind in expected if attacks]
    before = rss(pid)
    started = time.perf_counter()
    for t in threads:
        t.start()
    memory = []
    while time.perf_counter() - started < ATTACK_SECONDS:
        time.sleep(0.2)
        memory.append(rss(pid))
    stop.set()
    for t in threads:
        t.join(120)
    after = rss(pid)

    assert not failures, failures[:5]
    assert latencies, "no Generate answered during the attack"
    # Reported, not asserted: on this open rollout (no token, the default) gRPC receives each oversized
    # message whole (up to its 65 MiB transport limit) before its size refuses it unparsed, and its core
    # is slow to give that memory back. With a token, unauthenticated ones are refused unread
    # (tests/integration/test_limits.py holds that to < 64 MiB).
    return {
        "seconds": time.perf_counter() - started,
        "requests": len(latencies),
        **percentiles(latencies),
        "rss_mib_before": before >> 20,
        "rss_mib_max": max(memory) >> 20,
        "rss_mib_after": after >> 20,
        "attacks": dict(answers),
    }
