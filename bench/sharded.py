"""`python -m bench.sharded [--size 1GiB] [--ranks 1,2,4] [--rollouts 1,2] [--runs 3]`: sharded trainers.

N trainer ranks (a gloo job; N = 1 is a plain push) hold a Qwen2-shaped bf16 model (bench/models.py)
as `Shard(0)` DTensors, each rank only its rows, and push it collectively to R real rollout processes
(torch engine). Beside every push, in the same run, the same ranks send the same bytes over raw TCP
(`sendall` from their own rows) to R sink processes each: the raw ceiling with the same number of
senders. Reports the median wall time of each, GB/s of model bytes delivered to every rollout, and each
rank's peak RSS growth during its pushes. Writes bench/results/sharded.json (or `--out FILE`);
`--malloc-arena-max N` starts the ranks with MALLOC_ARENA_MAX=N (docs/sharded.md, memory per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.baselines import _sink_main
from bench.measure import cpu_seconds, machine, page_faults, peak_rss, reset_peak_rss, rss
from bench.models import SIZES, make_model, meta_state
from bench.sync import Rollout
from rollout_side.process import free_port
from weightsync.memory import start_with_environ

RESULTS = Path(__file__).parent / "results" / "sharded.json"
_CTX = mp.get_context("spawn")


def _rank(rank: int, world: int, job: dict[str, Any], out: Any) -> None:
    """One trainer rank: its rows of every tensor, then `runs` x (raw TCP to its sinks, collective push)."""

    from trainer_side.publisher import Publisher
    from weightsync.manifest import tensor_bytes
    from weightsync.memory import keep_freed_memory

    keep_freed_memory()  # as `train --ranks N` does: the figures in docs/sharded.md were measured with it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["master_port"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    meta = meta_state(Path(job["model"]))
    generator = torch.Generator().manual_seed(rank)
    state: dict[str, torch.Tensor] = {}
    mine: list[memoryview] = []
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = init_device_mesh("cpu", (world,))
    for name, t in meta.items():
        if world == 1:
            state[name] = torch.randn(t.shape, generator=generator, dtype=torch.bfloat16)
            mine.append(tensor_bytes(state[name]))
            continue
        shape, _ = compute_local_shape_and_global_offset(t.shape, mesh, [Shard(0)])
        local = torch.randn(shape, generator=generator, dtype=torch.bfloat16)
        mine.append(tensor_bytes(local))
        state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())
    sinks = [socket.create_connection(("127.0.0.1", port)) for port in job["sinks"][rank]]
    publisher = Publisher(job["rollouts"], timeout=300, progress=False)
    pushes, raws, cpu, rollout_cpu, swaps, faults = [], [], [], [], [], []
    before = rss()
    reset_peak_rss()
    for version in range(job["first_version"], job["first_version"] + job["runs"] + 1):  # the first is a warm-up
        dist.barrier()
        started = time.perf_counter()
        _send_all(sinks, mine)
        dist.barrier()
        raws.append(time.perf_counter() - started)
        started, mine_before, faulted = time.perf_counter(), cpu_seconds(), page_faults()
        theirs_before = sum(cpu_seconds(pid) for pid in job["rollout_pids"]) if rank == 0 else 0.0
        results = publisher.push(state, version)
        pushes.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - mine_before)
        faults.append(page_faults() - faulted)
        dist.barrier()  # every rank's push has returned: the rollouts' CPU of this push is all spent
        if rank == 0:
            rollout_cpu.append(sum(cpu_seconds(pid) for pid in job["rollout_pids"]) - theirs_before)
        if not all(r.ok for r in results):
            raise RuntimeError("; ".join(r.line() for r in results if not r.ok))
        swaps.append(max(r.swap_seconds for r in results))
    growth = peak_rss() - before
    out.put((rank, pushes[1:], raws[1:], growth, cpu[1:], rollout_cpu[1:], swaps[1:], faults[1:]))
    publisher.close()
    for s in sinks:
        s.close()
    dist.destroy_process_group()


def _send_all(sinks: list[socket.socket], views: list[memoryview]) -> None:
    import threading

    def send(sock: socket.socket) -> None:
        for view in views:
            sock.sendall(view)
        sock.recv(1)

    threads = [threading.Thread(target=send, args=(s,)) for s in sinks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _rank_bytes(model: Path, ranks: int) -> list[int]:
    """Bytes of each rank's rows (Shard(0) cuts dim 0 as torch.chunk does), tied lm_head left out."""
    out = [0] * ranks
    for t in meta_state(model).values():
        rows, row = t.shape[0], t[0].numel() * 2
        each = -(-rows // ranks)
        for r in range(ranks):
            out[r] += max(0, min(rows, (r + 1) * each) - r * each) * row
    return out


def run(
    model: Path, ranks: int, rollouts: list[Rollout], nbytes: int, runs: int, first_version: int, arenas: int = 0
) -> dict[str, Any]:
    sinks, procs = [], []
    per_rank = _rank_bytes(model, ranks)
    ports: list[list[int]] = []
    for rank in range(ranks):
        ports.append([])
        for _ in rollouts:
            ready: Any = _CTX.Queue()
            p = _CTX.Process(target=_sink_main, args=(per_rank[rank], None, ready), daemon=True)
            p.start()
            sinks.append(p)
            ports[rank].append(ready.get(timeout=120))
    out: Any = _CTX.Queue()
    job = {
        "master_port": free_port(),
        "model": str(model),
        "rollouts": [r.address for r in rollouts],
        "rollout_pids": [r.pid for r in rollouts],
        "sinks": ports,
        "runs": runs,
        "first_version": first_version,
    }
    procs = [_CTX.Process(target=_rank, args=(rank, ranks, job, out)) for rank in range(ranks)]
    start_with_environ(procs, {"MALLOC_ARENA_MAX": str(arenas)} if arenas else None)
    reports = [out.get(timeout=1800) for _ in procs]
    for p in [*procs, *sinks]:
        p.join(30)
        if p.is_alive():
            p.kill()
    pushes = [max(r[1][i] for r in reports) for i in range(runs)]
    raws = [max(r[2][i] for r in reports) for i in range(runs)]
    push, raw = statistics.median(pushes), statistics.median(raws)
    ranked = sorted(reports)
    return {
        "ranks": ranks,
        "rollouts": len(rollouts),
        "push_seconds": pushes,
        "raw_tcp_seconds": raws,
        "push_gbps": nbytes / push / 1e9,
        "raw_tcp_gbps": nbytes / raw / 1e9,
        "ratio": raw / push,
        "rank_peak_rss_growth_mib": [r[3] / 2**20 for r in ranked],
        # CPU seconds of each push: every rank's together, and every rollout's together
        "trainer_cpu_s": [sum(r[4][i] for r in reports) for i in range(runs)],
        "rollout_cpu_s": ranked[0][5],
        "swap_seconds": ranked[0][6],  # the slowest rollout's commit, as rank 0 heard it
        "trainer_page_faults": [sum(r[7][i] for r in reports) for i in range(runs)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB", choices=list(SIZES))
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--rollouts", default="1,2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--malloc-arena-max", type=int, default=0, help="MALLOC_ARENA_MAX for the ranks (0: unset)")
    args = parser.parse_args()
    model = make_model(args.size, Path(tempfile.gettempdir()) / "ws-bench-models")
    from bench.models import model_bytes, random_state

    nbytes = model_bytes(random_state(model))  # tied lm_head left out, as the ranks send it
    rows = []
    version = 1
    for count in [int(x) for x in args.rollouts.split(",")]:
        rollouts = [Rollout(model) for _ in range(count)]
        try:
            for ranks in [int(x) for x in args.ranks.split(",")]:
                row = run(model, ranks, rollouts, nbytes, args.runs, version, args.malloc_arena_max)
                version += args.runs + 1
                rows.append(row)
                print(
                    f"{ranks} rank(s) -> {count} rollout(s): push {row['push_gbps']:.2f} GB/s, raw TCP "
                    f"{row['raw_tcp_gbps']:.2f} GB/s ({row['ratio']:.2f}x), per-rank peak RSS growth "
                    + ", ".join(f"{m:.0f}" for m in row["rank_peak_rss_growth_mib"])
                    + " MiB",
                    flush=True,
                )
        finally:
            for r in rollouts:
                r.stop()
    args.out.parent.mkdir(exist_ok=True)
    report = {"size": args.size, "bytes": nbytes, "machine": machine(), "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
