"""Drops an update whose trainer went silent, so a dead trainer never blocks the next update for long."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["Reaper", "overdue"]

logger = logging.getLogger(__name__)


def overdue(*, idle: float, age: float, idle_timeout: float, max_seconds: float) -> str:
    """Why an update `idle` seconds quiet and `age` seconds old must be dropped; "" while it may go on."""
    if idle > idle_timeout:
        return f"no activity for {idle_timeout:.0f} s"
    if age > max_seconds:
        return f"not committed within {max_seconds:.0f} s"
    return ""


class Reaper:
    """Calls `reap` every `interval` seconds on the running loop until stopped.

    A sweep that fails is logged and the next one runs as usual: a reaper that died would leave every
    later update of a dead trainer blocking the rollout for good.
    """

    def __init__(self, reap: Callable[[], None], interval: float) -> None:
        self._reap = reap
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self._reap()
            except Exception:
                logger.exception("dropping silent updates failed; trying again in %.1f s", self._interval)
