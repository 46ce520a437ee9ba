"""vLLM's own OpenAI serving layer (vllm.entrypoints.openai) over the rollout's vLLM engine, gated.

On the vLLM engine, /v1/completions and /v1/chat/completions are answered by vLLM's
OpenAIServingCompletion and OpenAIServingChat (chat templates, tool-call parsing, logprobs, SSE exactly
as vLLM does them). Two gates stand in the path: the rollout's VersionGate before the request reaches
vLLM's code (503 before the first commit, min_weight_version), and the engine's admission gate around
every vLLM request it makes (GatedEngineClient), so a swap drains (or, under the abort policy, aborts)
these requests like Generate's and no response straddles two versions. The response then gets the
rollout's `weight_version` (top-level, every SSE chunk too) and the `x-weight-version` header.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

if TYPE_CHECKING:
    from rollout_side.engines.vllm_engine import VllmEngine

__all__ = ["GatedEngineClient", "VllmOpenAI"]

# The versions the vLLM requests of one HTTP request were admitted on (a list shared with the child
# tasks vLLM's serving layer starts for n > 1 or several prompts).
_VERSIONS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("weightsync_versions", default=None)


class GatedEngineClient:
    """vLLM's engine client (the AsyncLLM), with the rollout engine's admission gate around `generate`."""

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine
        self._llm = engine.async_llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> AsyncIterator[Any]:
        async with self._engine.admission(request_id) as version:
            versions = _VERSIONS.get()
            if versions is not None:
                versions.append(version)
            async for out in self._llm.generate(prompt, sampling_params, request_id, **kwargs):
                yield out


class VllmOpenAI:
    """The two generation endpoints through vLLM's serving classes; built once the engine runs."""

    def __init__(self, engine: VllmEngine, model: str) -> None:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer

        client: Any = GatedEngineClient(engine)
        paths = [BaseModelPath(name=model, model_path=str(engine.model_dir))]
        models = OpenAIServingModels(engine_client=client, base_model_paths=paths)
        renderer = OnlineRenderer(
            model_config=client.model_config,
            renderer=client.renderer,
            request_logger=None,
            chat_template=None,  # the tokenizer's own
            chat_template_content_format="auto",
        )
        self.completion = OpenAIServingCompletion(client, models, online_renderer=renderer, request_logger=None)
        self.chat = OpenAIServingChat(
            client,
            models,
            "assistant",
            online_renderer=renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )

    async def completions(self, body: dict[str, Any], request: Request, fallback_version: int) -> Response:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return await self._serve(CompletionRequest, self.completion.create_completion, body, request, fallback_version)

    async def chat_completions(self, body: dict[str, Any], request: Request, fallback_version: int) -> Response:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return await self._serve(
            ChatCompletionRequest, self.chat.create_chat_completion, body, request, fallback_version
        )

    async def _serve(
        self, model: Any, create: Any, body: dict[str, Any], request: Request, fallback_version: int
    ) -> Response:
        from pydantic import ValidationError
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        from rollout_side.openai_schema import HttpError

        body = {k: v for k, v in body.items() if k not in ("min_weight_version", "wait_for_version")}
        body.setdefault("return_token_ids", True)  # as the rollout's own face does: choices carry token_ids
        try:
            parsed = model.model_validate(body)
        except ValidationError as error:
            raise HttpError(400, f"invalid request: {error}", "BAD_REQUEST") from None
        versions: list[int] = []
        token = _VERSIONS.set(versions)
        try:
            result = await create(parsed, request)
            if isinstance(result, ErrorResponse):
                return JSONResponse(result.model_dump(), status_code=result.error.code)
            if not isinstance(result, AsyncGenerator):
                version = min(versions, default=fallback_version)
                payload = result.model_dump() | {"weight_version": version}
                return JSONResponse(payload, headers={"x-weight-version": str(version)})
            # Streaming: the first event comes after admission, so the header can name the version.
            first = await anext(result, None)
        finally:
            _VERSIONS.reset(token)
        version = min(versions, default=fallback_version)
        return StreamingResponse(
            _tagged(first, result, version), media_type="text/event-stream", headers={"x-weight-version": str(version)}
        )


async def _tagged(first: str | None, events: AsyncGenerator[str], version: int) -> AsyncIterator[str]:
    """vLLM's SSE events with `weight_version` added to every JSON payload."""
    try:
        if first is not None:
            yield _tag(first, version)
            async for event in events:
                yield _tag(event, version)
    finally:
        await events.aclose()  # a client gone early: vLLM aborts the request


def _tag(event: str, version: int) -> str:
    out = []
    for line in event.split("\n"):
        if line.startswith("data: ") and line[6:].lstrip().startswith("{"):
            try:
                payload = json.loads(line[6:])
            except ValueError:
                out.append(line)
                continue
            line = "data: " + json.dumps(payload | {"weight_version": version})
        out.append(line)
    return "\n".join(out)
