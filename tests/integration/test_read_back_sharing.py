"""On-demand read-backs of the installed weights (GetStatus(verify), /weight_checker) share the one in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from rollout_side.engines.installed import Verification
from trainer_side.publisher import Publisher

from conftest import Rollout


def test_concurrent_read_backs_share_one_and_a_later_one_reads_again(
    rollout: Rollout, trained_state: dict[str, torch.Tensor]
) -> None:
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok
    engine = rollout.receiver.engine
    read_backs: list[int] = []
    real = engine.verify

    async def counted(*args: Any) -> Verification:  # the engine's own read-back, counted
        read_backs.append(args[1])
        return await real(*args)

    engine.verify = counted  # type: ignore[method-assign]

    async def flood() -> list[Verification]:
        return await asyncio.gather(*(rollout.receiver.verify_installed() for _ in range(8)))

    answers = rollout.loop.run(flood())
    assert read_backs == [1], "eight callers at once must share one read-back"
    assert answers[0].ok and all(answer is answers[0] for answer in answers)
    assert rollout.loop.run(rollout.receiver.verify_installed()).ok
    assert read_backs == [1, 1], "a read-back asked after the last one ended reads again"
