"""Generation as any front end sees it: a request admitted only if a committed version can answer it.

The gRPC servicer (servicers/generate.py) and any other front end (an OpenAI-compatible HTTP API)
convert their requests into a `GenerationRequest` and call `Generation`, so version gating, waiting
for a version and request validation are decided once. Knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from rollout_side.engines.base import Completion, Engine, Sampling
from rollout_side.lifecycle import Lifecycle, Phase
from weightsync import metrics
from weightsync.errors import BadRequest, NoWeights, VersionNotReached

__all__ = ["DEFAULT_MAX_TOKENS", "Generation", "GenerationRequest", "VersionGate"]

DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationRequest:
    """One request, whatever it came in on; zero values mean the defaults, as on the wire."""

    prompt: str = ""
    prompt_token_ids: Sequence[int] = ()
    max_tokens: int = 0  # 0: DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.0  # 0: 1.0
    seed: int | None = None
    min_weight_version: int = 0
    wait_for_version: bool = False


class VersionGate:
    """Admits a request only if the served version can answer it; a request may wait for a newer one."""

    def __init__(self, engine: Engine, lifecycle: Lifecycle[Any]) -> None:
        self.engine = engine
        self._committed = asyncio.Condition()
        lifecycle.add_listener(self._phase_changed)

    async def admit(self, wanted: int, *, wait: bool, timeout: float | None) -> None:
        """Returns once a version >= `wanted` (and any at all) is served.

        Raises:
            NoWeights: nothing is committed yet (and the request does not wait).
            VersionNotReached: `wanted` is newer than the served version and the request does not wait,
                or it waited `timeout` seconds in vain.
        """
        served = self.engine.weight_version
        if wanted > served and wait:
            await self.wait_for_version(wanted, timeout)
        elif served == 0:
            raise NoWeights(
                "no weights are committed yet: the rollout holds dummy weights until a trainer pushes a "
                "version (python -m trainer_side push) or it starts with --weights"
            )
        elif wanted > served:
            raise VersionNotReached(
                f"min_weight_version {wanted} is newer than the served version {served}; "
                "retry later or set wait_for_version"
            )

    async def wait_for_version(self, version: int, timeout: float | None) -> None:
        """Waits until `version` or newer is served; raises VersionNotReached at the deadline."""
        async with self._committed:
            try:
                await asyncio.wait_for(self._committed.wait_for(lambda: self.engine.weight_version >= version), timeout)
            except TimeoutError:
                raise VersionNotReached(
                    f"version {version} was not committed before the deadline (serving {self.engine.weight_version})"
                ) from None

    async def _phase_changed(self, phase: Phase) -> None:
        if phase is Phase.SERVING:
            async with self._committed:
                self._committed.notify_all()


class Generation:
    """Validates, gates and runs requests on one engine; every completion comes from one version."""

    def __init__(self, engine: Engine, gate: VersionGate, *, max_tokens_limit: int = 4096) -> None:
        self.engine = engine
        self.gate = gate
        self.max_tokens_limit = max_tokens_limit

    async def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """The whole completion; `timeout` bounds a wait for the requested version."""
        started = time.perf_counter()
        prompt_ids, sampling = await self.admit(request, timeout)
        out = await self.engine.generate(prompt_ids, sampling)
        metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
        return out

    async def generate_stream(
        self, request: GenerationRequest, timeout: float | None = None
    ) -> AsyncIterator[Completion]:
        """The completion in pieces, all from one version."""
        started = time.perf_counter()
        prompt_ids, sampling = await self.admit(request, timeout)
        async for out in self.engine.generate_stream(prompt_ids, sampling):
            if out.finish_reason:
                metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
            yield out

    async def admit(self, request: GenerationRequest, timeout: float | None) -> tuple[list[int], Sampling]:
        """Refuses a request no committed version can answer, or a malformed one; returns prompt ids and sampling."""
        await self.gate.admit(request.min_weight_version, wait=request.wait_for_version, timeout=timeout)
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise BadRequest("set exactly one of prompt and prompt_token_ids")
        prompt_ids = list(request.prompt_token_ids) or self.engine.tokenize(request.prompt)
        if request.max_tokens > self.max_tokens_limit:
            raise BadRequest(f"max_tokens {request.max_tokens} exceeds this rollout's limit {self.max_tokens_limit}")
        if request.temperature < 0 or not 0 <= request.top_p <= 1:
            raise BadRequest("temperature must be >= 0 and top_p within [0, 1]")
        sampling = Sampling(
            max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            seed=request.seed,
        )
        return prompt_ids, sampling
