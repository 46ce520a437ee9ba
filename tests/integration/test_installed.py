"""Installed-weight verification on the torch engine: every load is read back and held to the trainer's
checksums before the version serves; the test-only failpoints prove the check sees a corrupted or a
skipped tensor (the staging buffer held the right bytes both times)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rollout_side.engines.installed import FAILPOINTS_ENV, Failpoints
from rollout_side.serving.openai_api import start_http
from trainer_side.publisher import Publisher
from weightsync.errors import Reason
from weightsync.v1 import weightsync_pb2 as pb

from conftest import ROOT, LoopThread, Rollout, assert_gated, start_rollout
from installed import (
    assert_refused_naming,
    assert_verified,
    assert_weight_checker_agrees,
    nudged,
    seeded_state,
    three_pushes_verified,
    verification,
    weight_checker,
)


@pytest.fixture
def failing_rollout(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, loop_thread: LoopThread, model_dir: Path
) -> Iterator[Rollout]:
    """A torch rollout started with WEIGHTSYNC_FAILPOINTS set to the test's parameter (read at start)."""
    monkeypatch.setenv(FAILPOINTS_ENV, request.param)
    r = start_rollout(loop_thread, model_dir)
    monkeypatch.delenv(FAILPOINTS_ENV)
    yield r
    r.channel.close()
    loop_thread.run(r.server.stop(grace=0))


def test_full_delta_full_each_verified_as_installed(rollout: Rollout, model_dir: Path) -> None:
    assert not verification(rollout).HasField("verification")  # dummy weights: nothing vouched for
    three_pushes_verified(rollout, seeded_state(model_dir), 1)
    out = status_verify(rollout)  # a fresh read-back, from the trainer's CLI
    assert out.returncode == 0, out.stderr
    row = out.stdout.splitlines()[1].split()
    assert row[:4] == [rollout.address, "3", str(len(seeded_state(model_dir))), "verified"], out.stdout


@pytest.mark.parametrize(
    ("failing_rollout", "tensor"),
    [
        ("corrupt-installed=model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
        ("skip-load=model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight"),
        ("skip-load", "model.embed_tokens.weight"),  # the manifest's first tensor; tied to lm_head
    ],
    indirect=["failing_rollout"],
)
def test_failpoint_fails_the_commit_naming_the_tensor(failing_rollout: Rollout, model_dir: Path, tensor: str) -> None:
    assert_refused_naming(failing_rollout, seeded_state(model_dir), 1, tensor)


def test_a_chunk_that_lands_other_bytes_than_it_carried_is_refused_and_the_old_version_serves(
    rollout: Rollout, model_dir: Path
) -> None:
    """Each chunk is hashed where it landed in staging, the memory the torch engine then serves: a byte that
    changed in the copy fails the chunk, the update is aborted, and the version served before goes on
    answering, with its own tokens. (A check over the message would pass it, and serve it.)"""
    state = seeded_state(model_dir)
    with Publisher([rollout.address], progress=False) as publisher:
        (first,) = publisher.push(state, 1)
        assert first.ok, first.line()
        request = pb.GenerateRequest(prompt="the cat sat", max_tokens=8)
        before = rollout.generate.Generate(request, timeout=30)
        # As if set at start (WEIGHTSYNC_FAILPOINTS=corrupt-landed), from the second update on.
        rollout.receiver.failpoints = Failpoints(corrupt_landed=True)
        (second,) = publisher.push(nudged(state, ["model.norm.weight"]), 2)
    assert not second.ok and second.reason == Reason.CHUNK_CORRUPT, second.line()
    assert "failed its checksum" in second.error, second.error
    status = assert_verified(rollout, 1)  # the old version, as verified when it was committed
    assert status.state == pb.ROLLOUT_STATE_SERVING
    after = rollout.generate.Generate(request, timeout=30)
    assert (after.weight_version, list(after.token_ids)) == (1, list(before.token_ids))
    assert verification(rollout, verify=True).verification.ok  # the old version's memory is untouched


def test_staged_bytes_changed_after_they_landed_are_what_status_verify_catches(
    rollout: Rollout, model_dir: Path
) -> None:
    """The torch engine on CPU serves staging itself and takes the receiver's sums, taken as the bytes landed:
    one hash pass per byte. Memory written after that (between landing and swap) is the window it leaves to
    `status --verify`, which hashes every parameter as held, names the tensor and withdraws the version."""
    state = seeded_state(model_dir)
    tensor = "model.layers.1.self_attn.o_proj.weight"
    # As if set at start (WEIGHTSYNC_FAILPOINTS=corrupt-staged=...).
    rollout.receiver.engine._failpoints = Failpoints(corrupt_staged=tensor)  # type: ignore[attr-defined]
    with Publisher([rollout.address], progress=False) as publisher:
        (result,) = publisher.push(state, 1)
    assert result.ok, result.line()
    out = status_verify(rollout)
    assert out.returncode == 1 and tensor in out.stdout, out.stdout
    status = verification(rollout)
    assert status.state == pb.ROLLOUT_STATE_FAILED and status.weight_version == 0
    assert_gated(rollout)


def test_a_tensor_changed_after_commit_fails_status_verify(rollout: Rollout, model_dir: Path) -> None:
    """On demand, the check reads the engine as it is now: a weight changed behind its back withdraws the version."""
    with Publisher([rollout.address], progress=False) as publisher:
        (result,) = publisher.push(seeded_state(model_dir), 1)
    assert result.ok, result.line()
    assert_verified(rollout, 1)
    engine = rollout.receiver.engine
    param = dict(engine.model.named_parameters())["model.norm.weight"]  # type: ignore[attr-defined]
    with torch.no_grad():
        param.data[0] += 1
    out = status_verify(rollout)
    assert out.returncode == 1 and "model.norm.weight" in out.stdout, out.stdout
    status = verification(rollout)
    assert status.state == pb.ROLLOUT_STATE_FAILED and status.weight_version == 0
    assert_gated(rollout)


def test_weight_checker_answers_the_trainers_digests_and_sees_a_changed_tensor(
    rollout: Rollout, model_dir: Path
) -> None:
    """vLLM's /weight_checker over HTTP: checksum and compare over the read-back GetStatus(verify) does."""
    http = rollout.loop.run(
        start_http(
            rollout.server.generation, host="127.0.0.1", port=0, model="tiny", read_back=rollout.receiver.read_back
        )
    )
    base_url = f"http://127.0.0.1:{http.port}"
    try:
        state = seeded_state(model_dir)
        with Publisher([rollout.address], progress=False) as publisher:
            (result,) = publisher.push(state, 1)
        assert result.ok, result.line()
        trainer = assert_weight_checker_agrees(base_url, state, 1)
        param = dict(rollout.receiver.engine.model.named_parameters())["model.norm.weight"]  # type: ignore[attr-defined]
        with torch.no_grad():
            param.data[0] += 1
        changed = weight_checker(base_url, {"action": "compare", "baseline": trainer})
        assert (changed["match"], changed["mismatches"], changed["verified"]) == (False, ["model.norm.weight"], False)
        assert verification(rollout).state == pb.ROLLOUT_STATE_FAILED  # as status --verify: the version is withdrawn
        assert_gated(rollout)
    finally:
        rollout.loop.run(http.stop())


def status_verify(rollout: Rollout) -> subprocess.CompletedProcess[str]:
    """`python -m trainer_side status --verify` against `rollout`."""
    command = [sys.executable, "-m", "trainer_side", "status", "--verify", "--rollouts", rollout.address]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
