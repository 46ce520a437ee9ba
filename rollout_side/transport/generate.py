"""weightsync.v1.Generate over gRPC: proto in, one call into rollout_side/serving/generation.py, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from rollout_side.engines.base import Completion
from rollout_side.serving.generation import Generation, GenerationRequest
from rollout_side.transport.errors import grpc_errors, grpc_stream_errors
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["GenerateServicer"]

Context = grpc.aio.ServicerContext[object, object]


class GenerateServicer(pb_grpc.GenerateServicer):  # type: ignore[misc]  # generated stubs are untyped
    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    @grpc_errors
    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        outs = await self.generation.generate_n(_request(request), context.time_remaining())
        completions = [_completion(i, out) for i, out in enumerate(outs)]
        first = completions[0]
        return pb.GenerateResponse(
            token_ids=first.token_ids,
            text=first.text,
            weight_version=first.weight_version,
            finish_reason=first.finish_reason,
            logprobs=first.logprobs,
            top_logprobs=first.top_logprobs,
            token_weight_versions=first.token_weight_versions,
            completions=completions,
            base_fingerprint=first.base_fingerprint,
            adapter_version=first.adapter_version,
        )

    @grpc_stream_errors
    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for index, out in self.generation.generate_stream_n(_request(request.request), context.time_remaining()):
            yield pb.GenerateStreamResponse(index=index, **_tokens(out))


def _request(request: pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        prompt=request.prompt,
        prompt_token_ids=list(request.prompt_token_ids),
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed if request.HasField("seed") else None,
        min_weight_version=request.min_weight_version,
        wait_for_version=request.wait_for_version,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        n=request.n,
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        top_k=request.top_k,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
    )


def _top(out: Completion) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(token_ids=list(top), logprobs=list(top.values())) for top in out.top_logprobs or ()]


def _completion(index: int, out: Completion) -> pb.GenerateCompletion:
    return pb.GenerateCompletion(index=index, token_weight_versions=out.token_versions, **_tokens(out))


def _tokens(out: Completion) -> dict[str, Any]:
    """The fields a completion and a stream piece share: tokens, text, version (and what it is), finish, logprobs."""
    return {
        "token_ids": out.token_ids,
        "text": out.text,
        "weight_version": out.weight_version,
        "base_fingerprint": out.base_fingerprint,
        "adapter_version": out.adapter_version,
        "finish_reason": out.finish_reason,
        "logprobs": out.logprobs or (),
        "top_logprobs": _top(out),
    }
