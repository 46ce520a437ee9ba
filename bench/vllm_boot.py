"""Time to serve real weights: vLLM dummy boot + push, against vLLM booting from the checkpoint on disk.

Both clocks start when the rollout process is launched and stop when it serves the trained weights
(the push is confirmed, or GetStatus reports the standalone version). The trainer's weights are in
its memory already, as in RL. "cold" evicts the checkpoint from the page cache before each boot
(posix_fadvise); "warm" leaves it cached, the most favourable case for loading from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from safetensors.torch import save_file

from bench.models import make_model, model_bytes, random_state
from rollout_side.process import free_port, serve_command
from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["run"]


def _launch(model: Path, log: Path, weights: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = serve_command(model, engine="vllm", port=port, args=["--kv-cache-gib", "0.5"])
    if weights is not None:
        cmd += ["--weights", str(weights)]
    with log.open("a") as sink:
        return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT), f"127.0.0.1:{port}"


def _serving_version(address: str) -> int:
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
    try:
        return int(stub.GetStatus(pb.GetStatusRequest(), timeout=1).weight_version)
    except grpc.RpcError:
        return -1


def _wait(predicate, timeout: float = 600) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("rollout did not come up")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(size: str = "1GiB", runs: int = 3, workdir: Path | None = None) -> dict[str, object]:
    """Measures both paths `runs` times each, interleaved; returns medians, min, max and the ratio."""
    root = Path(workdir or tempfile.mkdtemp(prefix="weightsync-boot-"))
    model = make_model(size, root)
    state = random_state(model)
    checkpoint = root / "checkpoint.safetensors"
    save_file(state, checkpoint)
    log = root / "rollouts.log"
    times: dict[str, list[float]] = {
        "dummy_boot_plus_push": [],
        "dummy_boot_alone": [],
        "disk_boot_cold": [],
        "disk_boot_warm": [],
    }
    for _ in range(runs):
        start = time.perf_counter()
        proc, address = _launch(model, log)
        try:
            _wait(lambda a=address: _serving_version(a) >= 0)
            times["dummy_boot_alone"].append(time.perf_counter() - start)
            with Publisher([address], progress=False) as publisher:
                [result] = publisher.push(state, 1)
            if not result.ok:
                raise RuntimeError(result.error)
            times["dummy_boot_plus_push"].append(time.perf_counter() - start)
        finally:
            _stop(proc)
        for mode in ("cold", "warm"):
            if mode == "cold":
                _evict(checkpoint)
            start = time.perf_counter()
            proc, address = _launch(model, log, weights=checkpoint)
            try:
                _wait(lambda a=address: _serving_version(a) == 1)
                times[f"disk_boot_{mode}"].append(time.perf_counter() - start)
            finally:
                _stop(proc)
    summary = {
        name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": v}
        for name, v in times.items()
    }
    push = summary["dummy_boot_plus_push"]["median_s"]
    return {
        "model": size,
        "model_bytes": model_bytes(state),
        **summary,
        "ratio_disk_cold_over_push": summary["disk_boot_cold"]["median_s"] / push,
        "ratio_disk_warm_over_push": summary["disk_boot_warm"]["median_s"] / push,
    }


def readme_table(result: dict[str, object]) -> str:
    """The README rows for `result`: median (min-max) seconds per path and the ratios."""
    rows = [
        ("dummy boot + push from the trainer's memory", "dummy_boot_plus_push"),
        ("(of which the dummy boot alone)", "dummy_boot_alone"),
        ("boot with the checkpoint from disk, page cache dropped", "disk_boot_cold"),
        ("boot with the checkpoint from disk, page cache warm", "disk_boot_warm"),
    ]
    lines = ["| path | seconds to serving |", "|---|---:|"]
    for label, key in rows:
        if key not in result:
            continue
        v = result[key]
        lines.append(f"| {label} | {v['median_s']:.1f} ({v['min_s']:.1f}-{v['max_s']:.1f}) |")  # type: ignore[index]
    lines.append(
        f"\nModel {result['model_bytes'] / 2**30:.2f} GiB; disk cold / push = "  # type: ignore[operator]
        f"{result['ratio_disk_cold_over_push']:.2f}, disk warm / push = {result['ratio_disk_warm_over_push']:.2f}."
    )
    return "\n".join(lines)


def update_readme(result: dict[str, object], readme: Path = Path("docs/benchmarks.md")) -> None:
    text = readme.read_text()
    begin, end = "<!-- boot:begin -->", "<!-- boot:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{begin}\n{readme_table(result)}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vllm_boot.json"))
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    args = parser.parse_args()
    result = run(args.size, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if not args.no_readme:
        update_readme(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
