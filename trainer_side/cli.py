"""`python -m trainer_side`: push a checkpoint, run the demo trainer, show rollouts' status, or abort an update."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_side.discovery import resolve
from weightsync.cli import ArgumentParser, bind_problem, fail, port, version
from weightsync.logs import setup_logging
from weightsync.security import add_security_arguments, channel_credentials, load_token

if TYPE_CHECKING:
    from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["main"]

# What a rollout accepts by default (its MIN_CHUNK_BYTES and MAX_CHUNK_BYTES).
MIN_CHUNK_MIB, MAX_CHUNK_MIB = 1 / 256, 64.0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m trainer_side",
        description="The trainer side of weightsync: streams bf16 weights to rollout servers, which serve "
        "Generate only once a complete, checksummed version has committed.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    push = sub.add_parser(
        "push",
        help="push a checkpoint to rollouts",
        description="Pushes a safetensors checkpoint (Hugging Face names, any float dtype; bf16 on the wire), or a "
        "PEFT LoRA adapter, as version N. Exits 0 only when every rollout confirmed N with our fingerprint.",
    )
    what = push.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help="a .safetensors file or a folder of them")
    what.add_argument(
        "--adapter",
        type=Path,
        help="a PEFT LoRA adapter folder (adapter_model.safetensors, adapter_config.json): only the adapter travels, "
        "and rollouts serve their base with it merged in (docs/lora.md); needs --base-fingerprint",
    )
    push.add_argument(
        "--base-fingerprint",
        metavar="FP",
        default="",
        help="with --adapter: the fingerprint of the base model the rollouts hold (`status` shows it)",
    )
    push.add_argument("--version", type=version, required=True, help="from 1; must be newer than what rollouts serve")
    _add_rollouts(push)
    push.add_argument(
        "--chunk-mib", type=chunk_mib, default=1.0, help="chunk size on the wire, 1/256..64 (default: %(default)s)"
    )
    push.add_argument(
        "--base",
        type=Path,
        help="the checkpoint the rollouts already hold (e.g. the previous one): rollouts that serve exactly it "
        "get only what changed, bit-identical; the others get the full version",
    )
    push.add_argument(
        "--relay",
        type=int,
        default=0,
        metavar="FANOUT",
        help="send to the first rollout only and let rollouts forward to each other: 1 = a chain, "
        "k = a tree of fanout k (default 0: push to every rollout directly)",
    )
    _add_shared_memory(push)

    train = sub.add_parser(
        "train",
        help="the demo trainer",
        description="Trains the tiny model on a built-in task, pushes after every step and checks that each "
        "rollout's greedy answer equals the trainer's own.",
    )
    _add_rollouts(train)
    train.add_argument("--steps", type=int, default=3)
    train.add_argument(
        "--ranks", type=ranks, default=1, help="run as an FSDP2 job of this many ranks over gloo (docs/sharded.md)"
    )
    train.add_argument("--model", type=Path, default=Path("models/tiny"))
    _add_shared_memory(train)

    status = sub.add_parser("status", help="show each rollout's version, fingerprint and state")
    _add_rollouts(status)
    status.add_argument(
        "--verify",
        action="store_true",
        help="have each rollout read back the weights its engine holds and check them against the trainer's "
        "checksums now; prints the tensors checked and the result, exit 1 on any mismatch",
    )

    abort = sub.add_parser(
        "abort",
        help="drop the update a rollout holds",
        description="Drops the update each rollout holds: one in progress (its trainer then fails) or one "
        "interrupted and held for a resume. The served version is untouched. Authenticated like a push.",
    )
    _add_rollouts(abort)

    for p in (push, train, status, abort):
        add_security_arguments(p, server=False)
        p.add_argument("--metrics-port", type=port, help="serve Prometheus metrics on this port (default: off)")
        p.add_argument("--log-level", default="WARNING")
        p.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    return parser


def chunk_mib(text: str) -> float:
    """argparse type: a chunk size in MiB a rollout takes (4 KiB to 64 MiB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not MIN_CHUNK_MIB <= value <= MAX_CHUNK_MIB:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"chunks are 1/256 (4 KiB) to {MAX_CHUNK_MIB:g} MiB, got {text}")
    return value


def ranks(text: str) -> int:
    """argparse type: how many ranks a job runs, from 1 (0 or fewer would silently run one)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a job runs at least 1 rank, got {text}")
    return value


def rollouts(text: str) -> list[str]:
    """argparse type: --rollouts resolved, every HOST:PORT with a port in 1..65535 (not 99999 mod 65536)."""
    try:
        addresses = resolve(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    for address in addresses:
        if address.startswith("unix:"):
            continue
        host, _, number = address.rpartition(":")
        if not host:
            raise argparse.ArgumentTypeError(f"{address!r} is not HOST:PORT")
        try:
            port(number)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{address!r}: {error}") from None
    return addresses


def _add_rollouts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rollouts",
        required=True,
        type=rollouts,
        help="comma-separated HOST:PORT list (127.0.0.1:50051), or dns:NAME:PORT for every address NAME has "
        "(a Kubernetes headless Service)",
    )


def _add_shared_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-memory",
        type=Path,
        metavar="DIR",
        help="rollouts on this host that read DIR too (started with --shared-memory-dir DIR): write each full "
        "version there once instead of streaming it to each (deltas still stream)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connection(args)  # a bad token or TLS file is a start-up error, before metrics or any work
    if args.metrics_port is not None:
        from weightsync.metrics import serve_metrics

        try:
            serve_metrics(args.metrics_port)
        except OSError as error:
            fail(bind_problem("0.0.0.0", args.metrics_port, error, "--metrics-port"))
    setup_logging(args.log_level, args.log_format)
    from weightsync.memory import keep_freed_memory  # imports torch: not before the mistakes above are caught

    keep_freed_memory()  # this process is ours: keep grpc's freed chunk buffers warm (the publisher does not)
    if args.command == "push":
        return _push(args)
    if args.command == "abort":
        return _abort(args)
    if args.command == "train" and args.ranks > 1:
        from trainer_side.sharded.demo import run_sharded_demo

        return 0 if run_sharded_demo(args.model, args.rollouts, args.steps, args.ranks) else 1
    if args.command == "train":
        from trainer_side.train import run_demo

        ok = run_demo(args.model, args.rollouts, args.steps, shared_memory=args.shared_memory, **connection(args))
        return 0 if ok else 1
    return _status(args)


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """Publisher keyword arguments for the token and TLS flags."""
    try:
        token = load_token(args.auth_token_file)
        tls = args.tls_ca or args.tls_cert
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls else None
    except (OSError, ValueError) as error:
        fail(error)
    return {"token": token, "credentials": credentials}


def _push(args: argparse.Namespace) -> int:
    from trainer_side.publisher import Publisher
    from weightsync.checkpoint import checkpoint_files, load_checkpoint

    if args.adapter is not None:
        return _push_adapter(args)
    if args.base_fingerprint:
        fail("--base-fingerprint goes with --adapter")

    for flag, path in (("--checkpoint", args.checkpoint), ("--base", args.base)):
        try:
            if path is not None:
                checkpoint_files(path)  # headers only: a bad --base fails before the checkpoint loads
        except (OSError, ValueError) as error:
            fail(f"{flag}: {error}")
    try:
        state = load_checkpoint(args.checkpoint)
        base = load_checkpoint(args.base) if args.base else None
    except (OSError, ValueError) as error:
        fail(f"cannot read checkpoint: {error}")
    for flag, tensors in (("--checkpoint", state), ("--base", base or {})):
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():  # left out on the wire, which the rollout would call "missing"
                fail(f"{flag}: tensor {name!r} is {tensor.dtype}: weights must be floating point (bf16 on the wire)")
    chunk_bytes = int(args.chunk_mib * (1 << 20))
    delta = base is not None
    try:
        publisher = Publisher(
            args.rollouts,
            chunk_bytes=chunk_bytes,
            relay_fanout=args.relay,
            delta=delta,
            shared_memory=args.shared_memory,
            **connection(args),
        )
    except ValueError as error:
        fail(error)
    with publisher:
        if base is not None:
            holders = publisher.assume_base(base)
            logging.getLogger(__name__).info("rollouts that hold --base get a delta: %s", ", ".join(holders) or "none")
        results = publisher.push(state, args.version)
    for result in results:
        print(result.line(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if all(r.ok for r in results) else 1


def _push_adapter(args: argparse.Namespace) -> int:
    from trainer_side.publisher import Publisher
    from weightsync.adapter import AdapterConfig, read_adapter_dir

    if not args.base_fingerprint:
        fail("--adapter needs --base-fingerprint: the base model's fingerprint (`status` shows what rollouts hold)")
    if args.base or args.relay or args.shared_memory:
        fail("--adapter goes alone: not with --base, --relay or --shared-memory")
    try:
        state, fields = read_adapter_dir(args.adapter)
        config = AdapterConfig.from_peft(fields, state, args.base_fingerprint)
    except (OSError, ValueError, KeyError) as error:
        fail(f"--adapter: {error}")
    with Publisher(args.rollouts, chunk_bytes=int(args.chunk_mib * (1 << 20)), **connection(args)) as publisher:
        results = publisher.push_adapter(state, config, args.version)
    for result in results:
        print(result.line(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if all(r.ok for r in results) else 1


def _abort(args: argparse.Namespace) -> int:
    from trainer_side.rollout_client import RolloutClient

    ok = True
    for address in args.rollouts:
        client = RolloutClient(
            address, credentials=connection(args)["credentials"], metadata=_metadata(args), timeout=10
        )
        try:
            done, line = client.drop_update(timeout=10)
        finally:
            client.close()
        print(line, file=sys.stdout if done else sys.stderr)
        ok = ok and done
    return 0 if ok else 1


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...] | None:
    token = connection(args)["token"]
    return (("authorization", f"Bearer {token}"),) if token else None


def _status(args: argparse.Namespace) -> int:
    from trainer_side.publisher import Publisher
    from weightsync.v1 import weightsync_pb2 as pb

    with Publisher(args.rollouts, **connection(args)) as publisher:
        rows = publisher.status(verify=args.verify)
    if args.verify:
        return _verified(rows)
    print(f"{'ROLLOUT':24} {'STATE':10} {'VERSION':>7}  FINGERPRINT (BASE, when a LoRA adapter serves)")
    for address, status in rows.items():
        if isinstance(status, str):
            print(f"{address:24} {_unanswered(status):10} {'-':>7}  {status}")
            continue
        state = pb.RolloutState.Name(status.state).removeprefix("ROLLOUT_STATE_")
        base = f" (adapter on base {status.base_fingerprint})" if status.adapter_version else ""
        print(f"{address:24} {state:10} {status.weight_version:>7}  {status.fingerprint or '-'}{base}")
    return 0 if all(not isinstance(s, str) for s in rows.values()) else 1


def _verified(rows: dict[str, pb.GetStatusResponse | str]) -> int:
    """`status --verify`: per rollout, the version, the tensors checked (per worker) and the result."""
    print(f"{'ROLLOUT':24} {'VERSION':>7} {'TENSORS':>8}  RESULT")
    ok = True
    for address, status in rows.items():
        if isinstance(status, str):  # a mismatch is a refusal (INSTALLED_MISMATCH) naming the tensors
            print(f"{address:24} {'-':>7} {'-':>8}  FAILED {status}")
            ok = False
            continue
        v = status.verification
        workers = f" x{v.workers}" if v.workers > 1 else ""
        print(f"{address:24} {v.weight_version:>7} {v.tensors:>8}  verified{workers} in {v.seconds:.3f} s")
    return 0 if ok else 1


def _unanswered(status: str) -> str:
    """What a failed GetStatus means: no answer at all (UNREACHABLE), or a refusal such as UNAUTHENTICATED."""
    code = status.partition(":")[0]  # describe() writes "<status code>: <details>"
    return "UNREACHABLE" if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ERROR") else code
