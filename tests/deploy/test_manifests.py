"""deploy/k8s: every manifest against the Kubernetes API schemas (strict), and the checks the design rests on.

Variants are the base (`kubectl apply -k deploy/k8s`) with each combination of its components. Container
args are parsed with the real CLI parsers, so a renamed or removed flag fails here, not in a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from deployfiles import (
    DOCKER,
    K8S,
    KUSTOMIZE_KINDS,
    Doc,
    containers,
    doc_id,
    find,
    load_docs,
    manifest_files,
    parse_dockerfile,
    pod_labels,
    pod_spec,
    render,
    selects,
)

from rollout_side.cli import build_parser as rollout_parser
from trainer_side.cli import build_parser as trainer_parser

# The oldest Kubernetes these manifests support (native sidecars, on by default since 1.29; gRPC probes
# are GA since 1.27) and the newest that kubernetes-validate ships schemas for, pinned.
K8S_VERSIONS = ("1.29.0", "1.37.0")
VARIANTS = {
    "base": (),
    "cpu": ("components/cpu",),
    "tls": ("components/tls",),
    "cpu+tls": ("components/cpu", "components/tls"),
}
GRPC_PORT = 50051
GENERATE = "weightsync.v1.Generate"
ROLLOUT = HEADLESS = "weightsync-rollout"  # the StatefulSet and its headless service share the name
GENERATE_SERVICE, TRAINER = "weightsync-generate", "weightsync-trainer"
HEALTHCHECK = "weightsync-healthcheck"
# Flags that name a file the container must find in a mounted secret.
SECRET_FLAGS = ("--auth-token-file", "--tls-cert", "--tls-key", "--tls-ca")
# Flags of the contract that another change is adding to the CLIs; until then their assertion skips.
PENDING_FLAGS = {*SECRET_FLAGS, "--base"}
EXAMPLES = [doc for path in sorted((K8S / "examples").glob("*.yaml")) for doc in load_docs(path)]


def _healthcheck_parser() -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "rollout_side": rollout_parser,
    "trainer_side": trainer_parser,
    HEALTHCHECK: _healthcheck_parser,
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def docs(variant: str) -> list[Doc]:
    return render(VARIANTS[variant])


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return render()


def rollout_container(docs: list[Doc]) -> Doc:
    spec = pod_spec(find(docs, "StatefulSet", ROLLOUT))
    assert spec is not None
    return next(c for c in spec["containers"] if c["name"] == "rollout")


def workloads(docs: list[Doc]) -> list[Doc]:
    return [doc for doc in docs + EXAMPLES if pod_spec(doc) is not None]


def colocated(workload: Doc) -> bool:
    """A pod that runs its own rollout beside the trainer (examples/colocated-shared-memory.yaml)."""
    images = [c["image"] for c in containers(pod_spec(workload) or {})]
    return workload["kind"] != "StatefulSet" and any(i.startswith("weightsync/rollout") for i in images)


# --- schemas ------------------------------------------------------------------------------------------


def _validate(doc: Doc, version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        caught = error.caught
        path = "/".join(str(p) for p in getattr(caught, "absolute_path", []))
        pytest.fail(f"{where} {doc_id(doc)} at /{path}: {getattr(caught, 'message', caught)} (Kubernetes {version})")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_document_is_valid_kubernetes(path: Path, version: str) -> None:
    documents = load_docs(path)
    assert documents, f"{path} is empty"
    for doc in documents:
        if doc["kind"] in KUSTOMIZE_KINDS:
            assert doc["apiVersion"].startswith("kustomize.config.k8s.io/"), path
            continue
        _validate(doc, version, str(path.relative_to(K8S)))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_variant_is_valid_kubernetes(docs: list[Doc], variant: str, version: str) -> None:
    for doc in docs:
        _validate(doc, version, f"[{variant}]")


def test_kustomization_lists_every_manifest_but_the_templates() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == on_disk
    assert "Secret" not in {d["kind"] for d in render()}, "apply -k would overwrite real secrets with templates"
    components = {str(p.parent.relative_to(K8S)) for p in K8S.glob("components/*/kustomization.yaml")}
    assert components == {c for combo in VARIANTS.values() for c in combo}, "test every component"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: renderer cross-check skipped")
def test_renderer_agrees_with_kubectl_kustomize(docs: list[Doc], variant: str, tmp_path: Path) -> None:
    overlay = {"resources": [os.path.relpath(K8S, tmp_path)]}
    overlay["components"] = [os.path.relpath(K8S / c, tmp_path) for c in VARIANTS[variant]]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = doc_id
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(docs, key=key)


# --- probes, services, discovery ----------------------------------------------------------------------


def test_readiness_is_generate_health_on_the_grpc_port(base: list[Doc]) -> None:
    container = rollout_container(base)
    assert {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["grpc"] == {"port": GRPC_PORT, "service": GENERATE}
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["port"] == GRPC_PORT
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "vLLM may take minutes to boot"


def test_tls_probes_run_the_healthcheck_the_image_installs() -> None:
    container = rollout_container(render(VARIANTS["tls"]))
    installed = {c.words()[-1] for c in parse_dockerfile(DOCKER / "rollout.Dockerfile").all("COPY")}
    readiness = container["readinessProbe"]["exec"]["command"]
    liveness = container["livenessProbe"]["exec"]["command"]
    for command in (readiness, liveness):
        assert any(PurePosixPath(path).name == command[0] for path in installed), f"{command[0]} not in the image"
        assert "--tls-ca" in command and "--tls-cert" in command, "the rollout requires client certificates"
    assert _healthcheck_parser().parse_args(readiness[1:]).service == GENERATE
    assert _healthcheck_parser().parse_args(liveness[1:]).service == ""
    assert container["startupProbe"]["tcpSocket"]["port"] == GRPC_PORT


def test_headless_service_publishes_not_ready_rollouts(docs: list[Doc]) -> None:
    statefulset = find(docs, "StatefulSet", ROLLOUT)
    headless = find(docs, "Service", HEADLESS)
    assert statefulset["spec"]["serviceName"] == HEADLESS, "per-pod DNS names come from spec.serviceName"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True, "rollouts are ready only after the first push"
    assert selects(headless["spec"]["selector"], pod_labels(statefulset))
    assert selects(statefulset["spec"]["selector"]["matchLabels"], pod_labels(statefulset))
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(GRPC_PORT, "grpc")]


def test_generate_service_sends_traffic_to_ready_rollouts_only(docs: list[Doc]) -> None:
    service = find(docs, "Service", GENERATE_SERVICE)
    assert service["spec"].get("clusterIP") != "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert selects(service["spec"]["selector"], pod_labels(find(docs, "StatefulSet", ROLLOUT)))
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(GRPC_PORT, "grpc")]


def test_rollouts_boot_in_parallel(docs: list[Doc]) -> None:
    """OrderedReady would hold rollout-1 until rollout-0 is ready, and rollout-0 waits for a push to all."""
    assert find(docs, "StatefulSet", ROLLOUT)["spec"]["podManagementPolicy"] == "Parallel"


def test_trainers_push_to_every_rollout_by_its_stable_name(docs: list[Doc]) -> None:
    statefulset = find(docs, "StatefulSet", ROLLOUT)
    expected = [f"{ROLLOUT}-{i}.{HEADLESS}:{GRPC_PORT}" for i in range(statefulset["spec"]["replicas"])]
    seen = 0
    for workload in workloads(docs):
        if colocated(workload):
            continue  # pushes to its own rollout: test_colocated_trainer_hands_versions_over_shared_memory
        for container in containers(pod_spec(workload) or {}):
            args = container.get("args", [])
            if "--rollouts" in args:
                assert args[args.index("--rollouts") + 1].split(",") == expected, f"{doc_id(workload)}"
                seen += 1
    assert seen >= 3, "the trainer Job, its wait, and the sidecar example all name the rollouts"


def test_networkpolicy_admits_trainers_to_the_rollouts(docs: list[Doc]) -> None:
    policy = find(docs, "NetworkPolicy", "weightsync-rollout")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(find(docs, "StatefulSet", ROLLOUT)))
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [GRPC_PORT]
    trainers = [find(docs, "Job", TRAINER), *(d for d in EXAMPLES if d["kind"] == "Job" and not colocated(d))]
    for trainer in trainers:
        admitted = any(selects(peer["podSelector"]["matchLabels"], pod_labels(trainer)) for peer in rule["from"])
        assert admitted, f"{doc_id(trainer)} cannot reach the rollouts"


def test_colocated_trainer_hands_versions_over_shared_memory() -> None:
    """Trainer and rollout in one pod: it pushes on loopback, once the rollout listens, through one Memory emptyDir."""
    pods = [w for w in EXAMPLES if colocated(w)]
    assert pods, "examples/colocated-shared-memory.yaml"
    for pod in pods:
        spec = pod_spec(pod) or {}
        (rollout,) = [c for c in spec.get("initContainers", []) if c["image"].startswith("weightsync/rollout")]
        (trainer,) = [c for c in spec["containers"] if c["image"].startswith("weightsync/trainer")]
        assert rollout.get("restartPolicy") == "Always", "a native sidecar: up before the trainer, stopped after it"
        probe = rollout["startupProbe"]["grpc"]
        assert probe.get("service") == "weightsync.v1.WeightSync", "the trainer starts once pushes are accepted"
        served = rollout_parser().parse_args(rollout["args"])
        pushed = trainer_parser().parse_args(trainer["args"])
        assert pushed.rollouts == [f"127.0.0.1:{served.port}"] and probe["port"] == served.port
        assert served.shared_memory_dir is not None and pushed.shared_memory == served.shared_memory_dir
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = [
            next(m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == served.shared_memory_dir)
            for c in (rollout, trainer)
        ]
        assert mounts[0]["name"] == mounts[1]["name"], "both containers must mount the same volume"
        assert not mounts[1].get("readOnly"), "the trainer writes the version file"
        assert volumes[mounts[0]["name"]]["emptyDir"].get("medium") == "Memory", "a tmpfs, not the node's disk"


# --- containers: args, secrets, security -------------------------------------------------------------


def _cli_argv(container: Doc) -> tuple[str, list[str]] | None:
    """(CLI, argv) for a weightsync container: the image's ENTRYPOINT, or a shell wrapper passing "$@" on."""
    image = container["image"]
    if not image.startswith("weightsync/"):
        return None
    cli = "rollout_side" if image.startswith("weightsync/rollout") else "trainer_side"
    args = list(container.get("args", []))
    command = container.get("command")
    if command is None:
        return cli, args
    assert command[:2] in (["/bin/sh", "-c"], ["/bin/bash", "-c"]), f"{container['name']}: unexpected command"
    line = next((ln for ln in command[2].splitlines() if f'-m {cli} "$@"' in ln), None)
    assert line is not None, f'{container["name"]}: the wrapper must run `python3 -m {cli} "$@"`'
    # Flags the wrapper appends after "$@", each with a placeholder value.
    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line.split('"$@"', 1)[1]):
        args += [flag, "1"]
    return cli, args


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {argv} does not parse: {stderr.getvalue().strip()}")


def _known_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and argv and argv[0] in action.choices:
            return set(action.choices[argv[0]]._option_string_actions)
    return set(parser._option_string_actions)


def _without(argv: list[str], flags: set[str]) -> list[str]:
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            out.append(word)
    return out


def _commands(docs: list[Doc]) -> list[tuple[str, str, list[str], Doc]]:
    """(where, CLI, argv, container) for every weightsync command line: containers and exec probes."""
    found = []
    for workload in workloads(docs):
        for container in containers(pod_spec(workload) or {}):
            where = f"{doc_id(workload)}/{container['name']}"
            if cli_argv := _cli_argv(container):
                found.append((where, *cli_argv, container))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command")
                if command:
                    assert command[0] == HEALTHCHECK, f"{where} {probe}: {command[0]}"
                    found.append((f"{where} {probe}", HEALTHCHECK, command[1:], container))
    return found


def test_container_args_parse_with_the_real_clis(docs: list[Doc], variant: str) -> None:
    """Everything but the pending flags must parse now; the pending flags too, once the CLIs have them."""
    commands = _commands(docs)
    assert {cli for _, cli, _, _ in commands} >= {"rollout_side", "trainer_side"}
    missing: dict[str, set[str]] = {}
    for where, cli, argv, container in commands:
        parser = PARSERS[cli]()
        absent = {w for w in argv if w in PENDING_FLAGS} - _known_flags(parser, argv)
        parsed = _parse(parser, _without(argv, absent), where)
        if cli == "rollout_side":
            assert (parsed.host, parsed.port) == ("0.0.0.0", GRPC_PORT), where
            assert parsed.port in [p["containerPort"] for p in container["ports"]]
        if absent:
            missing.setdefault(cli, set()).update(absent)
        else:
            _parse(parser, argv, where)
    if missing:
        pending = "; ".join(f"{cli}: {' '.join(sorted(flags))}" for cli, flags in sorted(missing.items()))
        pytest.skip(f"[{variant}] the rest of every command line parses; not in the CLIs yet: {pending}")


def test_secret_files_are_mounted_where_the_args_say(docs: list[Doc]) -> None:
    templates = {d["metadata"]["name"]: d for d in load_docs(K8S / "secrets.example.yaml")}
    checked = 0
    for where, _, argv, container in _commands(docs):
        spec = next(pod_spec(w) for w in workloads(docs) if any(c is container for c in containers(pod_spec(w))))
        volumes = {v["name"]: v for v in spec["volumes"]}
        for flag in SECRET_FLAGS:
            if flag not in argv:
                continue
            path = PurePosixPath(argv[argv.index(flag) + 1])
            mounts = [m for m in container.get("volumeMounts", []) if PurePosixPath(m["mountPath"]) == path.parent]
            assert len(mounts) == 1, f"{where}: {flag} {path}: nothing mounted at {path.parent}"
            assert mounts[0].get("readOnly") is True, f"{where}: {path.parent} must be mounted read-only"
            secret = volumes[mounts[0]["name"]].get("secret")
            assert secret, f"{where}: {path.parent} is not a secret volume"
            keys = [item["key"] for item in secret["items"] if item["path"] == path.name]
            assert keys, f"{where}: secret {secret['secretName']} puts no file at {path}"
            template = templates.get(secret["secretName"])
            assert template, f"{where}: secret {secret['secretName']} has no template in secrets.example.yaml"
            assert keys[0] in template.get("stringData", template.get("data", {})), f"{where}: key {keys[0]}"
            assert secret["defaultMode"] & 0o040 and spec["securityContext"]["fsGroup"], "readable as non-root"
            checked += 1
    assert checked >= 3, "the rollout's, the trainer's and its wait's token at least"


def test_pods_run_as_the_images_non_root_user(docs: list[Doc]) -> None:
    uids = set()
    for side in ("rollout", "trainer"):
        users = parse_dockerfile(DOCKER / f"{side}.Dockerfile").all("USER")
        uids.add(int(users[-1].value.split(":")[0]))
    (uid,) = uids
    for workload in workloads(docs):
        spec = pod_spec(workload) or {}
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == uid, doc_id(workload)
        assert spec.get("automountServiceAccountToken") is False, f"{doc_id(workload)} needs no API access"
        for container in containers(spec):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
            if container["image"].startswith("weightsync/"):
                assert security["readOnlyRootFilesystem"] is True, f"{doc_id(workload)}/{container['name']}"


def test_images_are_the_ones_the_dockerfiles_build(docs: list[Doc]) -> None:
    built = {}
    for side in ("rollout", "trainer"):
        runs = parse_dockerfile(DOCKER / f"{side}.Dockerfile").all("RUN")
        built[side] = " ".join(r.value for r in runs)
    for where, cli, argv, container in _commands(docs):
        if cli == HEALTHCHECK:
            continue
        side = cli.removesuffix("_side")
        assert container["image"].startswith(f"weightsync/{side}:"), where
        if "--model" in argv:
            model = argv[argv.index("--model") + 1]
            assert f"build_tiny_model.py {model}" in built[side], f"{where}: the image has no {model}"
