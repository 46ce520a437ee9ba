"""Generation as any front end sees it: a request admitted only if a committed version can answer it.

The gRPC servicer (transport/generate.py) and any other front end (an OpenAI-compatible HTTP API)
convert their requests into a `GenerationRequest` and call `Generation`, so version gating, waiting
for a version and request validation are decided once. Knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from rollout_side.engines.base import Completion, Engine, Sampling
from rollout_side.update.lifecycle import Lifecycle, Phase
from weightsync import metrics
from weightsync.errors import BadRequest, NoWeights, VersionNotReached

__all__ = ["DEFAULT_MAX_TOKENS", "Generation", "GenerationRequest", "VersionGate", "interleave"]

T = TypeVar("T")


async def interleave(streams: Sequence[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T]]:
    """(index of its stream, item) from every stream as items come; the first error is raised.

    Each stream is drained by its own task, so a slow one does not hold the others. Closing this early
    (use contextlib.aclosing) cancels those tasks: engines abort the requests behind them.
    """
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
        except Exception as error:  # noqa: BLE001 - re-raised by the reader
            queue.put_nowait(error)
        else:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            got = await queue.get()
            if got is None:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()


DEFAULT_MAX_TOKENS = 16
# A prompt text longer than this many characters per token of the model's length cannot fit: refused
# before it is tokenized. Natural text and code average under 10 characters per token.
PROMPT_CHARS_PER_TOKEN = 32
MAX_TOP_LOGPROBS = 20  # as vLLM's default max_logprobs
MAX_N = 64
MAX_TEMPERATURE = 2.0  # as vLLM's SamplingParams (and the OpenAI API): both engines refuse more alike


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
    logprobs: bool = False  # the sampled tokens' logprobs (the engine's logprobs_mode: raw by default, as vLLM)
    top_logprobs: int = 0  # also the k best alternatives per token (implies logprobs)
    n: int = 0  # completions per prompt, 0: 1; completion i samples with seed + i (as vLLM does)
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    top_k: int = 0  # 0 or -1: every token
    min_p: float = 0.0
    repetition_penalty: float = 0.0  # 0: 1.0 (off)


class VersionGate:
    """Admits a request only if the served version can answer it; a request may wait for a newer one.

    What is served is the lifecycle's (`Lifecycle.served`), never the engine's: the gate, GetStatus and
    health answer alike.
    """

    def __init__(self, lifecycle: Lifecycle[Any]) -> None:
        self.served = lifecycle.served  # one object for the rollout's life: read, never written, here
        self._committed = asyncio.Condition()
        lifecycle.add_listener(self._phase_changed)

    async def admit(self, wanted: int, *, wait: bool, timeout: float | None) -> None:
        """Returns once a version >= `wanted` (and any at all) is served.

        Raises:
            NoWeights: nothing is committed yet (and the request does not wait).
            VersionNotReached: `wanted` is newer than the served version and the request does not wait,
                or it waited `timeout` seconds in vain.
        """
        served = self.served.version
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
                await asyncio.wait_for(self._committed.wait_for(lambda: self.served.version >= version), timeout)
            except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on, two on 3.10
                raise VersionNotReached(
                    f"version {version} was not committed before the deadline (serving {self.served.version})"
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
        # Tokenizing runs here, off the event loop; one thread, as a Hugging Face tokenizer is not
        # safe to call from several threads at once.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """The whole completion; `timeout` bounds a wait for the requested version."""
        started = time.perf_counter()
        prompt_ids, sampling = await self.admit(request, timeout)
        out = await self.engine.generate(prompt_ids, sampling)
        metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
        return self.traced(out)

    async def generate_stream(
        self, request: GenerationRequest, timeout: float | None = None
    ) -> AsyncIterator[Completion]:
        """The completion in pieces, all from one version."""
        started = time.perf_counter()
        prompt_ids, sampling = await self.admit(request, timeout)
        async for out in self.engine.generate_stream(prompt_ids, sampling):
            if out.finish_reason:
                metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
            yield self.traced(out)

    async def generate_n(self, request: GenerationRequest, timeout: float | None = None) -> list[Completion]:
        """All `request.n` completions, in index order, run concurrently on the engine."""
        started = time.perf_counter()
        prompt_ids, sampling = await self.admit(request, timeout)
        outs = await asyncio.gather(*(self.engine.generate(prompt_ids, s) for s in _each(sampling, request.n)))
        for out in outs:
            metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
        return [self.traced(out) for out in outs]

    async def generate_stream_n(
        self, request: GenerationRequest, timeout: float | None = None
    ) -> AsyncIterator[tuple[int, Completion]]:
        """(index, piece) of all `request.n` completions as they are produced, interleaved."""
        started = time.perf_counter()
        prompt_ids, sampling = await self.admit(request, timeout)
        streams = [self.engine.generate_stream(prompt_ids, each) for each in _each(sampling, request.n)]
        async with contextlib.aclosing(interleave(streams)) as pieces:
            async for index, out in pieces:
                if out.finish_reason:
                    metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
                yield index, self.traced(out)

    def traced(self, out: Completion) -> Completion:
        """`out` saying what its version is (Served.lineage): the base fingerprint and adapter version of the
        version that produced its tokens (the first token's), whatever is served by the time it is answered."""
        lineage = self.gate.served.lineage(out.weight_version)
        return dataclasses.replace(
            out, base_fingerprint=lineage.base_fingerprint, adapter_version=lineage.adapter_version
        )

    async def admit(self, request: GenerationRequest, timeout: float | None) -> tuple[list[int], Sampling]:
        """Refuses a request no committed version can answer, or a malformed one; returns prompt ids and sampling."""
        await self.gate.admit(request.min_weight_version, wait=request.wait_for_version, timeout=timeout)
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise BadRequest("set exactly one of prompt and prompt_token_ids")
        check_numbers(request)
        if request.max_tokens > self.max_tokens_limit:
            raise BadRequest(f"max_tokens {request.max_tokens} exceeds this rollout's limit {self.max_tokens_limit}")
        if not 0 <= request.temperature <= MAX_TEMPERATURE or not 0 <= request.top_p <= 1:
            raise BadRequest(f"temperature must be within [0, {MAX_TEMPERATURE:g}] and top_p within [0, 1]")
        if request.top_logprobs > MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs {request.top_logprobs} exceeds {MAX_TOP_LOGPROBS}")
        if request.n > MAX_N:
            raise BadRequest(f"n {request.n} exceeds this rollout's limit {MAX_N}")
        if request.top_k < -1 or not 0 <= request.min_p <= 1 or request.repetition_penalty < 0:
            raise BadRequest("top_k must be -1, 0 or more; min_p within [0, 1]; repetition_penalty positive")
        prompt_ids = await self.prompt_ids(request)  # last: the only check that costs more than a comparison
        sampling = Sampling(
            # Both engines stop at the model's length (finish_reason "length"), as vLLM does.
            max_tokens=min(request.max_tokens or DEFAULT_MAX_TOKENS, self.engine.max_model_len - len(prompt_ids)),
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            seed=request.seed,
            logprobs=request.top_logprobs if request.logprobs or request.top_logprobs else None,
            stop=tuple(request.stop),
            stop_token_ids=tuple(request.stop_token_ids),
            ignore_eos=request.ignore_eos,
            top_k=max(request.top_k, 0),
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty or 1.0,
        )
        return prompt_ids, sampling

    async def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt as token ids; refused (BadRequest) if the model cannot take it, the same on every engine.

        Lengths are checked before any work: a text prompt's characters before it is tokenized (off the
        event loop), a token prompt's count before it is copied; then tokens against the model's length
        (room for one generated token) and ids against its vocabulary.
        """
        limit, vocab = self.engine.max_model_len, self.engine.vocab_size
        if request.prompt_token_ids:
            if len(request.prompt_token_ids) >= limit:
                raise _too_long(len(request.prompt_token_ids), limit)
            ids = list(request.prompt_token_ids)
            if max(ids) >= vocab or min(ids) < 0:
                raise BadRequest(f"prompt_token_ids must lie in [0, {vocab}), this model's vocabulary")
            return ids
        if len(request.prompt) > limit * PROMPT_CHARS_PER_TOKEN:
            raise BadRequest(
                f"prompt is {len(request.prompt)} characters: more than this model's length of {limit} tokens "
                f"can hold ({PROMPT_CHARS_PER_TOKEN} characters per token at most)"
            )
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenizer_thread, self.engine.tokenize, request.prompt)
        if len(ids) >= limit:
            raise _too_long(len(ids), limit)
        return ids


def check_numbers(request: GenerationRequest) -> None:
    """Refuses (BadRequest) NaN or infinite sampling values, which no engine can sample with."""
    numbers = (request.temperature, request.top_p, request.min_p, request.repetition_penalty)
    if not all(math.isfinite(x) for x in numbers):
        raise BadRequest("temperature, top_p, min_p and repetition_penalty must be finite numbers")


def _too_long(tokens: int, limit: int) -> BadRequest:
    return BadRequest(
        f"prompt is {tokens} tokens; this model's length is {limit} (prompt and at least one generated token)"
    )


def _each(sampling: Sampling, n: int) -> list[Sampling]:
    """The sampling of each of n completions: completion i uses seed + i, as vLLM's parallel sampling does."""
    if n <= 1:
        return [sampling]
    seed = sampling.seed
    return [dataclasses.replace(sampling, seed=None if seed is None else seed + i) for i in range(n)]
