"""Operator mistakes on the command lines (issue 14): one `error: ...` line on stderr, exit status 2, no traceback.

Every mistake runs the real `python -m rollout_side serve` / `python -m trainer_side push` as a subprocess and
must be caught before an engine boots or a connection is tried: each case also checks that its line names the
flag, file or reason, so a case that fails for some other reason (a missing model folder) does not pass.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from safetensors.torch import load_file, save_file

from rollout_side.engines.torch_engine import TorchEngine
from rollout_side.process import free_port, wait_until_up
from rollout_side.server import BindError, create_server
from rollout_side.update.receiver import Receiver
from weightsync.security import load_token

from conftest import ROOT, LoopThread, Rollout

TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Mistake:
    """`args` appended to a valid command line (later flags win); `expect` must appear in the error line."""

    side: str  # "serve", "push" or "train"
    args: tuple[str, ...]
    expect: str
    env: dict[str, str] = field(default_factory=dict)


MISTAKES: dict[str, Mistake] = {}


def serve(name: str, expect: str, *args: str, env: dict[str, str] | None = None) -> None:
    MISTAKES[name] = Mistake("serve", args, expect, env or {})


def push(name: str, expect: str, *args: str, env: dict[str, str] | None = None) -> None:
    MISTAKES[name] = Mistake("push", args, expect, env or {})


# -- rollout_side serve --
serve("serve-port-out-of-range", "--port: 99999 is not a TCP port (1..65535)", "--port", "99999")
serve("serve-port-zero", "--port: 0 is not a TCP port", "--port", "0")
serve("serve-port-held-by-another-program", "port {held} on 127.0.0.1 is already in use", "--port", "{held}")
serve("serve-metrics-port-in-use", "port {held} on 127.0.0.1 is already in use", "--metrics-port", "{held}")
serve("serve-metrics-port-out-of-range", "--metrics-port: 70000 is not a TCP port", "--metrics-port", "70000")
serve("serve-weights-missing", "missing.safetensors does not exist", "--weights", "{dir}/missing.safetensors")
serve(
    "serve-weights-empty", "empty.safetensors is not a valid safetensors file", "--weights", "{dir}/empty.safetensors"
)
serve(
    "serve-weights-corrupt",
    "corrupt.safetensors is not a valid safetensors file",
    "--weights",
    "{dir}/corrupt.safetensors",
)
serve("serve-weights-truncated", "truncated.safetensors is not a valid", "--weights", "{dir}/truncated.safetensors")
serve("serve-weights-no-tensors", "holds no tensors", "--weights", "{dir}/notensors.safetensors")
serve("serve-weights-version-0", "versions start at 1", "--weights", "{dir}/good.safetensors", "--weights-version", "0")
serve("serve-weights-version-negative", "versions start at 1", "--weights-version", "-1")
serve("serve-model-without-tokenizer", "has no tokenizer", "--model", "{dir}/no_tokenizer")
serve("serve-model-broken-tokenizer", "tokenizer.json does not load", "--model", "{dir}/broken_tokenizer")
serve(
    "serve-tls-key-of-another-cert",
    "--tls-key {dir}/b.key is not the private key of --tls-cert {dir}/a.pem",
    "--tls-cert",
    "{dir}/a.pem",
    "--tls-key",
    "{dir}/b.key",
)
serve(
    "serve-tls-cert-not-pem",
    "--tls-cert {dir}/empty.safetensors holds no PEM certificate",
    "--tls-cert",
    "{dir}/empty.safetensors",
    "--tls-key",
    "{dir}/a.key",
)
serve(
    "serve-tls-cert-missing",
    "--tls-cert {dir}/nope.pem: no such file",
    "--tls-cert",
    "{dir}/nope.pem",
    "--tls-key",
    "{dir}/a.key",
)
serve("serve-tls-cert-without-key", "--tls-cert and --tls-key go together", "--tls-cert", "{dir}/a.pem")
serve(
    "serve-env-token-non-ascii",
    "$WEIGHTSYNC_AUTH_TOKEN holds a character gRPC metadata cannot carry",
    env={"WEIGHTSYNC_AUTH_TOKEN": "t\u00f6ken"},
)
serve("serve-env-token-inner-newline", "(U+000A at position 3)", env={"WEIGHTSYNC_AUTH_TOKEN": "abc\ndef\n"})
serve("serve-env-token-blank", "$WEIGHTSYNC_AUTH_TOKEN is blank", env={"WEIGHTSYNC_AUTH_TOKEN": " \n"})
serve(
    "serve-token-file-non-ascii",
    "--auth-token-file {dir}/bad.token holds a character",
    "--auth-token-file",
    "{dir}/bad.token",
)


def train(name: str, expect: str, *args: str) -> None:
    MISTAKES[name] = Mistake("train", args, expect)


def _vllm_http() -> tuple[str, ...]:
    """--engine vllm with an HTTP port of its own: the mistakes run side by side, each test-binding its ports."""
    return ("--engine", "vllm", "--http-port", str(free_port()))


# vLLM's chat parsers (as `vllm serve` takes them): checked before the engine boots; unknown names importing vLLM.
serve(
    "serve-tool-call-parser-unknown",
    "--tool-call-parser 'nope' is not one of vLLM's parsers: ",
    *_vllm_http(),
    "--tool-call-parser",
    "nope",
)
serve(
    "serve-reasoning-parser-unknown",
    "--reasoning-parser 'nope' is not one of vLLM's parsers: ",
    *_vllm_http(),
    "--reasoning-parser",
    "nope",
)
serve(
    "serve-auto-tool-choice-without-parser",
    "--enable-auto-tool-choice needs --tool-call-parser",
    *_vllm_http(),
    "--enable-auto-tool-choice",
)
serve("serve-tool-call-parser-on-torch", "need --engine vllm, --http-port", "--tool-call-parser", "hermes")
# -- trainer_side push --
push(
    "push-checkpoint-missing",
    "--checkpoint: {dir}/missing.safetensors does not exist",
    "--checkpoint",
    "{dir}/missing.safetensors",
)
push(
    "push-checkpoint-empty",
    "empty.safetensors is not a valid safetensors file",
    "--checkpoint",
    "{dir}/empty.safetensors",
)
push(
    "push-checkpoint-corrupt",
    "corrupt.safetensors is not a valid safetensors file",
    "--checkpoint",
    "{dir}/corrupt.safetensors",
)
push("push-checkpoint-int", "tensor 'model.norm.weight' is torch.int32", "--checkpoint", "{dir}/int.safetensors")
push("push-checkpoint-truncated", "truncated.safetensors is not a valid", "--checkpoint", "{dir}/truncated.safetensors")
push("push-base-corrupt", "--base: {dir}/corrupt.safetensors is not a valid", "--base", "{dir}/corrupt.safetensors")
push(
    "push-rollout-port-out-of-range",
    "--rollouts: '127.0.0.1:99999': 99999 is not a TCP port",
    "--rollouts",
    "127.0.0.1:99999",
)
push("push-rollout-without-port", "--rollouts: 'localhost' is not HOST:PORT", "--rollouts", "localhost")
push("push-version-negative", "--version: versions start at 1", "--version", "-3")
push("push-version-zero", "--version: versions start at 1", "--version", "0")
push("push-version-2**64", "--version: versions are 64-bit", "--version", str(1 << 64))
push("push-version-2**53", "--version: versions stay below 2**53", "--version", str(1 << 53))
push("push-chunk-mib-negative", "--chunk-mib: chunks are 1/256 (4 KiB) to 64 MiB, got -1", "--chunk-mib", "-1")
push("push-chunk-mib-zero", "--chunk-mib: chunks are", "--chunk-mib", "0")
push("push-metrics-port-in-use", "port {held} on 0.0.0.0 is already in use", "--metrics-port", "{held}")
push(
    "push-env-token-non-ascii", "$WEIGHTSYNC_AUTH_TOKEN holds a character", env={"WEIGHTSYNC_AUTH_TOKEN": "t\u00f6ken"}
)
push(
    "push-tls-key-of-another-cert",
    "is not the private key of --tls-cert",
    "--tls-cert",
    "{dir}/a.pem",
    "--tls-key",
    "{dir}/b.key",
)

# -- trainer_side train --
train("train-ranks-zero", "--ranks: a job runs at least 1 rank, got 0", "--ranks", "0")
train("train-ranks-negative", "--ranks: a job runs at least 1 rank, got -2", "--ranks", "-2")


def _self_signed(out: Path, name: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (out / f"{name}.key").write_bytes(pem)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """Broken and good inputs: checkpoints, model folders, TLS pairs, a token file."""
    import build_tiny_weights  # scripts/ (on sys.path via conftest): what `make weights` runs

    out = tmp_path_factory.mktemp("mistakes")
    build_tiny_weights.build(model_dir, out / "good.safetensors")
    good = (out / "good.safetensors").read_bytes()
    (out / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (out / "empty.safetensors").write_bytes(b"")
    (out / "corrupt.safetensors").write_bytes(b"this is not a safetensors file\n" * 64)
    save_file({}, out / "notensors.safetensors")
    weights = load_file(out / "good.safetensors")
    save_file({**weights, "model.norm.weight": weights["model.norm.weight"].to(torch.int32)}, out / "int.safetensors")
    for name, tokenizer in (("no_tokenizer", None), ("broken_tokenizer", b"{not json")):
        folder = out / name
        folder.mkdir()
        (folder / "config.json").write_bytes((model_dir / "config.json").read_bytes())
        if tokenizer is not None:
            (folder / "tokenizer.json").write_bytes(tokenizer)
    _self_signed(out, "a")
    _self_signed(out, "b")
    (out / "bad.token").write_text("s3cr\u00e9t\n")
    (out / "good.token").write_text(TOKEN + "\n")
    return out


@pytest.fixture(scope="module")
def held_port() -> Iterator[int]:
    """A port another program listens on: a plain socket, no SO_REUSEPORT."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSYNC_")}
    return {**env, **extra}


def _serve(model_dir: Path, port: int, *extra: str) -> list[str]:
    serve = [sys.executable, "-m", "rollout_side", "serve", "--engine", "torch", "--model", str(model_dir)]
    return [*serve, "--port", str(port), *extra]


def _command(mistake: Mistake, model_dir: Path, files: Path, held: int) -> list[str]:
    """A valid command line (on ports nothing listens on) with the mistake's flags after it.

    The rollout's --device names no device: a mistake not caught before the engine boots ends in the engine's
    traceback instead, and the push's rollout does not listen: one not caught before connecting exits 1.
    """
    if mistake.side == "serve":
        base = _serve(model_dir, free_port(), "--device", "no-such-device")
    elif mistake.side == "push":
        base = [sys.executable, "-m", "trainer_side", "push", "--rollouts", f"127.0.0.1:{free_port()}"]
        base += ["--checkpoint", str(files / "good.safetensors"), "--version", "1"]
    else:  # train: one not caught before the job starts fails to reach its rollout (exit 1)
        base = [sys.executable, "-m", "trainer_side", "train", "--rollouts", f"127.0.0.1:{free_port()}"]
        base += ["--model", str(model_dir), "--steps", "1"]
    return base + [arg.format(dir=files, held=held) for arg in mistake.args]


@pytest.fixture(scope="module")
def outcomes(
    model_dir: Path, files: Path, held_port: int
) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Every mistake's process, run side by side (each is a Python start-up, most of the time spent)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        yield {
            name: pool.submit(
                subprocess.run,
                _command(mistake, model_dir, files, held_port),
                capture_output=True,
                text=True,
                timeout=60,
                env=_env(mistake.env),
                cwd=ROOT,
            )
            for name, mistake in MISTAKES.items()
        }


def assert_one_error_line(result: subprocess.CompletedProcess[str], status: int | None = 2) -> str:
    """Exactly one non-empty stderr line, starting with `error:`, no traceback; returns it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    if status is None:
        assert result.returncode != 0, result.stderr
    else:
        assert result.returncode == status, (result.returncode, result.stderr)
    return lines[0]


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_is_one_error_line_and_status_2(name: str, outcomes, files: Path, held_port: int) -> None:  # type: ignore[no-untyped-def]
    line = assert_one_error_line(outcomes[name].result())
    assert MISTAKES[name].expect.format(dir=files, held=held_port) in line


def test_tokens_from_the_environment_are_stripped_like_a_file_s(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSYNC_AUTH_TOKEN", TOKEN + "\n")
    assert load_token(None) == load_token(files / "good.token") == TOKEN
    monkeypatch.setenv("WEIGHTSYNC_AUTH_TOKEN", "")
    assert load_token(None) is None  # empty: auth off, as before


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """One real `serve --engine torch`, its token from the environment with a trailing newline."""
    port = free_port()
    process = subprocess.Popen(
        _serve(model_dir, port), env=_env({"WEIGHTSYNC_AUTH_TOKEN": TOKEN + "\n"}), cwd=ROOT, stderr=subprocess.DEVNULL
    )
    try:
        wait_until_up(f"127.0.0.1:{port}", timeout=120, process=process)
        yield process, port
    finally:
        process.kill()
        process.wait()


def test_a_second_rollout_on_a_busy_port_exits_with_one_line(served, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    first, port = served
    second = subprocess.run(
        _serve(model_dir, port), capture_output=True, text=True, timeout=120, env=_env({}), cwd=ROOT
    )
    line = assert_one_error_line(second, status=None)
    assert f"port {port} on 127.0.0.1 is already in use" in line
    assert first.poll() is None, "the first rollout must keep serving"


def test_a_push_authenticates_against_a_token_from_the_environment(served, files: Path) -> None:  # type: ignore[no-untyped-def]
    _, port = served
    push = [sys.executable, "-m", "trainer_side", "push", "--rollouts", f"127.0.0.1:{port}", "--version", "1"]
    push += ["--checkpoint", str(files / "good.safetensors"), "--auth-token-file", str(files / "good.token")]
    result = subprocess.run(push, capture_output=True, text=True, timeout=120, env=_env({}), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "version 1 committed" in result.stdout


def test_the_server_itself_refuses_a_port_another_server_listens_on(
    loop_thread: LoopThread, rollout: Rollout, model_dir: Path
) -> None:
    """The race the CLI's probe cannot close: gRPC's own bind must fail (SO_REUSEPORT off), not share the port."""

    async def second() -> None:
        await create_server(Receiver(TorchEngine(model_dir)), address=rollout.address)

    with pytest.raises(BindError, match=f"port {rollout.server.port} on 127.0.0.1 is already in use"):
        loop_thread.run(second())
