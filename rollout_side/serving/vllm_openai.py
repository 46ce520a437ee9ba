"""vLLM's own OpenAI serving layer (vllm.entrypoints.openai) over the rollout's vLLM engine, gated.

On the vLLM engine, /v1/completions and /v1/chat/completions are answered by vLLM's
OpenAIServingCompletion and OpenAIServingChat (chat templates, tool-call parsing, logprobs, SSE exactly
as vLLM does them). Two gates stand in the path: the rollout's VersionGate before the request reaches
vLLM's code (503 before the first commit, min_weight_version), and the engine's admission gate around
every vLLM request it makes (GatedEngineClient), so a swap drains (or, under the abort policy, aborts)
these requests like Generate's and no response straddles two versions (under the swap policy continue
they drain: vLLM's response shapes cannot say which version produced which token). The response then
gets the rollout's `weight_version`: on every choice the version its prompt ran on, top-level (and in the
`x-weight-version` header) the lowest of them; every SSE chunk carries its choices' versions too. vLLM 0.32
knows return_token_ids and return_tokens_as_token_ids; `return_weight_versions` (vLLM 0.33) is added
here: each choice's `weight_versions` is one span over its tokens (these requests drain at a swap).
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from rollout_side.update.served import Served

if TYPE_CHECKING:
    from rollout_side.engines.vllm_engine import VllmEngine

__all__ = ["ChatParsers", "GatedEngineClient", "Versions", "VllmOpenAI", "parser_problem"]


class Versions:
    """The versions the vLLM requests of one HTTP request were admitted on, by prompt.

    Shared (through a context variable) with the tasks vLLM's serving layer starts for several prompts.
    A completions request's prompt i runs as engine request `<id>-i` with choices i*n .. i*n+n-1 (vLLM's
    OpenAIServingCompletion); a chat request has one prompt (its n choices are one engine request).
    """

    def __init__(self, n: int, *, per_prompt: bool, served: Served | None = None) -> None:
        self.n = max(n, 1)
        self.per_prompt = per_prompt
        # return_weight_versions: tag choices with spans of their token_ids and their version's lineage too
        self.served = served
        self.by_prompt: dict[int, int] = {}
        self._emitted: dict[int, int] = {}  # streaming: tokens sent so far, by choice index

    def admitted(self, request_id: str, version: int) -> None:
        tail = request_id.rsplit("-", 1)[-1]
        self.by_prompt[int(tail) if self.per_prompt and tail.isdigit() else 0] = version

    def lowest(self, fallback: int) -> int:
        return min(self.by_prompt.values(), default=fallback)

    def of_choice(self, index: int, fallback: int) -> int:
        return self.by_prompt.get(index // self.n, self.lowest(fallback))

    def tag(self, payload: dict[str, Any], fallback: int) -> dict[str, Any]:
        """`payload` with each choice's version, and the lowest of them (of all, with no choices) on top."""
        choices = payload.get("choices") or []
        for choice in choices:
            if isinstance(choice, dict) and isinstance(choice.get("index"), int):
                choice["weight_version"] = self.of_choice(choice["index"], fallback)
                if self.served is not None:
                    self._span(choice, self.served)
        tagged = [c["weight_version"] for c in choices if isinstance(c, dict) and "weight_version" in c]
        return payload | {"weight_version": min(tagged, default=self.lowest(fallback))}

    def _span(self, choice: dict[str, Any], served: Served) -> None:
        """vLLM 0.33's `weight_versions` of a choice (or of a stream chunk's tokens, counted from the first),
        and what its version is (a LoRA adapter version and its base, or a full version), as the rollout's
        own face says it."""
        from rollout_side.serving.openai_schema import weight_versions

        tokens = choice.get("token_ids") or []
        start = self._emitted.get(choice["index"], 0)
        self._emitted[choice["index"]] = start + len(tokens)
        choice["weight_versions"] = weight_versions([choice["weight_version"]] * len(tokens), start)
        lineage = served.lineage(choice["weight_version"])
        choice |= {"base_fingerprint": lineage.base_fingerprint, "adapter_version": lineage.adapter_version}


_VERSIONS: contextvars.ContextVar[Versions | None] = contextvars.ContextVar("weightsync_versions", default=None)


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
                versions.admitted(request_id, version)
            async for out in self._llm.generate(prompt, sampling_params, request_id, **kwargs):
                yield out


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatParsers:
    """vLLM's tool-call and reasoning parsers for the chat endpoint: `vllm serve`'s flags of the same names."""

    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tool_call_parser or self.enable_auto_tool_choice or self.reasoning_parser)


def parser_problem(model_dir: Path, parsers: ChatParsers) -> str | None:
    """Why vLLM would refuse these parsers for this model (as `vllm serve` checks them), or None.

    Run before the engine boots, so a typo is a one-line start-up error, not a failed first chat request.
    Imports vLLM (seconds), with its import-time warnings silenced: the error line must be the only one.
    """
    if parsers.enable_auto_tool_choice and not parsers.tool_call_parser:
        return "--enable-auto-tool-choice needs --tool-call-parser"
    vllm_log = logging.getLogger("vllm")
    level = vllm_log.level
    try:
        import vllm.logger  # noqa: F401 - sets up the "vllm" logger first, so the level set next sticks

        vllm_log.setLevel(logging.ERROR)
        from vllm.parser import ParserManager
        from vllm.reasoning import ReasoningParserManager
        from vllm.tokenizers import get_tokenizer
        from vllm.tool_parsers import ToolParserManager

        for flag, name, known in (
            ("--tool-call-parser", parsers.tool_call_parser, ToolParserManager.list_registered()),
            ("--reasoning-parser", parsers.reasoning_parser, ReasoningParserManager.list_registered()),
        ):
            if name and name not in known:
                return f"{flag} {name!r} is not one of vLLM's parsers: {', '.join(sorted(known))}"
        ParserManager.get_parser(
            tool_parser_name=parsers.tool_call_parser,
            reasoning_parser_name=parsers.reasoning_parser,
            enable_auto_tools=parsers.enable_auto_tool_choice,
            model_name=str(model_dir),
            tokenizer=get_tokenizer(str(model_dir)),
        )
    except ImportError as error:
        return f"--tool-call-parser and --reasoning-parser are vLLM's: {error}"
    except Exception as error:  # noqa: BLE001 - vLLM raises several kinds for a parser that does not fit
        return f"vLLM's parsers do not fit --model {model_dir}: {' '.join(str(error).split())}"
    finally:
        vllm_log.setLevel(level)
    return None


class VllmOpenAI:
    """The two generation endpoints through vLLM's serving classes; built once the engine runs."""

    def __init__(self, engine: VllmEngine, model: str, served: Served, parsers: ChatParsers | None = None) -> None:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer

        self.served = served
        client: Any = GatedEngineClient(engine)
        paths = [BaseModelPath(name=model, model_path=str(engine.model_dir))]
        models = OpenAIServingModels(engine_client=client, base_model_paths=paths)
        # The renderer validates tool_choice and renders tools; the chat serving parses the output: both
        # take the parsers, as `vllm serve` gives them.
        tool_parser = parsers.tool_call_parser if parsers else None
        auto_tools = bool(parsers and parsers.enable_auto_tool_choice)
        reasoning_parser = (parsers.reasoning_parser if parsers else None) or None
        renderer = OnlineRenderer(
            model_config=client.model_config,
            renderer=client.renderer,
            request_logger=None,
            chat_template=None,  # the tokenizer's own
            chat_template_content_format="auto",
            enable_auto_tools=auto_tools,
            tool_parser=tool_parser,
            reasoning_parser=reasoning_parser,
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
            tool_parser=tool_parser,
            enable_auto_tools=auto_tools,
            reasoning_parser=reasoning_parser or "",
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
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.exceptions import VLLMError

        from rollout_side.serving.openai_schema import HttpError

        spans = bool(body.get("return_weight_versions"))
        body = {k: v for k, v in body.items() if k not in ("min_weight_version", "wait_for_version")}
        body.pop("return_weight_versions", None)  # vLLM 0.33's; answered here (Versions.tag)
        body.setdefault("return_token_ids", True)  # as the rollout's own face does: choices carry token_ids
        if spans:
            body["return_token_ids"] = True  # the spans count the choices' token_ids
        try:
            parsed = model.model_validate(body)
        except ValidationError as error:
            raise HttpError(400, f"invalid request: {error}", "BAD_REQUEST") from None
        per_prompt = model.__name__ == "CompletionRequest"
        versions = Versions(parsed.n or 1, per_prompt=per_prompt, served=self.served if spans else None)
        token = _VERSIONS.set(versions)
        try:
            try:
                result = await create(parsed, request)
            except (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError) as error:
                # What `vllm serve`'s exception handlers answer (a 400 for sampling settings vLLM refuses).
                result = create_error_response(error)
            if isinstance(result, ErrorResponse):
                return JSONResponse(result.model_dump(), status_code=result.error.code)
            if not isinstance(result, AsyncGenerator):
                payload = versions.tag(result.model_dump(), fallback_version)
                return JSONResponse(payload, headers={"x-weight-version": str(payload["weight_version"])})
            # Streaming: the first event comes after admission, so the header can name the version (the
            # lowest admitted so far: a prompt admitted later runs on the same version or a newer one).
            first = await anext(result, None)
        finally:
            _VERSIONS.reset(token)
        return StreamingResponse(
            _tagged(first, result, versions, fallback_version),
            media_type="text/event-stream",
            headers={"x-weight-version": str(versions.lowest(fallback_version))},
        )


async def _tagged(
    first: str | None, events: AsyncGenerator[str], versions: Versions, fallback: int
) -> AsyncIterator[str]:
    """vLLM's SSE events with `weight_version` added to every JSON payload and its choices."""
    try:
        if first is not None:
            yield _tag(first, versions, fallback)
            async for event in events:
                yield _tag(event, versions, fallback)
    finally:
        await events.aclose()  # a client gone early: vLLM aborts the request


def _tag(event: str, versions: Versions, fallback: int) -> str:
    out = []
    for line in event.split("\n"):
        if line.startswith("data: ") and line[6:].lstrip().startswith("{"):
            try:
                payload = json.loads(line[6:])
            except ValueError:
                out.append(line)
                continue
            line = "data: " + json.dumps(versions.tag(payload, fallback))
        out.append(line)
    return "\n".join(out)
