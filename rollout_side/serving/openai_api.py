"""An OpenAI-compatible HTTP face of a rollout, over the same Generation core (and gate) as Generate.

`serve --http-port P` starts it beside the gRPC server. Endpoints: GET /v1/models, POST /v1/completions
(prompt as text or token ids, one or a list), POST /v1/chat/completions (the tokenizer's chat template),
both streamed (server-sent events) or not, with logprobs, n, stop and vLLM's extra sampling fields
(seed, stop_token_ids, ignore_eos); GET /ready (503 until a version is committed, for HTTP readiness
probes) and GET /health (liveness); POST /weight_checker, vLLM's RL server's digests of the installed
weights (weight_checker.py).

What the rollout adds to the OpenAI shapes: every response carries `weight_version` (top-level integer,
the lowest of its choices') and an `x-weight-version` header; every choice its own `weight_version`, its
`token_ids` (and `token_weight_versions` when the swap policy continue made it span versions); requests
may carry `min_weight_version` and `wait_for_version`. vLLM's RL conventions work as in `vllm serve`:
`return_token_ids` (choices carry `prompt_token_ids` too), `return_tokens_as_token_ids` (logprobs' tokens
as "token_id:<id>"), `return_weight_versions` (vLLM 0.33: each choice's `weight_versions`, spans
[{"version", "start", "end"}] of its tokens), and the sampling extras top_k, min_p, repetition_penalty.
Before the first commit every generation endpoint answers 503 with an OpenAI-style error body
({"error": {"message", "type", "param", "code"}}, code = the weightsync Reason) and `Retry-After`.
When the rollout has a Generate token (--generate-token-file) every /v1 endpoint wants it as
`Authorization: Bearer <token>`, which is how the `openai` client sends its api_key.

Built on starlette and uvicorn; the same code serves both engines. The limits every request passes
before any work live in rollout_side/serving/openai_limits.py (and the connection's in the server here);
request parsing and the response shapes in rollout_side/serving/openai_schema.py; the routes, the server
and streaming here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rollout_side.engines.base import Completion
from rollout_side.engines.installed import Verification
from rollout_side.serving import weight_checker
from rollout_side.serving.generation import Generation, GenerationRequest, interleave
from rollout_side.serving.openai_limits import (
    check_chat,
    check_completion,
    check_model,
    check_weight_checker,
    read_json,
)
from rollout_side.serving.openai_schema import (
    RETRY_AFTER_SECONDS,
    Conventions,
    HttpError,
    _chat_logprobs,
    _completion_logprobs,
    _events,
    _extras,
    _flat_content,
    _int,
    _prompts,
    _request,
    _usage_numbers,
    _with_prompt,
    bad,
)
from rollout_side.serving.openai_schema import (
    _cut as _cut,  # re-exported: tests/unit/test_rl_shapes.py imports it from here
)
from rollout_side.serving.vllm_openai import ChatParsers
from rollout_side.transport.auth import ServerSecurity
from weightsync.errors import WeightSyncError
from weightsync.logs import shown

__all__ = ["HttpServer", "create_app", "start_http"]

logger = logging.getLogger(__name__)

# Reads back the installed weights and holds them to the committed version (Receiver.read_back).
ReadBack = Callable[[], Awaitable[Verification]]


class OpenAIFace:
    """The endpoints, over one Generation core; `model` is the id /v1/models lists and requests may name."""

    def __init__(
        self,
        generation: Generation,
        *,
        model: str,
        generate_token: str | None = None,
        vllm_serving: bool = True,
        parsers: ChatParsers | None = None,
        read_back: ReadBack | None = None,
    ) -> None:
        self.generation = generation
        self._read_back = read_back
        self.parsers = parsers
        self.engine = generation.engine
        self.model = model
        self._token = generate_token.encode() if generate_token else None
        self._tokenizer: Any = None
        # Loading the tokenizer, chat templates and counting prompt tokens run here, off the event loop
        # (which gRPC shares); one thread, as a Hugging Face tokenizer is not safe to call from several.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openai-tokenize")
        self._vllm: Any = None  # VllmOpenAI on the vLLM engine: vLLM's own serving layer answers
        self._vllm_serving = self.engine.name == "vllm" and vllm_serving

    async def _through_vllm(self, request: Request, body: dict[str, Any], *, chat: bool) -> Response | None:
        """On the vLLM engine, answers through vLLM's OpenAI serving layer behind the rollout's gate."""
        if not self._vllm_serving:
            return None
        await self.generation.gate.admit(
            _int(body, "min_weight_version", 0) or 0, wait=bool(body.get("wait_for_version")), timeout=None
        )
        if self._vllm is None:
            from rollout_side.serving.vllm_openai import VllmOpenAI

            self._vllm = VllmOpenAI(self.engine, self.model, self.generation.gate.served, self.parsers)  # type: ignore[arg-type]
        serve = self._vllm.chat_completions if chat else self._vllm.completions
        response: Response = await serve(body, request, self.engine.weight_version)
        return response

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.engine.model_dir)
        return self._tokenizer

    async def _off_loop(self, work: Callable[[], Any]) -> Any:
        """`work` on the tokenizer's thread (which loads the tokenizer first, the first time)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work)

    async def _checked(self, request: Request, *, chat: bool) -> dict[str, Any]:
        """The request's body once every limit before work passed (openai_limits.py), on both engines."""
        self._authorize(request)
        body = await read_json(request)
        if chat:
            check_chat(body, self.engine.max_model_len)
        else:
            check_completion(body)
        check_model(body, self.model)
        return body

    # -- endpoints --------------------------------------------------------------------------------

    async def ready(self, request: Request) -> Response:
        version = self.generation.gate.served.version
        if version == 0:
            return HttpError(
                503, "no weights are committed yet", "NO_WEIGHTS", {"Retry-After": str(RETRY_AFTER_SECONDS)}
            ).response()
        return self._json({"status": "ready"}, version)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "alive", "weight_version": self.generation.gate.served.version})

    async def weight_checker(self, request: Request) -> Response:
        """vLLM's /weight_checker: a fresh read-back of the installed weights, as digests or compared."""
        self._authorize(request)
        body = await read_json(request)
        action = check_weight_checker(body)
        if self._read_back is None:
            raise HttpError(404, "this rollout does not read its weights back over HTTP", "NOT_FOUND")
        verification = await self._read_back()
        return self._json(weight_checker.answer(verification, action, body.get("baseline")), verification.version)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "weightsync", "root": self.model}
        return self._json({"object": "list", "data": [card]}, self.generation.gate.served.version)

    async def completions(self, request: Request) -> Response:
        body = await self._checked(request, chat=False)
        if (answer := await self._through_vllm(request, body, chat=False)) is not None:
            return answer
        prompts = _prompts(body.get("prompt"))
        if body.get("echo") or body.get("suffix") or body.get("best_of", 1) not in (1, None):
            raise bad("echo, suffix and best_of are not supported")
        logprobs = _int(body, "logprobs", None)
        base = _request(
            body, self.generation.max_tokens_limit, logprobs=logprobs is not None, top_logprobs=logprobs or 0
        )
        requests = [_with_prompt(base, prompt) for prompt in prompts]
        await self._off_loop(lambda: self.tokenizer)
        conventions = Conventions.of(body)
        if body.get("stream"):
            return await self._stream(request, requests, body, chat=False)
        groups = await self._run(request, requests)
        token_text = self._token_text_as(conventions)
        prompts_ids = await self._prompts_ids(requests, conventions)
        choices = []
        for p, outs in enumerate(groups):
            prompt_ids = prompts_ids[p] if prompts_ids else None
            for i, out in enumerate(outs):
                choice = {
                    "index": p * len(outs) + i,
                    "text": out.text,
                    "logprobs": _completion_logprobs(out, token_text) if logprobs is not None else None,
                    "finish_reason": out.finish_reason,
                }
                choices.append(choice | _extras(out, conventions, prompt_ids))
        usage = _usage_numbers(await self._prompt_tokens(requests), _completion_tokens(groups))
        result = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        return self._json(result | {"model": self.model, "choices": choices, "usage": usage}, _lowest(groups))

    async def chat_completions(self, request: Request) -> Response:
        body = await self._checked(request, chat=True)
        if (answer := await self._through_vllm(request, body, chat=True)) is not None:
            return answer
        messages = [_flat_content(message) for message in body["messages"]]
        add_generation_prompt = body.get("add_generation_prompt", True)
        ids = await self._off_loop(lambda: self._render(messages, add_generation_prompt))
        top = _int(body, "top_logprobs", 0) or 0
        base = _request(
            body,
            self.generation.max_tokens_limit,
            logprobs=bool(body.get("logprobs")),
            top_logprobs=top if body.get("logprobs") else 0,
            max_tokens_field=("max_completion_tokens", "max_tokens"),
        )
        requests = [_with_prompt(base, ids)]
        conventions = Conventions.of(body)
        if body.get("stream"):
            return await self._stream(request, requests, body, chat=True)
        [outs] = await self._run(request, requests)
        token_text = self._token_text_as(conventions)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": {"content": _chat_logprobs(out, token_text)} if base.logprobs else None,
                "finish_reason": out.finish_reason,
            }
            | _extras(out, conventions)
            for i, out in enumerate(outs)
        ]
        usage = _usage_numbers(await self._prompt_tokens(requests), _completion_tokens([outs]))
        result = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time())}
        if conventions.token_ids:  # as vLLM's chat response: the prompt's ids once, top-level
            result["prompt_token_ids"] = list(requests[0].prompt_token_ids)
        return self._json(result | {"model": self.model, "choices": choices, "usage": usage}, _lowest([outs]))

    # -- requests ---------------------------------------------------------------------------------

    async def _run(self, request: Request, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """Runs every prompt's completions; a client that disconnects cancels them (the engines abort)."""
        work = asyncio.ensure_future(asyncio.gather(*(self.generation.generate_n(r) for r in requests)))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=0.5)
                if done:
                    return list(work.result())
                if await request.is_disconnected():
                    work.cancel()
                    raise HttpError(499, "client disconnected", "CANCELLED")
        except WeightSyncError as error:
            raise HttpError.of(error) from None
        finally:
            work.cancel()

    async def _stream(
        self, request: Request, requests: list[GenerationRequest], body: dict[str, Any], *, chat: bool
    ) -> Response:
        """Server-sent events; admission (and its errors) happens before the first byte is sent."""
        n = requests[0].n or 1
        streams = [cast(AsyncGenerator[tuple[int, Completion]], self.generation.generate_stream_n(r)) for r in requests]
        merged = _merge(streams, n)
        try:
            first = await anext(merged)
        except WeightSyncError as error:
            await merged.aclose()
            raise HttpError.of(error) from None
        except StopAsyncIteration:
            raise HttpError(500, "the engine produced nothing", "INTERNAL") from None
        version = first[1].weight_version
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        conventions = Conventions.of(body)
        prompts_ids = await self._prompts_ids(requests, conventions)
        events = _events(
            merged,
            first,
            requests,
            model=self.model,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            token_text=self._token_text_as(conventions),
            count_prompt_tokens=lambda: self._prompt_tokens(requests),
            stream_id=stream_id,
            chat=chat,
            include_usage=include_usage,
            conventions=conventions,
            prompt_ids_of=lambda index: prompts_ids[index // n],
        )
        return StreamingResponse(events, media_type="text/event-stream", headers={"x-weight-version": str(version)})

    # -- shapes -----------------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        """The chat template's token ids for `messages` (on the tokenizer's thread)."""
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True
            )
        except Exception as error:  # noqa: BLE001 - jinja and tokenizer errors alike: the request's fault
            raise bad(f"the chat template cannot render these messages: {shown(str(error), 200)}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    async def _prompt_tokens(self, requests: list[GenerationRequest]) -> int:
        """The usage's prompt tokens; text prompts are counted on the tokenizer's thread."""

        def count(request: GenerationRequest) -> int:
            return len(request.prompt_token_ids) or len(self.tokenizer.encode(request.prompt, add_special_tokens=False))

        if all(r.prompt_token_ids for r in requests):
            return sum(len(r.prompt_token_ids) for r in requests)
        return int(await self._off_loop(lambda: sum(count(r) for r in requests)))

    def _token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def _token_text_as(self, conventions: Conventions) -> Callable[[int], str]:
        """How logprobs name a token: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
        return (lambda token: f"token_id:{token}") if conventions.tokens_as_ids else self._token_text

    async def _prompts_ids(self, requests: list[GenerationRequest], conventions: Conventions) -> list[list[int]]:
        """With return_token_ids, each prompt's token ids as the engine saw them (text tokenized by the
        engine's rule, on the tokenizer's thread); else none."""
        if not conventions.token_ids:
            return []
        return list(
            await self._off_loop(lambda: [list(r.prompt_token_ids) or self.engine.tokenize(r.prompt) for r in requests])
        )

    def _json(self, payload: dict[str, Any], version: int) -> JSONResponse:
        return JSONResponse(payload | {"weight_version": version}, headers={"x-weight-version": str(version)})

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HttpError(401, "authentication required", "UNAUTHENTICATED")
        if not hmac.compare_digest(presented.encode(), self._token):
            raise HttpError(403, "permission denied", "PERMISSION_DENIED")


def create_app(
    generation: Generation,
    *,
    model: str,
    generate_token: str | None = None,
    vllm_serving: bool = True,
    parsers: ChatParsers | None = None,
    read_back: ReadBack | None = None,
) -> Starlette:
    """The app; `vllm_serving` False makes the vLLM engine answer through the rollout's own code too;
    `parsers` are vLLM's tool-call and reasoning parsers for its chat endpoint (the vLLM engine only);
    `read_back` answers /weight_checker (without it, 404)."""
    face = OpenAIFace(
        generation,
        model=model,
        generate_token=generate_token,
        vllm_serving=vllm_serving,
        parsers=parsers,
        read_back=read_back,
    )

    def handle(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                return await endpoint(request)
            except HttpError as error:
                return error.response()
            except WeightSyncError as error:
                return HttpError.of(error).response()
            except Exception:
                logger.exception("HTTP %s failed", request.url.path)
                return HttpError(500, "internal error; see the rollout's log", "INTERNAL").response()

        return handler

    routes = [
        Route("/v1/models", handle(face.models), methods=["GET"]),
        Route("/v1/completions", handle(face.completions), methods=["POST"]),
        Route("/v1/chat/completions", handle(face.chat_completions), methods=["POST"]),
        Route("/ready", handle(face.ready), methods=["GET"]),
        Route("/health", handle(face.health), methods=["GET"]),
        Route("/weight_checker", handle(face.weight_checker), methods=["POST"]),
    ]
    return Starlette(routes=routes)


# Connections held open at once (idle, sending or being answered); a client between requests may stay
# idle this long; a request's headers must arrive within HEADER_SECONDS (a slowloris socket is dropped).
MAX_CONNECTIONS = 1024
KEEP_ALIVE_SECONDS = 5
HEADER_SECONDS = 10.0


def _with_header_deadline() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a deadline on each request's headers, which uvicorn lacks: from the
    connection's start, or from the first byte after a response, they must be complete in HEADER_SECONDS.
    Bytes that start no request (the unread rest of a refused body) close the connection at the deadline too."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol  # httptools' protocol, or h11's: both keep the request's `cycle`

    class HeaderDeadline(base):  # type: ignore[misc]
        _deadline: asyncio.TimerHandle | None = None
        _waiting_on: object = None  # the cycle before the headers awaited: a new one means they came

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_on:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._waiting_on = self.cycle
            self._deadline = asyncio.get_running_loop().call_later(HEADER_SECONDS, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            self.transport.close()

    return HeaderDeadline


class HttpServer:
    """A uvicorn server running on the current event loop, on a socket bound beforehand."""

    def __init__(self, server: Any, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await self._server.main_loop()
        await self._server.shutdown(sockets=[self._sock])

    async def stop(self) -> None:
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 10)
        except (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError):  # two timeout classes on 3.10
            logger.warning("the HTTP server did not stop within 10 s")
        finally:
            self._sock.close()


async def start_http(
    generation: Generation,
    *,
    host: str,
    port: int,
    model: str,
    security: ServerSecurity | None = None,
    vllm_serving: bool = True,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = False,
    reasoning_parser: str | None = None,
    read_back: ReadBack | None = None,
) -> HttpServer:
    """Serves the OpenAI-compatible API on host:port (0: any free port) until `stop()`; OSError if it cannot bind.

    The parser arguments are `vllm serve`'s flags of the same names (vLLM engine only; see vllm_openai.py);
    `read_back` (the rollout's Receiver.read_back) answers /weight_checker.
    """
    import uvicorn

    token = security.generate_token if security else None
    parsers = ChatParsers(
        tool_call_parser=tool_call_parser,
        enable_auto_tool_choice=enable_auto_tool_choice,
        reasoning_parser=reasoning_parser,
    )
    app = create_app(
        generation, model=model, generate_token=token, vllm_serving=vllm_serving, parsers=parsers, read_back=read_back
    )
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # here, so that a busy port is an OSError, not uvicorn's sys.exit
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        http=_with_header_deadline(),
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        limit_concurrency=MAX_CONNECTIONS,  # beyond it uvicorn answers 503 at once
    )
    config.load()
    server = uvicorn.Server(config)
    # startup/main_loop/shutdown, not serve(): serve() takes the process's signals, which the rollout owns.
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    return HttpServer(server, sock)


def _lowest(groups: list[list[Completion]]) -> int:
    """The top-level version: the lowest of the choices' (each choice carries its own)."""
    return min(out.weight_version for outs in groups for out in outs)


def _completion_tokens(groups: list[list[Completion]]) -> int:
    return sum(len(out.token_ids) for outs in groups for out in outs)


async def _merge(
    streams: list[AsyncGenerator[tuple[int, Completion]]], n: int
) -> AsyncGenerator[tuple[int, Completion]]:
    """Several prompts' streams as one; prompt p's completion i becomes choice p * n + i."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield item
        finally:
            await streams[0].aclose()
        return
    async with contextlib.aclosing(interleave(streams)) as pieces:
        async for p, (i, piece) in pieces:
            yield p * n + i, piece
