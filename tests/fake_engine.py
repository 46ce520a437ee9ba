"""An engine for lifecycle tests: no model, milliseconds per update, and faults on demand.

Each "token" it generates is the version of the weights that produced it, read afresh per token, so
a swap that lands inside a request shows up in the response. Loads wait until no request is in
flight (the `Engine.load` contract), can be slow (`load_delay`), and can fail (`fail_next_load`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import torch

from rollout_side.engines.base import Completion, Engine, ParamSpec, Sampling
from weightsync.errors import EngineUnavailable
from weightsync.manifest import Manifest

__all__ = ["SPECS", "FakeEngine", "fake_state"]

BF16 = torch.bfloat16
# Two parameters, one of them tied under a second name, as embed_tokens and lm_head are.
SPECS: Mapping[str, ParamSpec] = {
    "embed.weight": ParamSpec(shape=(64, 32), dtype=BF16, key="embed.weight"),
    "head.weight": ParamSpec(shape=(64, 32), dtype=BF16, key="embed.weight"),
    "norm.weight": ParamSpec(shape=(32,), dtype=BF16, key="norm.weight"),
}


def fake_state(seed: int) -> dict[str, torch.Tensor]:
    """A version of the fake model's weights (tied head sent once, as a trainer sends it)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 32, generator=generator).to(BF16),
        "norm.weight": torch.randn(32, generator=generator).to(BF16),
    }


class FakeEngine(Engine):
    """Implements Engine; `tokens` records (request number, version) for every token produced."""

    name = "fake"
    verify_installed = False  # it holds no weights to read back

    def __init__(
        self,
        *,
        token_delay: float = 0.0,
        load_delay: float = 0.0,
        keeps_staging: bool = False,
        boot_gate: asyncio.Event | None = None,
    ) -> None:
        super().__init__(Path("fake-model"))
        self.token_delay = token_delay  # seconds per generated token: a slow request
        self.load_delay = load_delay  # seconds a load takes once requests have drained
        self.keeps_staging = keeps_staging  # serve from the staging buffer (as torch on CPU does), else copy out
        self.fail_next_load = False
        self.boot_gate = boot_gate  # start() returns once it is set: a slow boot
        self.offered: list[int] = []  # versions offered while booting (Engine.offer_at_boot)
        self.expected: list[bool] = []  # what Engine.expect_at_boot heard while booting
        self.tokens: list[tuple[int, int]] = []
        self.loads: list[int] = []  # versions loaded, in order
        self.allocated_on: list[str] = []  # the thread of each allocate_staging call
        self.started = False
        self._version = 0
        self._live: torch.Tensor | None = None
        self._requests = 0
        self._inflight = 0
        self._loading = False
        self._gate = asyncio.Condition()

    async def start(self, weights: Path | None = None, version: int = 0) -> None:
        if self.boot_gate is not None:
            await self.boot_gate.wait()
        self.started = True
        self._version = version if weights is not None else 0

    def param_specs(self) -> Mapping[str, ParamSpec]:
        return SPECS

    def allocate_staging(self, nbytes: int) -> torch.Tensor:
        self.allocated_on.append(threading.current_thread().name)
        return torch.zeros(nbytes, dtype=torch.uint8)

    def expect_at_boot(self, coming: bool) -> None:
        self.expected.append(coming)

    async def offer_at_boot(self, staging: torch.Tensor, manifest: Manifest, version: int) -> None:
        assert not self.started, "offered after the boot"
        self.offered.append(version)

    async def load(
        self, staging: torch.Tensor, manifest: Manifest, version: int, *, staged_sums: Sequence[str] = ()
    ) -> torch.Tensor | None:
        if not self.started:
            raise EngineUnavailable("load before the engine is up")
        async with self._gate:
            self._loading = True
            try:
                await self._gate.wait_for(lambda: self._inflight == 0)  # atomicity: no request sees two versions
                await asyncio.sleep(self.load_delay)
                if self.fail_next_load:
                    self.fail_next_load, self._version = False, 0
                    raise RuntimeError("injected load failure")
                self._version = version
                self.loads.append(version)
            finally:
                self._loading = False
                self._gate.notify_all()
        if not self.keeps_staging:
            return staging  # copied out: the buffer is free again
        previous, self._live = self._live, staging
        return previous

    @property
    def loading(self) -> bool:
        """Whether a load is under way (waiting for requests to drain, or loading)."""
        return self._loading

    @property
    def weight_version(self) -> int:
        return self._version

    def tokenize(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Completion:
        tokens: list[int] = []
        version, finish = 0, ""
        async for piece in self.generate_stream(prompt_ids, sampling):
            tokens += piece.token_ids
            version, finish = piece.weight_version, piece.finish_reason or finish
        return Completion(token_ids=tokens, text="", weight_version=version, finish_reason=finish)

    async def generate_stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Completion]:
        async with self._gate:
            await self._gate.wait_for(lambda: not self._loading)
            self._inflight += 1
            self._requests += 1
            request, version = self._requests, self._version
        try:
            for step in range(sampling.max_tokens):
                await asyncio.sleep(self.token_delay)
                produced = self._version  # what the weights are now: differs from `version` after a torn swap
                self.tokens.append((request, produced))
                last = step == sampling.max_tokens - 1
                yield Completion(
                    token_ids=[produced], text="", weight_version=version, finish_reason="length" if last else ""
                )
        finally:
            async with self._gate:
                self._inflight -= 1
                self._gate.notify_all()

    async def shutdown(self) -> None:
        self.started = False
