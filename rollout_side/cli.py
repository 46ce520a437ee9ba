"""`python -m rollout_side serve`: boot an engine and serve WeightSync + Generate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from rollout_side.engines.base import LOGPROBS_MODES, SWAP_POLICIES, Engine
from rollout_side.engines.vllm_prewarm import OWNER_ENV
from rollout_side.transport.auth import ServerSecurity
from weightsync.checkpoint import checkpoint_files
from weightsync.cli import ArgumentParser, bind_problem, fail, port, port_problem, version
from weightsync.errors import WeightSyncError
from weightsync.logs import setup_logging
from weightsync.metrics import serve_metrics
from weightsync.security import add_security_arguments, channel_credentials, load_token, server_credentials

__all__ = ["main"]

logger = logging.getLogger("rollout_side")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m rollout_side",
        description="A weightsync rollout: serves Generate only after a trainer has pushed a complete, "
        "checksummed weight version over WeightSync (or with --weights, from disk).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="boot the engine and serve",
        description="Boots the engine with dummy (random) weights and serves on HOST:PORT. Generate answers "
        "UNAVAILABLE until a trainer commits a version; with --weights, real weights are loaded at boot.",
    )
    serve.add_argument(
        "--model",
        type=Path,
        default=Path("models/tiny"),
        help="Hugging Face model folder: config and tokenizer, weights not needed (default: %(default)s)",
    )
    serve.add_argument(
        "--engine",
        choices=["vllm", "torch"],
        default="vllm",
        help="vllm (batched, the production engine) or torch (light reference engine)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 in containers")
    serve.add_argument("--port", type=port, default=50051, help="TCP port, 1..65535 (default: %(default)s)")
    serve.add_argument(
        "--weights",
        type=Path,
        help="standalone mode: a .safetensors file or folder of them to load at boot, no trainer needed",
    )
    serve.add_argument(
        "--weights-version", type=version, default=1, help="version the --weights are served as, from 1 (default: 1)"
    )
    serve.add_argument("--device", default="cpu", help="torch engine device, e.g. cuda:0")
    serve.add_argument("--max-model-len", type=int, default=512, help="vllm: longest prompt + completion")
    serve.add_argument("--gpu-memory-utilization", type=float, help="vllm: fraction of GPU memory to use")
    serve.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per engine")
    serve.add_argument("--kv-cache-gib", type=float, help="vllm on CPU: KV cache size in GiB")
    serve.add_argument(
        "--idle-timeout", type=float, default=60.0, help="abort an update that sends nothing for this many seconds"
    )
    serve.add_argument(
        "--max-update-seconds", type=float, default=1800.0, help="abort an update not committed within this time"
    )
    serve.add_argument(
        "--reject-nonfinite", action="store_true", help="refuse a version whose weights hold NaN or infinity"
    )
    serve.add_argument(
        "--no-verify-installed",
        action="store_true",
        help="skip reading back the engine's weights after each load (installed-weight verification, on by "
        "default: a load that lost or changed a tensor then serves unnoticed); status --verify still checks",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="on SIGTERM, seconds in-flight calls may take to finish (health says NOT_SERVING first)",
    )
    serve.add_argument(
        "--shared-memory-dir",
        type=Path,
        metavar="DIR",
        help="accept versions from a co-located trainer as files in DIR (a /dev/shm shared with it, or a "
        "memory-backed emptyDir mounted in both containers of a pod) instead of over the socket",
    )
    serve.add_argument("--metrics-port", type=port, help="serve Prometheus metrics on this port (default: off)")
    serve.add_argument(
        "--http-port",
        type=port,
        help="also serve an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, /ready) "
        "on this port, gated like Generate (default: off)",
    )
    serve.add_argument(
        "--swap-policy",
        choices=SWAP_POLICIES,
        default="drain",
        help="requests in flight at a weight swap: drain (wait for them; default), abort (end them, finish_reason "
        '"abort"), continue (go on with the new version, each token tagged with its version; on vllm the HTTP '
        "face's requests drain)",
    )
    serve.add_argument(
        "--logprobs-mode",
        choices=LOGPROBS_MODES,
        default="raw_logprobs",
        help="what logprobs hold, on Generate and the HTTP face, as vLLM's flag: raw_logprobs (the model's own "
        "distribution; default) or processed_logprobs (after repetition penalty, temperature, min_p, top_k, "
        "top_p: the distribution sampled from, what RL's importance weights compare with the trainer's)",
    )
    # vLLM's chat parsers on the HTTP face, named as `vllm serve` names them.
    serve.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='vllm, HTTP face: let the model choose to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    serve.add_argument(
        "--tool-call-parser",
        metavar="NAME",
        help="vllm, HTTP face: vLLM's parser of the model's tool calls, e.g. hermes",
    )
    serve.add_argument(
        "--reasoning-parser",
        metavar="NAME",
        help="vllm, HTTP face: vLLM's parser that separates the model's reasoning from its answer, e.g. qwen3",
    )
    add_security_arguments(serve, server=True)
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    return parser


def make_security(args: argparse.Namespace) -> ServerSecurity:
    """Reads tokens and TLS material once; a missing, unreadable or mismatched file is a one-line start-up error."""
    if (args.tls_cert is None) != (args.tls_key is None):
        fail("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        fail("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
    try:
        return ServerSecurity(
            token=load_token(args.auth_token_file),
            generate_token=load_token(args.generate_token_file, "WEIGHTSYNC_GENERATE_TOKEN", "--generate-token-file"),
            tls=server_credentials(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None,
            # A TLS rollout relays over TLS: it verifies downstream rollouts with --tls-ca (the system's roots
            # without it) and shows its own certificate, which mutual TLS downstream asks for.
            relay=channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_cert else None,
        )
    except (OSError, ValueError) as error:
        fail(error)


def check_model(model: Path) -> None:
    """The model folder has a config and a tokenizer that loads: without one every prompt would fail later."""
    if not (model / "config.json").is_file():
        fail(f"{model}/config.json not found; run `make model` or pass --model DIR")
    tokenizer_json = model / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # noqa: BLE001 (tokenizers raises a bare Exception for a malformed file)
            fail(f"--model {model}: {tokenizer_json.name} does not load ({error})")
    elif not any((model / name).is_file() for name in ("tokenizer.model", "vocab.json", "vocab.txt")):
        fail(
            f"--model {model} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json): "
            "copy the model's tokenizer files into it"
        )


def check_args(args: argparse.Namespace) -> ServerSecurity:
    """Every start-up mistake that can be seen before the engine boots, each a one-line error."""
    check_model(args.model)
    if args.weights is not None:
        try:
            checkpoint_files(args.weights)
        except (OSError, ValueError) as error:
            fail(f"--weights: {error}")
    security = make_security(args)
    problem = port_problem(args.host, args.port)
    if problem:
        fail(problem)
    if args.http_port is not None:
        problem = port_problem(_http_host(args.host), args.http_port, "--http-port")
        if problem:
            fail(problem)
    if args.enable_auto_tool_choice or args.tool_call_parser or args.reasoning_parser:
        if args.engine != "vllm" or args.http_port is None:
            fail("--enable-auto-tool-choice, --tool-call-parser and --reasoning-parser need --engine vllm, --http-port")
        from rollout_side.serving.vllm_openai import ChatParsers, parser_problem

        parsers = ChatParsers(
            tool_call_parser=args.tool_call_parser,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            reasoning_parser=args.reasoning_parser,
        )
        problem = parser_problem(args.model, parsers)
        if problem:
            fail(problem)
    return security


def make_engine(args: argparse.Namespace) -> Engine:
    engine = _engine(args)
    engine.verify_installed = not args.no_verify_installed
    return engine


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "torch":
        from rollout_side.engines.torch_engine import TorchEngine

        return TorchEngine(
            args.model, device=args.device, swap_policy=args.swap_policy, logprobs_mode=args.logprobs_mode
        )
    from rollout_side.engines.vllm_engine import VllmEngine

    return VllmEngine(
        args.model,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_space_gib=args.kv_cache_gib,
        swap_policy=args.swap_policy,
        logprobs_mode=args.logprobs_mode,
    )


async def serve(args: argparse.Namespace) -> None:
    security = check_args(args)  # before the heavy imports: a mistake is reported in a second

    from rollout_side.server import BindError, create_server
    from rollout_side.update.receiver import Receiver

    if args.metrics_port is not None:
        metrics_host = "127.0.0.1" if args.host.startswith("unix:") else args.host
        try:
            serve_metrics(args.metrics_port, metrics_host)
        except OSError as error:
            fail(bind_problem(metrics_host, args.metrics_port, error, "--metrics-port"))
    if security.token is None:
        logger.warning("the weight path is open: anyone who reaches this port can push weights (--auth-token-file)")
    engine = make_engine(args)
    await engine.prepare()
    receiver = Receiver(
        engine,
        idle_timeout=args.idle_timeout,
        max_update_seconds=args.max_update_seconds,
        reject_nonfinite=args.reject_nonfinite,
        shared_memory_dir=args.shared_memory_dir,
    )
    if args.weights is None:
        boot = receiver.boot()  # pushes are received while the engine boots
    else:
        try:
            await receiver.start(args.weights, args.weights_version)
        except (OSError, ValueError, WeightSyncError) as error:
            with contextlib.suppress(Exception):
                await receiver.close()
            fail(f"--weights {args.weights} cannot be served by --model {args.model}: {error}")
    try:
        rollout = await create_server(
            receiver, address=f"{args.host}:{args.port}", model=str(args.model), security=security
        )
    except BindError as error:
        with contextlib.suppress(Exception):
            await receiver.close()
        fail(error)
    http = None
    if args.http_port is not None:
        from rollout_side.serving.openai_api import start_http

        http_host = _http_host(args.host)
        try:
            http = await start_http(
                rollout.generation,
                host=http_host,
                port=args.http_port,
                model=str(args.model),
                security=security,
                tool_call_parser=args.tool_call_parser,
                enable_auto_tool_choice=args.enable_auto_tool_choice,
                reasoning_parser=args.reasoning_parser,
                read_back=rollout.receiver.read_back,
            )
        except OSError as error:
            with contextlib.suppress(Exception):
                await rollout.stop(0)
            fail(bind_problem(http_host, args.http_port, error, "--http-port"))
        logger.info("OpenAI-compatible HTTP API on http://%s:%d/v1", http_host, args.http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.weights is None:
        logger.info("listening on %s:%d while the engine boots: a push is received meanwhile", args.host, rollout.port)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([boot, stopped], return_when=asyncio.FIRST_COMPLETED)
        if boot.done() and (failure := boot.exception()) is not None:
            await rollout.stop(0)
            raise failure
    version = receiver.lifecycle.served.version
    state = f"serving version {version}" if version else "dummy weights, waiting for a push"
    if receiver.lifecycle.committing is not None:
        state = "loading the version pushed while it booted"
    if not stop.is_set():
        logger.info("ready on %s:%d: %s", args.host, rollout.port, state)
    await stop.wait()
    logger.info("shutting down")
    if http is not None:
        await http.stop()
    await rollout.stop(args.shutdown_grace)


def _http_host(host: str) -> str:
    """Where the HTTP API listens: the gRPC host, or loopback when gRPC is on a Unix socket."""
    return "127.0.0.1" if host.startswith("unix:") else host


def main(argv: list[str] | None = None) -> None:
    # A rollout owns its engine's processes; an owner named by whoever started it is not its own.
    os.environ.pop(OWNER_ENV, None)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    asyncio.run(serve(args))
    # Stopped cleanly, files removed: exit without the interpreter's teardown, which collects every object
    # vLLM and torch made (9 of the 12 s a vLLM rollout took to end after SIGTERM, on two cores).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
