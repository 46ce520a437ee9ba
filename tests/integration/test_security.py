"""The weight path is closed to all but the trainer: bearer tokens, TLS and mutual TLS over real sockets."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout_side.engines.torch_engine import TorchEngine
from rollout_side.server import create_server
from rollout_side.transport.auth import ServerSecurity
from rollout_side.update.receiver import Receiver
from trainer_side.publisher import Publisher
from weightsync import wire
from weightsync.channel import raw_push_chunks
from weightsync.errors import Reason, reason_of
from weightsync.security import channel_credentials, server_credentials
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import ROOT, LoopThread, Rollout

TOKEN = "s3cret-trainer-token"


def _cert(name: str, key, issuer_name, issuer_key, *, ca: bool = False):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA with a server and a client certificate, written as PEM files."""
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightsync test CA")])
    files = {"ca": _cert("weightsync test CA", ca_key, ca_name, ca_key, ca=True)}
    keys = {}
    for who in ("server", "client"):
        keys[who] = ec.generate_private_key(ec.SECP256R1())
        files[who] = _cert(f"weightsync {who}", keys[who], ca_name, ca_key)
    paths = {}
    for name, cert in files.items():
        paths[f"{name}_cert"] = out / f"{name}.pem"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for name, key in keys.items():
        paths[f"{name}_key"] = out / f"{name}.key"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths


def _start(loop: LoopThread, model_dir: Path, security: ServerSecurity) -> tuple[object, int]:
    async def boot():  # type: ignore[no-untyped-def]
        receiver = Receiver(TorchEngine(model_dir))
        await receiver.start()
        return await create_server(receiver, address="127.0.0.1:0", security=security)

    server = loop.run(boot())
    return server, server.port


@pytest.fixture
def secured(loop_thread: LoopThread, model_dir: Path) -> Iterator[Rollout]:
    server, _ = _start(loop_thread, model_dir, ServerSecurity(token=TOKEN))
    rollout = Rollout(loop_thread, server)  # type: ignore[arg-type]
    yield rollout
    rollout.channel.close()
    loop_thread.run(server.stop(grace=0))  # type: ignore[attr-defined]


def _status(rollout: Rollout) -> pb.GetStatusResponse:
    return rollout.weight_sync.GetStatus(
        pb.GetStatusRequest(), timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")]
    )


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, grpc.StatusCode.UNAUTHENTICATED), ("wrong-token", grpc.StatusCode.PERMISSION_DENIED)],
)
def test_push_without_the_right_token_is_refused_and_changes_nothing(secured, trained_state, token, code) -> None:  # type: ignore[no-untyped-def]
    with Publisher([secured.address], progress=False, token=token) as publisher:
        [result] = publisher.push(trained_state, 1)
    assert not result.ok and result.error.startswith(code.name)
    assert "token" not in result.error.lower() or code == grpc.StatusCode.UNAUTHENTICATED
    assert _status(secured).weight_version == 0
    with pytest.raises(grpc.RpcError) as info:
        secured.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health and Generate stay open: probes and clients need no trainer secret.
    health = health_pb2_grpc.HealthStub(secured.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
    with pytest.raises(grpc.RpcError) as info:
        secured.generate.Generate(pb.GenerateRequest(prompt="red"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # open, but nothing committed


def test_status_command_tells_a_refusal_from_an_unreachable_rollout(secured) -> None:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-m", "trainer_side", "status", "--rollouts", f"{secured.address},127.0.0.1:1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=_without_token())
    assert done.returncode == 1, done.stderr
    rows = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()[1:]}
    assert rows == {secured.address: "UNAUTHENTICATED", "127.0.0.1:1": "UNREACHABLE"}, done.stdout


def _without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "WEIGHTSYNC_AUTH_TOKEN"}


def test_push_with_the_token_commits(secured, trained_state) -> None:  # type: ignore[no-untyped-def]
    with Publisher([secured.address], progress=False, token=TOKEN) as publisher:
        [result] = publisher.push(trained_state, 1)
    assert result.ok, result.error
    assert _status(secured).weight_version == 1
    assert secured.generate.Generate(pb.GenerateRequest(prompt="red"), timeout=30).weight_version == 1


def test_generate_can_require_its_own_token(loop_thread, model_dir, trained_state) -> None:  # type: ignore[no-untyped-def]
    server, port = _start(loop_thread, model_dir, ServerSecurity(token=TOKEN, generate_token="reader"))
    try:
        address = f"127.0.0.1:{port}"
        with Publisher([address], progress=False, token=TOKEN) as publisher:
            assert publisher.push(trained_state, 1)[0].ok
        generate = pb_grpc.GenerateStub(grpc.insecure_channel(address))
        with pytest.raises(grpc.RpcError) as info:
            generate.Generate(pb.GenerateRequest(prompt="red"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            generate.Generate(
                pb.GenerateRequest(prompt="red"), timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")]
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, "the trainer's token must not open Generate"
        reply = generate.Generate(
            pb.GenerateRequest(prompt="red"), timeout=30, metadata=[("authorization", "Bearer reader")]
        )
        assert reply.weight_version == 1
    finally:
        loop_thread.run(server.stop(grace=0))  # type: ignore[attr-defined]


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(loop_thread, model_dir, trained_state, pki, mutual: bool) -> None:  # type: ignore[no-untyped-def]
    tls = server_credentials(pki["server_cert"], pki["server_key"], pki["ca_cert"] if mutual else None)
    server, port = _start(loop_thread, model_dir, ServerSecurity(token=TOKEN, tls=tls))
    address = f"127.0.0.1:{port}"
    try:
        plaintext = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
        with pytest.raises(grpc.RpcError) as info:
            plaintext.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        verified_only = channel_credentials(ca=pki["ca_cert"])
        with Publisher([address], progress=False, token=TOKEN, credentials=verified_only, timeout=10) as publisher:
            [result] = publisher.push(trained_state, 1)
        assert result.ok is (not mutual), result.error  # mTLS refuses a client without a certificate
        with_cert = channel_credentials(ca=pki["ca_cert"], cert=pki["client_cert"], key=pki["client_key"])
        with Publisher([address], progress=False, token=TOKEN, credentials=with_cert) as publisher:
            [result] = publisher.push(trained_state, 2)
        assert result.ok, result.error
    finally:
        loop_thread.run(server.stop(grace=0))  # type: ignore[attr-defined]


@pytest.mark.parametrize("relay_tls", [True, False])
def test_relay_under_mutual_tls(loop_thread, model_dir, trained_state, pki, relay_tls: bool) -> None:  # type: ignore[no-untyped-def]
    """A TLS rollout relays over TLS with its own certificate; one that could not reach its downstream
    leaves it to the trainer, which pushes to it directly: every rollout ends on the version either way."""
    tls = server_credentials(pki["server_cert"], pki["server_key"], pki["ca_cert"])
    relay = channel_credentials(ca=pki["ca_cert"], cert=pki["server_cert"], key=pki["server_key"])
    security = ServerSecurity(token=TOKEN, tls=tls, relay=relay if relay_tls else None)
    servers = [_start(loop_thread, model_dir, security) for _ in range(2)]
    addresses = [f"127.0.0.1:{port}" for _, port in servers]
    try:
        credentials = channel_credentials(ca=pki["ca_cert"], cert=pki["client_cert"], key=pki["client_key"])
        with Publisher(addresses, progress=False, token=TOKEN, credentials=credentials, relay_fanout=1) as publisher:
            results = publisher.push(trained_state, 1)
            statuses = publisher.status()
        assert all(r.ok for r in results), [r.line() for r in results]
        assert results[1].relayed_by == (addresses[0] if relay_tls else "")
        assert {s.weight_version for s in statuses.values()} == {1}  # type: ignore[union-attr]
    finally:
        for server, _ in servers:
            loop_thread.run(server.stop(grace=0))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, grpc.StatusCode.UNAUTHENTICATED), ("wrong-token", grpc.StatusCode.PERMISSION_DENIED)],
)
def test_streaming_calls_without_the_right_token_are_refused(
    loop_thread, model_dir, trained_state, token, code
) -> None:  # type: ignore[no-untyped-def]
    """PushChunks (client streaming) and GenerateStream (server streaming) are guarded like unary calls."""
    server, port = _start(loop_thread, model_dir, ServerSecurity(token=TOKEN, generate_token="reader"))
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    trainer = [("authorization", f"Bearer {TOKEN}")]
    caller = [("authorization", f"Bearer {token}")] if token else []
    try:
        with Publisher([address], progress=False, token=TOKEN) as publisher:
            assert publisher.push(trained_state, 1)[0].ok
        # An update the trainer began: chunks from anyone else must not reach it.
        stub = pb_grpc.WeightSyncStub(channel)
        tensors, manifest = raw.prepare(trained_state)
        begin = pb.BeginUpdateRequest(
            version=2,
            manifest=wire.manifest_to_proto(manifest),
            chunk_bytes=raw.CHUNK,
            fingerprint=manifest.fingerprint,
        )
        update_id = stub.BeginUpdate(begin, timeout=30, metadata=trainer).update_id
        with pytest.raises(grpc.RpcError) as info:
            raw_push_chunks(channel)(
                iter(raw.encoded_chunks(update_id, tensors, manifest)), timeout=30, metadata=caller
            )
        assert (info.value.code(), reason_of(info.value)) == (code, Reason[code.name])
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=5, metadata=trainer)
        assert (status.weight_version, status.received_bytes) == (1, 0)

        generate = pb_grpc.GenerateStub(channel)
        request = pb.GenerateStreamRequest(request=pb.GenerateRequest(prompt="red", max_tokens=4))
        with pytest.raises(grpc.RpcError) as info:
            list(generate.GenerateStream(request, timeout=30, metadata=caller))
        assert (info.value.code(), reason_of(info.value)) == (code, Reason[code.name])
        pieces = list(generate.GenerateStream(request, timeout=30, metadata=[("authorization", "Bearer reader")]))
        assert pieces and {p.weight_version for p in pieces} == {1}
    finally:
        channel.close()
        loop_thread.run(server.stop(grace=0))  # type: ignore[attr-defined]
