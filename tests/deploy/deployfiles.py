"""Readers for deploy/: YAML manifests, the kustomize subset they use, Dockerfiles and .dockerignore.

Small on purpose: no Docker engine or cluster here, so the tests read the files the way the tools do,
for the features these files use (and test_manifests.py checks the renderer against `kubectl kustomize`
wherever kubectl is installed).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
WORKLOAD_KINDS = {"StatefulSet", "Deployment", "Job", "DaemonSet", "ReplicaSet"}

Doc = dict[str, Any]


# --- Kubernetes manifests ---------------------------------------------------------------------------


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml"})


def doc_id(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def render(components: tuple[str, ...] = ()) -> list[Doc]:
    """`kubectl kustomize` of an overlay with deploy/k8s as its resource and `components` (paths under it)."""
    docs = _render_dir(K8S)
    for component in components:
        _apply_component(K8S / component, docs)
    return docs


def _render_dir(folder: Path) -> list[Doc]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "namespace", "resources", "components"}
    assert not unsupported, f"{folder}: the test renderer does not know {sorted(unsupported)}"
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += _render_dir(path) if path.is_dir() else load_docs(path)
    if namespace := kustomization.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    for component in kustomization.get("components", []):
        _apply_component(folder / component, docs)
    return docs


def _apply_component(folder: Path, docs: list[Doc]) -> None:
    component = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert component["kind"] == "Component", folder
    unsupported = set(component) - {"apiVersion", "kind", "patches"}
    assert not unsupported, f"{folder}: the test renderer does not know {sorted(unsupported)}"
    for patch in component["patches"]:
        target, ops = patch["target"], yaml.safe_load(patch["patch"])
        matched = [doc for doc in docs if _targets(target, doc)]
        assert matched, f"{folder}: patch target {target} matches nothing"
        for doc in matched:
            for op in ops:
                _json_patch(doc, op)


def _targets(target: Doc, doc: Doc) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    return all(target[key] == value for key, value in wanted.items() if key in target)


def _json_patch(doc: Doc, op: Doc) -> None:
    """One RFC 6902 operation (add, replace, remove, test), in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = last if isinstance(node, dict) or last == "-" else int(last)
    if op["op"] == "test":
        assert node[key] == op["value"], f"patch test failed at {op['path']}: {node[key]!r} != {op['value']!r}"
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "replace":
        if isinstance(node, dict):
            assert key in node, f"replace of a missing {op['path']}"
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del node[key]
    else:
        raise AssertionError(f"unsupported patch op {op['op']}")


def pod_spec(doc: Doc) -> Doc | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in WORKLOAD_KINDS else None


def pod_labels(doc: Doc) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def containers(spec: Doc) -> Iterator[Doc]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# --- Dockerfiles --------------------------------------------------------------------------------------

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int
    flags: dict[str, str] = field(default_factory=dict)

    def words(self) -> list[str]:
        """Exec-form (JSON) arguments, or the shell-form ones split as a shell would."""
        return json.loads(self.value) if self.value.startswith("[") else shlex.split(self.value)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for stage in self.stages for i in stage.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions as BuildKit reads them: comments dropped, `\\` continuations joined, flags split off."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments, parser directives, and blank or comment lines inside a continuation
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, value = text.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        assert keyword in INSTRUCTIONS, f"{path}:{number}: unknown instruction {keyword}"
        flags = {}
        while value.startswith("--"):
            flag, _, value = value.partition(" ")
            name, _, flag_value = flag[2:].partition("=")
            flags[name] = flag_value
            value = value.strip()
        instruction = Instruction(keyword, value, number, flags)
        if keyword == "FROM":
            words = value.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), f"{path}:{number}"
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None, []))
        elif not stages:
            assert keyword == "ARG", f"{path}:{number}: only ARG may come before the first FROM"
            name, _, default = value.partition("=")
            global_args[name] = default
        if stages:
            stages[-1].instructions.append(instruction)
    assert stages, f"{path}: no FROM"
    return Dockerfile(path, global_args, stages)


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


# --- .dockerignore ------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line of .dockerignore, in order; Go filepath.Match syntax plus `**`."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exclude, re.compile(regex)))
    return patterns


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (a path from the repo root) out of the build context."""
    parts = Path(relative).as_posix().strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exclude, regex in dockerignore_patterns():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = exclude
    return ignored
