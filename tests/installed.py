"""Checks shared by the installed-weight verification tests of both engines (tests/integration/test_installed*.py)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from trainer_side.publisher import Publisher
from trainer_side.train import new_model
from weightsync.errors import Reason, reason_of
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb

from conftest import Rollout, assert_gated


def seeded_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """A freshly initialised (seeded) model's bf16 weights: any real weights do for verification."""
    return bf16(new_model(model_dir, seed=1).state_dict())  # seed 0 is what the torch engine boots with


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainer's bf16 weights, tied lm_head left out (as Hugging Face saves them)."""
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items() if k != "lm_head.weight"}


def nudged(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """A copy with the first element of each named tensor moved by one bf16 ulp: a small delta."""
    out = dict(state)
    for name in names:
        tensor = state[name].clone()
        tensor.view(torch.int16).view(-1)[0] += 1
        out[name] = tensor
    return out


def verification(rollout: Rollout, *, verify: bool = False) -> pb.GetStatusResponse:
    return rollout.weight_sync.GetStatus(pb.GetStatusRequest(verify=verify), timeout=120)


def assert_verified(rollout: Rollout, version: int, *, workers: int = 1) -> pb.GetStatusResponse:
    """GetStatus says `version` is served and its installed weights were read back and matched, per worker."""
    status = verification(rollout)
    v = status.verification
    assert status.weight_version == version
    assert status.HasField("verification"), "no read-back of the installed weights ran"
    assert (v.weight_version, v.ok, v.workers, list(v.mismatched)) == (version, True, workers, [])
    assert v.tensors == len(status_tensors(rollout)) and abs(v.verified_at - time.time()) < 600
    return status


def status_tensors(rollout: Rollout) -> list[str]:
    manifest = rollout.receiver.delta_base.manifest
    assert manifest is not None
    return [e.name for e in manifest]


def three_pushes_verified(rollout: Rollout, state: dict[str, torch.Tensor], first: int, *, workers: int = 1) -> None:
    """Full, delta, full: after each, GetStatus reports the installed weights verified."""
    with Publisher([rollout.address], progress=False, delta=True) as publisher:
        (full,) = publisher.push(state, first)
        assert full.ok and not full.delta, full.line()
        assert_verified(rollout, first, workers=workers)
        (delta,) = publisher.push(nudged(state, ["model.norm.weight"]), first + 1)
        assert delta.ok and delta.delta, delta.line()
        assert_verified(rollout, first + 1, workers=workers)
    with Publisher([rollout.address], progress=False) as publisher:
        (again,) = publisher.push(nudged(state, ["model.norm.weight", "model.embed_tokens.weight"]), first + 2)
        assert again.ok and not again.delta, again.line()
    assert_verified(rollout, first + 2, workers=workers)


def assert_refused_naming(rollout: Rollout, state: dict[str, torch.Tensor], version: int, tensor: str) -> None:
    """A push the engine does not install as sent fails its commit with INSTALLED_MISMATCH naming `tensor`;
    the rollout then serves nothing (gated, FAILED) and says why."""
    with Publisher([rollout.address], progress=False) as publisher:
        (result,) = publisher.push(state, version)
    assert not result.ok and result.reason == Reason.INSTALLED_MISMATCH, result.line()
    assert tensor in result.error, result.error
    status = verification(rollout)
    assert status.state == pb.ROLLOUT_STATE_FAILED and status.weight_version == 0
    assert tensor in status.detail
    assert not status.verification.ok and any(m.startswith(tensor) for m in status.verification.mismatched)
    assert_gated(rollout)
    with pytest.raises(grpc.RpcError) as info:  # nothing to re-check: nothing is served
        verification(rollout, verify=True)
    assert reason_of(info.value) == Reason.NO_WEIGHTS


def weight_checker(base_url: str, body: dict[str, object]) -> dict[str, object]:
    """POST /weight_checker (vLLM's RL-server shape) on a rollout's HTTP face: the 200 answer's body."""
    answer = httpx.post(base_url + "/weight_checker", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    out: dict[str, object] = answer.json()
    return out


def assert_weight_checker_agrees(base_url: str, state: dict[str, torch.Tensor], version: int) -> dict[str, str]:
    """/weight_checker's checksums are the trainer's digests of `state`; compare finds a changed and an extra key.

    Returns the trainer's digests (tensor name -> checksum), as vLLM's baseline."""
    trainer = {e.name: e.checksum for e in manifest_of_state(state)}
    got = weight_checker(base_url, {"action": "checksum"})
    assert (got["checksums"], got["verified"], got["weight_version"]) == (trainer, True, version)
    same = weight_checker(base_url, {"action": "compare", "baseline": trainer})
    assert (same["match"], same["mismatches"]) == (True, [])
    changed = trainer | {"model.norm.weight": trainer["model.embed_tokens.weight"], "not.a.tensor": "x"}
    differs = weight_checker(base_url, {"action": "compare", "baseline": changed})
    assert (differs["match"], differs["mismatches"]) == (False, ["model.norm.weight", "not.a.tensor"])
    return trainer
