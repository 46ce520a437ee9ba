"""deploy/docker/healthcheck.py (the exec probe of components/tls) against real gRPC health servers,
with certificates from deploy/k8s/components/tls/make-certs.sh."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from deployfiles import DOCKER, K8S
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

GENERATE = "weightsync.v1.Generate"


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None or shutil.which("bash") is None:
        pytest.skip("make-certs.sh needs bash and openssl")
    out = tmp_path_factory.mktemp("tls") / "certs"
    script = K8S / "components" / "tls" / "make-certs.sh"
    subprocess.run(["bash", str(script), str(out), "weightsync", "2"], check=True, capture_output=True, timeout=60)
    return out


def _serve(credentials: grpc.ServerCredentials | None) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(GENERATE, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def plaintext_port() -> Iterator[int]:
    yield from _serve(None)


@pytest.fixture(scope="module")
def mtls_port(certs: Path) -> Iterator[int]:
    """A server as the tls component runs the rollout: its certificate, client certificates required."""
    credentials = grpc.ssl_server_credentials(
        [((certs / "rollout.key").read_bytes(), (certs / "rollout.crt").read_bytes())],
        root_certificates=(certs / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    yield from _serve(credentials)


def test_plaintext(healthcheck: ModuleType, plaintext_port: int) -> None:
    addr = ["--addr", f"127.0.0.1:{plaintext_port}"]
    assert healthcheck.main(addr) == 0
    assert healthcheck.main([*addr, "--service", GENERATE]) == 1
    assert healthcheck.main([*addr, "--service", "no.such.Service"]) == 2


def test_unreachable(healthcheck: ModuleType) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    assert healthcheck.main(["--addr", f"127.0.0.1:{port}", "--timeout", "2"]) == 2


def test_rollout_probes_itself_with_its_own_certificate(healthcheck: ModuleType, certs: Path, mtls_port: int) -> None:
    """What the tls component's probes run inside the rollout pod (via 127.0.0.1, in the certificate)."""
    tls = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "rollout.crt")]
    tls += ["--tls-key", str(certs / "rollout.key")]
    assert healthcheck.main(["--addr", f"127.0.0.1:{mtls_port}", *tls]) == 0
    assert healthcheck.main(["--addr", f"127.0.0.1:{mtls_port}", "--service", GENERATE, *tls]) == 1


def test_trainer_certificate_reaches_rollouts_by_their_stable_names(
    healthcheck: ModuleType, certs: Path, mtls_port: int
) -> None:
    tls = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "trainer.crt")]
    tls += ["--tls-key", str(certs / "trainer.key"), "--addr", f"127.0.0.1:{mtls_port}"]
    for name in ("weightsync-rollout-1.weightsync-rollout", "weightsync-rollout-0.weightsync-rollout.weightsync.svc"):
        assert healthcheck.main([*tls, "--server-name", name]) == 0, name
    # Beyond MAX_ROLLOUTS (2 here) the short name is not in the certificate.
    assert healthcheck.main([*tls, "--server-name", "weightsync-rollout-2.weightsync-rollout"]) == 2


def test_mtls_refuses_clients_without_a_certificate(healthcheck: ModuleType, certs: Path, mtls_port: int) -> None:
    addr = ["--addr", f"127.0.0.1:{mtls_port}", "--timeout", "2"]
    assert healthcheck.main([*addr, "--tls-ca", str(certs / "ca.crt")]) == 2
    assert healthcheck.main(addr) == 2
