"""weightsync.v1.Generate: gated on a committed version, every response tagged with it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from rollout_side.engines.base import Sampling
from rollout_side.receiver import Receiver
from rollout_side.servicers.errors import grpc_errors, grpc_stream_errors
from weightsync import metrics
from weightsync.errors import BadRequest, NoWeights, VersionNotReached
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["GenerateServicer"]

DEFAULT_MAX_TOKENS = 16


class GenerateServicer(pb_grpc.GenerateServicer):
    def __init__(self, receiver: Receiver, *, max_tokens_limit: int = 4096) -> None:
        self.receiver = receiver
        self.engine = receiver.engine
        self.max_tokens_limit = max_tokens_limit

    @grpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        started = time.perf_counter()
        prompt_ids, sampling = await self._admit(request, context)
        out = await self.engine.generate(prompt_ids, sampling)
        metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
        return pb.GenerateResponse(
            token_ids=out.token_ids, text=out.text, weight_version=out.weight_version, finish_reason=out.finish_reason
        )

    @grpc_stream_errors
    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        started = time.perf_counter()
        prompt_ids, sampling = await self._admit(request.request, context)
        async for out in self.engine.generate_stream(prompt_ids, sampling):
            if out.finish_reason:
                metrics.Rollout.observe_generate(out.weight_version, time.perf_counter() - started)
            yield pb.GenerateStreamResponse(
                token_ids=out.token_ids,
                text=out.text,
                weight_version=out.weight_version,
                finish_reason=out.finish_reason,
            )

    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[list[int], Sampling]:
        """Refuses a request no committed version can answer; returns prompt ids and sampling."""
        served = self.engine.weight_version
        wanted = request.min_weight_version
        if wanted > served and request.wait_for_version:
            await self.receiver.wait_for_version(wanted, context.time_remaining())
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
            seed=request.seed if request.HasField("seed") else None,
        )
        return prompt_ids, sampling
