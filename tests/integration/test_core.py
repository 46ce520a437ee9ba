"""The core pair over real gRPC on loopback: gating, health, correctness against transformers."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2
from safetensors.torch import load_file, save_file

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from trainer_side.train import greedy, new_model
from weightsync.errors import Reason, reason_of
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

from conftest import health_of, reference_model

PROMPTS = ["the cat sat", "monday tuesday", "one two three", "red orange"]


def test_generate_is_refused_before_the_first_commit(rollout) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        rollout.generate.Generate(pb.GenerateRequest(prompt="the cat"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(info.value) == Reason.NO_WEIGHTS, info.value.details()
    assert health_of(rollout, "weightsync.v1.Generate") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_of(rollout, "weightsync.v1.WeightSync") == health_pb2.HealthCheckResponse.SERVING
    assert health_of(rollout, "") == health_pb2.HealthCheckResponse.SERVING
    status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.weight_version, status.state, status.fingerprint) == (0, pb.ROLLOUT_STATE_DUMMY, "")


def test_push_then_generate_equals_transformers(rollout, model_dir, tokenizer, trained_state) -> None:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        [result] = publisher.push(trained_state, version=7)
    assert result.ok, result.error
    assert result.fingerprint == manifest_of_state(trained_state).fingerprint
    status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.weight_version, status.state, status.fingerprint) == (
        7,
        pb.ROLLOUT_STATE_SERVING,
        result.fingerprint,
    )
    assert health_of(rollout, "weightsync.v1.Generate") == health_pb2.HealthCheckResponse.SERVING

    reference = reference_model(model_dir, trained_state)
    dummy = reference_model(model_dir, new_model(model_dir, seed=1).state_dict())
    differs = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected = greedy(reference, ids, 16)
        answer = rollout.generate.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=16), timeout=30)
        assert list(answer.token_ids) == expected, prompt
        assert answer.weight_version == 7
        assert answer.text == tokenizer.decode(expected, skip_special_tokens=True)
        by_ids = rollout.generate.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=16), timeout=30)
        assert list(by_ids.token_ids) == expected
        differs += greedy(dummy, ids, 16) != expected
    assert differs, "trained and random weights answer alike: the comparison proves nothing"


def test_stream_equals_unary_and_carries_one_version(rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, version=1)[0].ok
    request = pb.GenerateRequest(prompt="one two", max_tokens=10)
    whole = rollout.generate.Generate(request, timeout=30)
    pieces = list(rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=30))
    assert [t for p in pieces for t in p.token_ids] == list(whole.token_ids)
    assert {p.weight_version for p in pieces} == {1}
    assert pieces[-1].finish_reason == whole.finish_reason and all(not p.finish_reason for p in pieces[:-1])


def test_min_weight_version_refuses_or_waits(rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, version=1)[0].ok
        with pytest.raises(grpc.RpcError) as info:
            rollout.generate.Generate(pb.GenerateRequest(prompt="red", min_weight_version=2), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        waiting = rollout.generate.Generate.future(
            pb.GenerateRequest(prompt="red", max_tokens=4, min_weight_version=2, wait_for_version=True), timeout=60
        )
        assert publisher.push(trained_state, version=2)[0].ok
        assert waiting.result().weight_version == 2

    with pytest.raises(grpc.RpcError) as info:
        rollout.generate.Generate(
            pb.GenerateRequest(prompt="red", min_weight_version=9, wait_for_version=True), timeout=1
        )
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_concurrent_generate_during_pushes_never_mixes_versions(rollout, model_dir, tokenizer, trained_state) -> None:  # type: ignore[no-untyped-def]
    """Every response's tokens are exactly transformers' answer under the version it claims, while swaps
    land during decoding: a swap inside a request would give a mix of two versions' tokens, equal to neither."""
    states = [trained_state, new_model(model_dir, seed=2).state_dict()]
    ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    max_tokens = 24  # long enough that swaps keep landing while requests decode
    expected = [greedy(reference_model(model_dir, state), ids, max_tokens) for state in states]
    assert expected[0] != expected[1], "both versions answer alike: a mixed response would go unnoticed"
    state_of = {1: 0} | {version: version % 2 for version in range(2, 7)}  # version -> index into states
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(states[0], version=1)[0].ok
        stop = threading.Event()
        seen: dict[int, list[int]] = {i: [] for i in range(3)}
        wrong: list[str] = []
        errors: list[BaseException] = []

        def client(i: int) -> None:
            request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=max_tokens)
            try:
                while not stop.is_set():
                    if i % 2:
                        reply = rollout.generate.Generate(request, timeout=30)
                        tokens, versions = list(reply.token_ids), {reply.weight_version}
                    else:
                        pieces = list(
                            rollout.generate.GenerateStream(pb.GenerateStreamRequest(request=request), timeout=30)
                        )
                        tokens, versions = [t for p in pieces for t in p.token_ids], {p.weight_version for p in pieces}
                    assert len(versions) == 1, versions
                    version = versions.pop()
                    if tokens != expected[state_of[version]]:
                        wrong.append(f"version {version} answered {tokens}, expected {expected[state_of[version]]}")
                    seen[i].append(version)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=client, args=(i,)) for i in seen]
        for t in threads:
            t.start()
        for version in range(2, 7):
            assert publisher.push(states[state_of[version]], version=version)[0].ok
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert not wrong, wrong[:3]
    for versions in seen.values():
        assert versions == sorted(versions), "a client saw versions go backwards"
    assert max(max(v) for v in seen.values() if v) >= 5
    assert len({v for vs in seen.values() for v in vs}) >= 3, "too few versions were served to test anything"


def test_standalone_mode_serves_real_weights(model_dir, tokenizer, trained_state, trained_checkpoint) -> None:  # type: ignore[no-untyped-def]
    args = ["--weights", str(trained_checkpoint), "--weights-version", "3"]
    rollout = RolloutProcess(model_dir, engine="torch", args=args)
    try:
        with grpc.insecure_channel(rollout.address) as channel:
            status = pb_grpc.WeightSyncStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
            assert status.weight_version == 3
            assert status.fingerprint == manifest_of_state(trained_state).fingerprint
            ids = tokenizer("monday tuesday", add_special_tokens=False)["input_ids"]
            request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12)
            answer = pb_grpc.GenerateStub(channel).Generate(request, timeout=30)
        assert answer.weight_version == 3
        assert list(answer.token_ids) == greedy(reference_model(model_dir, trained_state), ids, 12)
    finally:
        assert rollout.stop() == 0


def test_push_cli_exit_codes(rollout, trained_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    push = [
        sys.executable,
        "-m",
        "trainer_side",
        "push",
        "--checkpoint",
        str(trained_checkpoint),
        "--rollouts",
        rollout.address,
    ]
    ok = subprocess.run([*push, "--version", "4"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "version 4 committed" in ok.stdout
    again = subprocess.run([*push, "--version", "4"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # e.g. a retry after a lost answer: it has it already
    assert "version 4 already committed" in again.stdout
    stale = subprocess.run([*push, "--version", "3"], capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1
    assert "FAILED_PRECONDITION" in stale.stderr and "STALE_VERSION" in stale.stderr
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in load_file(trained_checkpoint).items()}, other)
    conflict = subprocess.run(
        [*push[:5], str(other), *push[6:], "--version", "4"], capture_output=True, text=True, timeout=120
    )
    assert conflict.returncode == 1 and "STALE_VERSION" in conflict.stderr  # version 4 with other bytes
    gone = subprocess.run([*push[:-1], "127.0.0.1:1", "--version", "5"], capture_output=True, text=True, timeout=120)
    assert gone.returncode == 1 and "127.0.0.1:1" in gone.stderr
