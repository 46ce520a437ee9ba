"""Time to serve real weights: a dummy-booted vLLM rollout pushed to, against vLLM booting from disk.

Every clock starts when the rollout process is launched and stops when it serves the trained weights
(the push is confirmed, or GetStatus reports the standalone version); then one Generate times the
first token. The rollout joins a running job, the case the dummy boot is for (autoscaling, restarts):
the trainer already pushed the version to its fleet (a torch-engine rollout, before any clock), so it
holds the version with its checksums, and as soon as the newcomer's port answers it adds it and
reconciles, as discovery does (trainer_side/discovery.py); the rollout receives while its engine boots.
Paths, interleaved run by run:

- push: `serve` (uninitialised weights, load format "weightsync") + the reconcile push;
- push_random_dummy: the same with vLLM's random dummy fill (what skipping it saves);
- push_spawn: the same with EngineCore spawned by vLLM, not forked from the pre-warmed server;
- disk_cold / disk_warm: `serve --weights checkpoint` with the checkpoint evicted from the page cache
  (posix_fadvise) / left cached, the most favourable case for loading from disk.

Each phase is timed from the rollout's log lines as they arrive (seconds since launch). CPU seconds
to serving are counted too, for the rollout's processes and for the trainer (this process): the
machine has 2 cores and both paths keep them busy, so every CPU second a push adds is wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
import torch
from safetensors.torch import save_file

from bench.models import make_model, model_bytes, random_state
from rollout_side.process import free_port, serve_command, wait_until_up
from trainer_side.publisher import Publisher
from weightsync.channel import listening
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["run"]

PATHS = ("push", "push_random_dummy", "push_spawn", "disk_cold", "disk_warm")
ENV = {"push_random_dummy": {"WEIGHTSYNC_VLLM_RANDOM_DUMMY": "1"}, "push_spawn": {"WEIGHTSYNC_VLLM_PREWARM": "0"}}
# Phase ends, in boot order: (name, pattern of the log line that ends it).
MARKS = [
    ("listening", r"listening on"),
    ("vllm_imported", r"vLLM imported in"),
    ("engine_process_up", r"Initializing a V1 LLM engine"),
    ("model_constructed", r"Initializing model took"),
    ("engine_ready", r"vLLM up in"),
    ("push_received", r"verified; loading version"),
    ("committed", r"committed version"),
]
# Durations vLLM and the rollout report themselves: (name, pattern with the seconds as group 1).
DURATIONS = [
    ("vllm_import_s", r"vLLM imported in ([\d.]+) s"),
    ("model_construction_s", r"Initializing model took ([\d.]+) seconds"),
    ("weights_from_disk_s", r"Loading weights took ([\d.]+) seconds"),
    ("weights_from_push_at_boot_s", r"loaded version \d+ at boot in ([\d.]+) s"),
    ("waited_for_push_at_boot_s", r"at boot in [\d.]+ s \(after ([\d.]+) s waiting"),
    ("profile_kv_cache_warmup_s", r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
    ("swap_after_boot_s", r"serves version \d+ \(swap ([\d.]+) s\)"),
]


class Launched:
    """A rollout process whose output lines are timestamped (seconds since launch) as they arrive."""

    def __init__(self, model: Path, log: Path, weights: Path | None = None, env: dict[str, str] | None = None):
        port = free_port()
        cmd = serve_command(model, engine="vllm", port=port, args=["--kv-cache-gib", "0.5"])
        if weights is not None:
            cmd += ["--weights", str(weights)]
        self.address = f"127.0.0.1:{port}"
        self.lines: list[tuple[float, str]] = []
        self._log = log
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self._log.open("a") as sink:
            for line in self.proc.stdout:
                self.lines.append((time.perf_counter() - self.started, line))
                sink.write(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the rollout's processes so far (serve, fork server, EngineCore)."""
        total = 0.0
        root = psutil.Process(self.proc.pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reader.join(10)

    def phases(self) -> dict[str, float]:
        """Seconds since launch of each mark's first line, and each reported duration."""
        found: dict[str, float] = {}
        for at, line in self.lines:
            for name, pattern in MARKS:
                if name not in found and re.search(pattern, line):
                    found[name] = at
            for name, pattern in DURATIONS:
                if name not in found and (match := re.search(pattern, line)):
                    found[name] = float(match.group(1))
        return found


def _serves_version_1(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            status = pb_grpc.WeightSyncStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return bool(status.weight_version == 1)


def _wait(predicate, timeout: float = 600) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("rollout did not come up")
        time.sleep(0.02)


def _first_token(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerateStub(channel)
        stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=1), timeout=120)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _one(path: str, model: Path, checkpoint: Path, publisher: Publisher, log: Path) -> dict[str, float]:
    """One launch to serving (and first token) on `path`; returns its phases and totals."""
    if path == "disk_cold":
        _evict(checkpoint)
    disk = path.startswith("disk")
    trainer_cpu = _own_cpu_seconds()
    rollout = Launched(model, log, weights=checkpoint if disk else None, env=ENV.get(path))
    try:
        _wait(lambda: listening(rollout.address))  # a TCP connect: waiting costs the booting rollout no CPU
        if disk:  # it listens once vLLM is up and the checkpoint loaded
            _wait(lambda: _serves_version_1(rollout.address))
        else:
            publisher.set_rollouts([rollout.address], [])  # what discovery does when a rollout joins
            try:
                [result] = publisher.reconcile()
            finally:
                publisher.set_rollouts([], [rollout.address])
            if not result.ok:
                raise RuntimeError(result.error)
        serving = rollout.elapsed()
        cpu = {"rollout_cpu_s": rollout.cpu_seconds(), "trainer_cpu_s": _own_cpu_seconds() - trainer_cpu}
        _first_token(rollout.address)
        first_token = rollout.elapsed()
        time.sleep(0.2)  # the last log lines
        return {**rollout.phases(), "serving": serving, "first_token": first_token, **cpu}
    finally:
        rollout.stop()


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


FRESH_MEMORY_PROBE = """
import sys, time, torch
steps, kept = [], []
for _ in range(int(sys.argv[1])):
    block = torch.empty(1 << 30, dtype=torch.uint8)
    started = time.perf_counter()
    block.fill_(1)
    steps.append(time.perf_counter() - started)
    kept.append(block)  # held, so the next GiB is fresh memory too
print(" ".join(f"{s:.3f}" for s in steps))
"""


def fresh_memory_seconds(gib: int = 10) -> list[float]:
    """Seconds to first touch each successive GiB of fresh memory, in a new process.

    A boot writes several GiB into memory no process had (staging, weights, packed weights, KV cache);
    on this VM that costs far more per GiB after the first few (the host backs guest memory lazily),
    which weighs on whichever path touches more of it.
    """
    out = subprocess.run(
        [sys.executable, "-c", FRESH_MEMORY_PROBE, str(gib)], capture_output=True, text=True, check=True
    )
    return [float(x) for x in out.stdout.split()]


def _trainer_with_version(model: Path, state: dict[str, torch.Tensor], log: Path) -> Publisher:
    """A publisher that has pushed `state` as version 1 to its fleet (one torch-engine rollout, then gone)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    with log.open("a") as sink:
        fleet = subprocess.Popen(serve_command(model, engine="torch", port=port), stdout=sink, stderr=subprocess.STDOUT)
    publisher = Publisher([address], progress=False, delta=True)
    try:
        wait_until_up(address, timeout=300, process=fleet)
        [result] = publisher.push(state, 1)
        if not result.ok:
            raise RuntimeError(result.error)
    finally:
        fleet.terminate()
        fleet.wait(60)
    publisher.set_rollouts([], [address])
    return publisher


def run(size: str = "1GiB", runs: int = 3, workdir: Path | None = None) -> dict[str, object]:
    """Measures every path `runs` times, interleaved; returns each phase's median and the ratios."""
    root = Path(workdir or tempfile.mkdtemp(prefix="weightsync-boot-"))
    model = make_model(size, root)
    state = random_state(model)
    checkpoint = root / f"checkpoint-{size}.safetensors"
    save_file(state, checkpoint)
    log = root / "rollouts.log"
    measured: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
    with _trainer_with_version(model, state, log) as publisher:
        for _ in range(runs):
            for path in PATHS:
                measured[path].append(_one(path, model, checkpoint, publisher, log))
    checkpoint.unlink()
    result: dict[str, object] = {"model": size, "model_bytes": model_bytes(state), "runs": runs}
    for path, samples in measured.items():
        names = [name for name in samples[0] if all(name in s for s in samples)]
        result[path] = {
            "median": {name: statistics.median(s[name] for s in samples) for name in names},
            "serving_s": [s["serving"] for s in samples],
        }
    push = _median(result, "push", "serving")
    result["ratio_push_over_disk_cold"] = push / _median(result, "disk_cold", "serving")
    result["ratio_push_over_disk_warm"] = push / _median(result, "disk_warm", "serving")
    ready = _median(result, "push", "engine_ready")
    result["push_ready_to_serving_over_boot"] = (push - ready) / ready
    result["random_fill_saved_s"] = _median(result, "push_random_dummy", "serving") - push
    result["prewarm_saved_s"] = _median(result, "push_spawn", "serving") - push
    return result


def _median(result: dict[str, object], path: str, name: str) -> float:
    return float(result[path]["median"][name])  # type: ignore[index]


ROWS = [
    ("rollout listening (interpreter, imports, gRPC)", "listening"),
    ("vLLM imported in the rollout", "vllm_imported"),
    ("EngineCore process up (config, spawn, imports)", "engine_process_up"),
    ("model constructed", "model_constructed"),
    ("engine ready (weights, profile, KV cache)", "engine_ready"),
    ("push received and verified", "push_received"),
    ("serving the trained weights", "serving"),
    ("first token", "first_token"),
]
REPORTED = [
    ("vLLM import (s)", "vllm_import_s"),
    ("model construction (s)", "model_construction_s"),
    ("weights from disk (s)", "weights_from_disk_s"),
    ("pushed weights loaded at boot (s)", "weights_from_push_at_boot_s"),
    ("(the loader waited for the push) (s)", "waited_for_push_at_boot_s"),
    ("profile + KV cache + warm-up (s)", "profile_kv_cache_warmup_s"),
    ("swap after boot (s)", "swap_after_boot_s"),
    ("CPU seconds to serving: the rollout's processes", "rollout_cpu_s"),
    ("CPU seconds to serving: the trainer", "trainer_cpu_s"),
]


def readme_table(results: list[dict[str, object]]) -> str:
    """Markdown: per model, seconds since launch at each phase's end per path, then the ratios."""
    out = []
    for result in results:
        gib = result["model_bytes"] / 2**30  # type: ignore[operator]
        out += [
            f"**{result['model']} model ({gib:.2f} GiB), median of {result['runs']} launches**\n",
            "| seconds since launch | " + " | ".join(PATHS) + " |",
            "|---|" + "---:|" * len(PATHS),
        ]
        for label, key in ROWS + REPORTED:
            cells = []
            for path in PATHS:
                value = result[path]["median"].get(key)  # type: ignore[index]
                cells.append("" if value is None else f"{value:.2f}")
            if any(cells):
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append(
            f"\npush / disk cold = {result['ratio_push_over_disk_cold']:.2f}, push / disk warm = "
            f"{result['ratio_push_over_disk_warm']:.2f}; engine ready to serving the push = "
            f"{100 * result['push_ready_to_serving_over_boot']:.1f}% of the boot; to serving, skipping the "  # type: ignore[operator]
            f"random fill saved {result['random_fill_saved_s']:.1f} s and the pre-warmed EngineCore "
            f"{result['prewarm_saved_s']:.1f} s.\n"
        )
        if "fresh_memory_s_per_gib" in result:
            steps = ", ".join(f"{x:.2f}" for x in result["fresh_memory_s_per_gib"])  # type: ignore[attr-defined]
            out.append(f"First touch of fresh memory here, seconds for each successive GiB: {steps}.\n")
    return "\n".join(out)


def plot(results: list[dict[str, object]], out: Path) -> None:
    """One bar per path and model: seconds from launch to serving, split at each phase's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = ["vllm_imported", "engine_process_up", "model_constructed", "engine_ready", "serving"]
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.2 + 0.6 * len(PATHS) * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        for row, path in enumerate(PATHS):
            median = result[path]["median"]  # type: ignore[index]
            start = 0.0
            for mark in sorted((m for m in marks if m in median), key=lambda m: median[m]):
                ax.barh(
                    row,
                    median[mark] - start,
                    left=start,
                    color=f"C{marks.index(mark)}",
                    label=mark if row == 0 else None,
                )
                start = median[mark]
        ax.set_yticks(range(len(PATHS)), PATHS)
        ax.invert_yaxis()
        ax.set_title(f"{result['model']} model: seconds from launch (median of {result['runs']})")
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def update_readme(results: list[dict[str, object]], readme: Path = Path("docs/benchmarks.md")) -> None:
    text = readme.read_text()
    begin, end = "<!-- boot:begin -->", "<!-- boot:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{begin}\n{readme_table(results)}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1GiB", "2GiB"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vllm_boot.json"))
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    args = parser.parse_args()
    results = [run(size, args.runs) for size in args.sizes]
    fresh = fresh_memory_seconds()
    for result in results:
        result["fresh_memory_s_per_gib"] = fresh
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    if not args.no_readme:
        update_readme(results)
    print(readme_table(results))


if __name__ == "__main__":
    main()
