"""A Python client for weightsync.v1.Generate: several rollouts, least outstanding requests first, typed results.

`AsyncGenerateClient` is the client (grpc.aio); `GenerateClient` runs one on a private event loop thread
for blocking callers, so there is one implementation, not a sync and an async copy. Auth and TLS are the
publisher's: a bearer `token` and grpc `credentials`.

A rollout that cannot be reached (UNAVAILABLE with no weightsync reason: its process is gone, its port
closed) is dropped with a warning naming it, and the request goes to another; `NoRolloutLeft` when none
is left. A rollout that answers with a reason (NO_WEIGHTS, VERSION_NOT_REACHED, ...) is alive: that
error is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from weightsync.channel import open_aio_channel
from weightsync.errors import reason_of
from weightsync.spans import Span, version_spans
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["AsyncGenerateClient", "GenerateClient", "Generated", "NoRolloutLeft", "Span"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0  # seconds per call: generation on a CPU, or waiting for a version, takes a while


class NoRolloutLeft(RuntimeError):
    """Every rollout of the client is unreachable."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Generated:
    """One completion: its tokens, the version that produced them, and per-token logprobs if asked for."""

    token_ids: list[int]
    text: str
    weight_version: int  # the version of the first token (of every token, unless `spans` has several)
    finish_reason: str
    address: str  # the rollout that answered
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    token_weight_versions: list[int] | None = None  # one per token, only when they span versions

    @property
    def spans(self) -> list[Span]:
        """Which version produced which tokens: one span, unless the swap policy continue made several."""
        return version_spans(self.token_weight_versions or [self.weight_version] * len(self.token_ids))


class AsyncGenerateClient:
    """Generate on several rollouts; create and use it on one event loop."""

    def __init__(
        self,
        rollouts: Sequence[str],
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not rollouts:
            raise ValueError("no rollouts given; pass at least one HOST:PORT")
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channels = {address: open_aio_channel(address, credentials) for address in rollouts}
        self._stubs = {address: pb_grpc.GenerateStub(channel) for address, channel in self._channels.items()}
        self._outstanding = dict.fromkeys(rollouts, 0)

    @property
    def alive(self) -> list[str]:
        """The rollouts requests still go to."""
        return list(self._outstanding)

    def drop(self, address: str, why: str = "dropped by the caller") -> None:
        """Sends no more requests to `address` (its requests in flight finish or fail)."""
        if self._outstanding.pop(address, None) is not None:
            left = len(self._outstanding)
            logger.warning("rollout %s: %s; its requests go to the other rollouts (%d left)", address, why, left)

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        n: int = 1,
        logprobs: bool = False,
        top_logprobs: int = 0,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        min_weight_version: int = 0,
        wait_for_version: bool = False,
        timeout: float | None = None,
    ) -> list[Generated]:
        """The `n` completions of `prompt` (text, or token ids) from the least busy rollout, in index order.

        Sampling as vLLM's SamplingParams (temperature 0 is greedy). `min_weight_version` refuses older
        weights (VERSION_NOT_REACHED), or with `wait_for_version` waits for them until the deadline.

        Raises:
            grpc.RpcError: the rollout refused the request (weightsync.errors.reason_of says why).
            NoRolloutLeft: no rollout could be reached.
        """
        request = pb.GenerateRequest(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            n=n,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            stop=list(stop),
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
            min_weight_version=min_weight_version,
            wait_for_version=wait_for_version,
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        while self._outstanding:
            address = min(self._outstanding, key=self._outstanding.__getitem__)
            self._outstanding[address] += 1
            try:
                reply = await self._stubs[address].Generate(
                    request, timeout=timeout or self.timeout, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or reason_of(error) is not None:
                    raise
                self.drop(address, f"unreachable ({error.details()})")
                continue
            finally:
                if address in self._outstanding:
                    self._outstanding[address] -= 1
            return [_generated(c, address, logprobs or top_logprobs > 0) for c in reply.completions]
        raise NoRolloutLeft("no rollout is left to generate: every one was unreachable (see the warnings above)")

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))


class GenerateClient:
    """AsyncGenerateClient for blocking callers, run on an event loop thread of its own; thread-safe."""

    def __init__(
        self,
        rollouts: Sequence[str],
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="weightsync-generate", daemon=True)
        self._thread.start()

        async def make() -> AsyncGenerateClient:  # grpc.aio channels belong to the loop they are made on
            return AsyncGenerateClient(rollouts, token=token, credentials=credentials, timeout=timeout)

        self.client = self._call(make())

    @property
    def alive(self) -> list[str]:
        return self.client.alive

    def drop(self, address: str, why: str = "dropped by the caller") -> None:
        self._loop.call_soon_threadsafe(self.client.drop, address, why)

    def generate(self, prompt: str | Sequence[int], **sampling: Any) -> list[Generated]:
        """AsyncGenerateClient.generate, blocking; the same keywords."""
        return self._call(self.client.generate(prompt, **sampling))

    def generate_many(
        self, prompts: Sequence[str | Sequence[int]], *, n: int | Sequence[int] = 1, **sampling: Any
    ) -> list[list[Generated]]:
        """Every prompt's completions (`n`: for all, or one per prompt), run concurrently over the rollouts
        (each request to the one with the fewest outstanding); in prompt order."""
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        if len(counts) != len(prompts):
            raise ValueError(f"{len(counts)} values of n for {len(prompts)} prompts")

        async def run() -> list[list[Generated]]:
            calls = (self.client.generate(p, n=k, **sampling) for p, k in zip(prompts, counts, strict=True))
            return list(await asyncio.gather(*calls))

        return self._call(run())

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self.client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> GenerateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


def _generated(completion: pb.GenerateCompletion, address: str, logprobs: bool) -> Generated:
    return Generated(
        token_ids=list(completion.token_ids),
        text=completion.text,
        weight_version=completion.weight_version,
        finish_reason=completion.finish_reason,
        address=address,
        logprobs=list(completion.logprobs) if logprobs else None,
        top_logprobs=[dict(zip(t.token_ids, t.logprobs, strict=True)) for t in completion.top_logprobs] or None,
        token_weight_versions=list(completion.token_weight_versions) or None,
    )
