"""`python -m bench [--quick]`: every figure is the median of N runs after warm-up, with min and max.

Writes bench/results/bench.json and bench/results/bench.png, and the table in docs/benchmarks.md between
the bench markers. Rollouts are real `python -m rollout_side serve --engine torch` processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import baselines, report
from bench.measure import GB, Cpu, MiB, machine, rss, summary
from bench.models import make_model, model_bytes, random_state
from bench.sync import Rollout, SyncRuns, measure_sync
from trainer_side.publisher import DEFAULT_CHUNK_BYTES, DEFAULT_STREAMS
from weightsync.manifest import tensor_bytes
from weightsync.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB only, fan-out to 1 and 2, short sweep")
    parser.add_argument("--runs", type=int, help="measured runs per figure (default 5; at least 5 for the README)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs first (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s")
    keep_freed_memory()  # what a training process opts into (README): the figures are measured with it
    logging.getLogger("trainer_side").setLevel(logging.WARNING)  # one line per push is noise here
    runs = args.runs or (3 if args.quick else 5)
    sizes = ["256MiB"] if args.quick else ["256MiB", "1GiB"]
    fanouts = [1, 2] if args.quick else [1, 2, 4]
    sweep_chunks = [256 << 10, 1 << 20, 4 << 20] if args.quick else [256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
    sweep_streams = [1, 2] if args.quick else [1, 2, 4]

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    results: dict[str, object] = {
        "machine": machine(),
        "config": {
            "runs": runs,
            "warmup": args.warmup,
            "chunk_bytes": DEFAULT_CHUNK_BYTES,
            "streams": DEFAULT_STREAMS,
            "quick": args.quick,
        },
        "models": {},
        "transfer": {},
    }
    results["runtime_rss"] = _runtime_rss()
    logger.info("rollout runtime alone (tiny model): %.0f MiB resident", results["runtime_rss"] / MiB)
    for size in sizes:
        model_dir = make_model(size, work / "models")
        state = random_state(model_dir)
        nbytes = model_bytes(state)
        results["models"][size] = {"bytes": nbytes, "tensors": len(state), "dir": model_dir.name}  # type: ignore[index]
        logger.info("model %s: %.1f MiB in %d tensors", size, nbytes / MiB, len(state))
        results["transfer"][size] = _transfer(model_dir, state, nbytes, runs, args.warmup, work)  # type: ignore[index]
        if size == sizes[0]:
            results["sweep"] = _sweep(model_dir, state, nbytes, runs, sweep_chunks, sweep_streams)
            results["fanout"] = _fanout(model_dir, state, nbytes, runs, args.warmup, fanouts)
            shared = Path(tempfile.mkdtemp(prefix="ws-bench-shm-", dir=_shm_root(work)))
            try:
                results["fanout_shm"] = _fanout(model_dir, state, nbytes, runs, args.warmup, fanouts, shared)
            finally:
                shutil.rmtree(shared, ignore_errors=True)
            results["fanout_model"] = size
        del state
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    report.plot(results, args.out / "bench.png")
    table = report.markdown(results)
    print(table)
    if not args.no_readme:
        report.update_readme(ROOT / "docs" / "benchmarks.md", table)
    logger.info("done in %.0f s: %s", results["seconds"], args.out)
    return 0


def _transfer(
    model_dir: Path, state: dict[str, torch.Tensor], nbytes: int, runs: int, warmup: int, work: Path
) -> dict[str, object]:
    out: dict[str, object] = {}

    def rate(seconds: list[float]) -> dict[str, object]:
        return summary([nbytes / s / GB for s in seconds])

    sink = baselines.SocketSink(nbytes)
    logger.info("weightsync over TCP, paired with raw TCP and with gRPC alone (pre-encoded messages, dropped)")
    rollout = Rollout(model_dir)
    alone = baselines.GrpcAlone([tensor_bytes(t) for t in state.values()], nbytes)
    try:
        tcp_runs = measure_sync(state, [rollout], [sink], runs=runs, warmup=warmup, alone=alone)
    finally:
        rollout.stop()
        alone.close()
    out["raw_tcp"] = rate(tcp_runs.socket_seconds)
    out["weightsync"] = _sync_summary(tcp_runs, nbytes, 1)
    out["grpc_bare"] = rate(tcp_runs.alone_seconds)
    cpu = {
        "raw_tcp": _cpu_summary(tcp_runs.socket_cpu),
        "weightsync": _cpu_summary(tcp_runs.cpu),
        "grpc_bare": _cpu_summary(tcp_runs.alone_cpu),
    }
    sink.close()

    logger.info("weightsync over a Unix socket, paired with a raw Unix socket")
    uds_sink = baselines.SocketSink(nbytes, unix=True)
    rollout = Rollout(model_dir, unix=True)
    try:
        uds_runs = measure_sync(state, [rollout], [uds_sink], runs=runs, warmup=warmup)
    finally:
        rollout.stop()
        uds_sink.close()
    out["raw_uds"] = rate(uds_runs.socket_seconds)
    out["weightsync_uds"] = _sync_summary(uds_runs, nbytes, 1)

    logger.info("weightsync through a shared-memory file (co-located pods), paired with raw TCP")
    shared = Path(tempfile.mkdtemp(prefix="ws-bench-shm-", dir=_shm_root(work)))
    sink = baselines.SocketSink(nbytes)
    rollout = Rollout(model_dir, shared_memory=shared)
    try:
        shm_runs = measure_sync(state, [rollout], [sink], runs=runs, warmup=warmup, shared_memory=shared)
    finally:
        rollout.stop()
        sink.close()
        shutil.rmtree(shared, ignore_errors=True)
    out["weightsync_shm"] = _sync_summary(shm_runs, nbytes, 1)
    cpu["weightsync_shm"] = _cpu_summary(shm_runs.cpu)

    logger.info("gloo")
    out["gloo"] = rate(baselines.gloo_seconds(model_dir, runs, warmup))
    logger.info("naive protobuf gRPC")
    out["grpc_naive"] = rate(baselines.naive_grpc_seconds(model_dir, nbytes, runs, warmup)[0])
    out["cpu"] = cpu
    logger.info("safetensors through /dev/shm")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    out["safetensors_shm"] = rate(baselines.safetensors_seconds(state, shm / work.name, runs, 1, disk=False))
    logger.info("safetensors through disk")
    out["safetensors_disk"] = rate(baselines.safetensors_seconds(state, work / "disk", runs, 1, disk=True))
    return out


def _cpu_summary(cpu: Cpu) -> dict[str, object]:
    """Mean CPU milliseconds per run of each side: /proc counts in 10 ms ticks, so a mean, not a median."""
    return {
        "sender_ms": 1e3 * statistics.mean(cpu.sender),
        "receiver_ms": 1e3 * statistics.mean(cpu.receiver),
        "runs": len(cpu.sender),
        "sender_samples": [round(c, 3) for c in cpu.sender],
        "receiver_samples": [round(c, 3) for c in cpu.receiver],
    }


def _sync_summary(runs: SyncRuns, nbytes: int, rollouts: int) -> dict[str, object]:
    moved = nbytes * rollouts
    gbps = [moved / s / GB for s in runs.seconds]
    socket_gbps = [moved / s / GB for s in runs.socket_seconds]
    ratios = [a / b for a, b in zip(gbps, socket_gbps, strict=True)]
    swap_pct = [100 * w / s for w, s in zip(runs.swap_seconds, runs.seconds, strict=True)]
    bound = 2 * nbytes + 256 * MiB
    peak = max(runs.rollout_peak_rss) if runs.rollout_peak_rss else 0
    return {
        "gbps": summary(gbps),
        "socket_gbps": summary(socket_gbps),
        "ratio": summary(ratios),
        "swap_seconds": summary(runs.swap_seconds),
        "swap_pct": summary(swap_pct),
        "verify_seconds": summary(runs.verify_seconds),
        "verify_pct": summary([100 * v / s for v, s in zip(runs.verify_seconds, runs.seconds, strict=True)]),
        "rollout_peak_rss": peak,
        "rollout_idle_rss": max(runs.rollout_idle_rss) if runs.rollout_idle_rss else 0,
        "rss_bound": bound,
        "trainer_rss_added": runs.trainer_rss_added,
        "cpu": _cpu_summary(runs.cpu) if runs.cpu.sender else {},
    }


def _sweep(
    model_dir: Path,
    state: dict[str, torch.Tensor],
    nbytes: int,
    runs: int,
    chunks: list[int],
    streams: list[int],
) -> list[dict[str, object]]:
    """Chunk size x streams per rollout, one rollout, each with a warm-up push."""
    logger.info("sweep: chunk sizes %s x streams %s", [c >> 10 for c in chunks], streams)
    sink = baselines.SocketSink(nbytes)
    rollout = Rollout(model_dir)
    rows = []
    try:
        measure_sync(state, [rollout], [sink], runs=0, warmup=2)
        for chunk in chunks:
            for n in streams:
                got = measure_sync(state, [rollout], [sink], runs=runs, warmup=1, chunk_bytes=chunk, streams=n)
                row = {"chunk_bytes": chunk, "streams": n, **_sync_summary(got, nbytes, 1)}
                logger.info(
                    "  %5d KiB x %d: %.2f GB/s, %.2fx TCP",
                    chunk >> 10,
                    n,
                    row["gbps"]["median"],  # type: ignore[index]
                    row["ratio"]["median"],  # type: ignore[index]
                )
                rows.append(row)
    finally:
        rollout.stop()
        sink.close()
    return rows


def _fanout(
    model_dir: Path,
    state: dict[str, torch.Tensor],
    nbytes: int,
    runs: int,
    warmup: int,
    counts: list[int],
    shared: Path | None = None,
) -> dict[str, object]:
    """One trainer to N rollouts at once, over TCP or (`shared`) through one shared-memory file."""
    out: dict[str, object] = {}
    for count in counts:
        how = "through a shared-memory file" if shared else ""
        logger.info("fan-out to %d rollout(s) %s, paired with raw TCP to %d receivers", count, how, count)
        sinks = [baselines.SocketSink(nbytes) for _ in range(count)]
        rollouts = []
        try:
            rollouts = [Rollout(model_dir, shared_memory=shared) for _ in range(count)]
            got = measure_sync(state, rollouts, sinks, runs=runs, warmup=warmup, shared_memory=shared)
        finally:
            for r in rollouts:
                r.stop()
            for s in sinks:
                s.close()
        out[str(count)] = _sync_summary(got, nbytes, count)
    return out


def _shm_root(work: Path) -> Path:
    """Where co-located pods would share memory: /dev/shm, or the scratch folder where there is none."""
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else work


def _runtime_rss() -> int:
    """Resident memory of a rollout serving models/tiny: the runtime (torch, transformers, gRPC)."""
    rollout = Rollout(ROOT / "models" / "tiny")
    try:
        return rss(rollout.pid)
    finally:
        rollout.stop()


if __name__ == "__main__":
    sys.exit(main())
