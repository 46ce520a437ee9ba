"""The vLLM engine's admission gate and swap policies: who may enter vLLM, and what a swap does to those inside.

Atomicity comes from this gate, not from vLLM: a swap stops admitting requests, applies the swap policy
to those inside (drain waits for them; abort ends them; continue ends Generate's and has them resubmit
after the swap, rollout_side/engines/vllm_requests.py), waits until none is left inside vLLM, loads,
and reopens. vLLM's own pause(mode="wait") is not enough on its own: it drains only running requests
and leaves queued ones to start later on the new weights.

The gate also knows the version its requests run on, which tags their completions, and whether the
weights are torn (a swap failed midway): then it refuses, so requests waiting here never run on them.
What the rollout serves is not decided here but in `Lifecycle.served` (rollout_side/update/served.py).
No vLLM import: the gate only calls `abort` on the AsyncLLM it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout_side.engines.base import SWAP_POLICIES
from weightsync.errors import EngineUnavailable

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = ["Gate", "Hold"]


@dataclass(slots=True)
class Hold:
    """Whether one Generate request holds the gate (under continue it leaves it for a swap)."""

    held: bool = True


class Gate:
    """Requests hold the gate from admission until vLLM finishes them; a swap takes it whole."""

    def __init__(self, swap_policy: str) -> None:
        if swap_policy not in SWAP_POLICIES:
            raise ValueError(f"swap_policy must be one of {', '.join(SWAP_POLICIES)}, not {swap_policy!r}")
        self.swap_policy = swap_policy
        self.version = 0  # what the weights hold: admitted requests run on it
        self.torn = False  # a swap failed midway: no version's weights are held
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._swap_lock = asyncio.Lock()
        self._request_ids: set[str] = set()  # inside vLLM now: what the swap policy abort aborts
        # Generate's requests inside vLLM (not the HTTP face's): what the swap policy continue aborts and
        # resubmits; `swapped` holds those it aborted, so their pumps tell that abort from a client's.
        self._continuable: set[str] = set()
        self.swapped: set[str] = set()

    @property
    def swapping(self) -> bool:
        """Whether a swap holds the gate closed now."""
        return not self._admitting.is_set()

    async def admit(self) -> int:
        """Waits out any swap in progress, then returns the version this request will run on."""
        while not self._admitting.is_set():
            await self._admitting.wait()
        if self.torn:
            raise EngineUnavailable("the last weight load failed; no complete version is loaded")
        self._inflight += 1
        self._drained.clear()
        return self.version

    def release(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    def let_go(self, hold: Hold) -> None:
        """Releases the gate if `hold` holds it (a continued request leaves it during a swap)."""
        if hold.held:
            hold.held = False
            self.release()

    def entered(self, request_id: str, *, continuable: bool) -> None:
        """A request went into vLLM; `continuable`: Generate's, which the swap policy continue resubmits."""
        self._request_ids.add(request_id)
        if continuable:
            self._continuable.add(request_id)

    def forget(self, request_id: str) -> None:
        """A request left vLLM."""
        self._request_ids.discard(request_id)
        self._continuable.discard(request_id)
        self.swapped.discard(request_id)

    @contextlib.asynccontextmanager
    async def admission(self, request_id: str) -> AsyncIterator[int]:
        """Holds the gate around one vLLM request made outside Generate (vLLM's own OpenAI serving layer,
        rollout_side/serving/vllm_openai.py); yields the version it runs on."""
        version = await self.admit()
        self.entered(request_id, continuable=False)
        try:
            yield version
        finally:
            self.forget(request_id)
            self.release()

    @contextlib.asynccontextmanager
    async def closed(self, llm: AsyncLLM) -> AsyncIterator[None]:
        """Closes the gate, applies the swap policy to the requests inside, and waits until none is left;
        the swap runs inside, and the gate reopens after it, whatever its outcome."""
        async with self._swap_lock:
            self._admitting.clear()
            try:
                if self.swap_policy == "abort" and self._request_ids:
                    # vLLM ends each with finish_reason "abort" and the tokens so far.
                    await llm.abort(list(self._request_ids))
                elif self.swap_policy == "continue" and self._continuable:
                    # Each pump gets an "abort" with the tokens so far (all from the old version), leaves
                    # the gate, and after the swap resubmits prompt + those tokens: vLLM then computes
                    # their KV cache with the new weights. The HTTP face's requests (vLLM's response
                    # shapes cannot tag tokens with versions) drain instead.
                    self.swapped |= self._continuable
                    await llm.abort(list(self._continuable))
                await self._drained.wait()
                yield
            finally:
                self._admitting.set()

    def loaded(self, version: int) -> None:
        """A swap (or the boot) put `version`'s weights in place."""
        self.version, self.torn = version, False

    def tear(self) -> None:
        """A swap failed midway: the weights are no version's."""
        self.version, self.torn = 0, True
