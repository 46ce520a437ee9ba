"""The ranks of a sharded trainer for tests: each is a process of a gloo job that pushes collectively.

`run_ranks` spawns `world` ranks of `rank_main` and returns what each wrote: its push results, the
peak growth of its resident memory during the push, and how it ended.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from log_lines import LogLines

from rollout_side.process import free_port
from weightsync.memory import start_with_environ

BF16 = torch.bfloat16


def run_ranks(
    world: int, timeout: float = 150.0, env: Mapping[str, str] | None = None, **job: Any
) -> list[dict[str, Any]]:
    """Runs `world` ranks of the job described by `job` (see `rank_main`), with `env` added to their
    environment from their start (as MALLOC_ARENA_MAX must be); returns each rank's report."""
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    job["master_port"] = free_port()
    context = mp.get_context("spawn")
    procs = [context.Process(target=rank_main, args=(rank, world, job), daemon=True) for rank in range(world)]
    start_with_environ(procs, env)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    reports = []
    for rank, p in enumerate(procs):
        path = out / f"rank{rank}.json"
        report = json.loads(path.read_text()) if path.exists() else {}
        report["exitcode"] = p.exitcode
        reports.append(report)
    return reports


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Samples this process's resident memory every millisecond; `growth` is the peak above the start."""
    me = psutil.Process()
    start = me.memory_info().rss
    seen = {"growth": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen["growth"] = max(seen["growth"], me.memory_info().rss - start)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def rank_main(rank: int, world: int, job: dict[str, Any]) -> None:
    """One rank: join the gloo job, build its state as `job["kind"]` says, push it, write a report.

    kinds: "fsdp" (models/tiny in bf16, fully_shard on every decoder layer and the root, weights from
    job["weights"]), "shard1" (the same weights as DTensors placed Shard(1), 1-D ones replicated, the
    embedding on a 2-D mesh of (world, 1) ranks, placed Shard(0) and replicated),
    "big" (job["big"] tensors of that many bf16 elements each, Shard(0)).
    `job["die_after"]`: this rank exits abruptly after sending that many chunks (on rank job["dying_rank"]);
    with `job["hang_for"]` it first stops for that many seconds. `job["drop"]`: rank 1's state lacks that
    tensor. `job["linger"]`: seconds every rank waits after its pushes, alive, as a rank that carries on
    training would (a rank that exits makes its peers fail at once anyway). `job["delta"]`: the publisher
    keeps a delta base. `job["steps"]`: pushes after the first, each
    {"version", "weights": a file of full weights whose rows each rank copies into its shards first} or
    {"version", "plain": a file rank 0 alone pushes as a plain publisher, the others waiting}.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["master_port"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report: dict[str, Any] = {"rank": rank}
    warnings = LogLines(logging.WARNING)  # the trainer's, for the report
    logging.getLogger("trainer_side").addHandler(warnings)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from trainer_side.publisher import Publisher

        mesh = init_device_mesh("cpu", (world,))
        state = _state(job, mesh)
        if job.get("drop") and rank == 1:
            del state[job["drop"]]
        if job.get("die_after") is not None and rank == job.get("dying_rank", 1):
            _die_after(job["die_after"], job.get("hang_for", 0.0))
        publisher = Publisher(
            job["rollouts"],
            chunk_bytes=job.get("chunk_bytes", 1 << 16),
            timeout=job.get("push_timeout", 30.0),
            progress=False,
            rename=job.get("rename"),
            delta=job.get("delta", False),
        )
        started = time.monotonic()
        with peak_rss() as rss:
            results = publisher.push(state, version=job.get("version", 1))
        report["seconds"] = time.monotonic() - started
        report["rss_growth"] = rss["growth"]
        report["results"] = _plain(results)
        if job.get("then_version") is not None:  # a second push of the same state
            report["then"] = _plain(publisher.push(state, version=job["then_version"]))
        report["steps"] = [_step(publisher, state, step, rank, job) for step in job.get("steps", [])]
        time.sleep(job.get("linger", 0.0))
        publisher.close()
    finally:
        report["warnings"] = warnings.lines
        Path(job["out"], f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _step(publisher: Any, state: dict[str, torch.Tensor], step: Mapping[str, Any], rank: int, job: Any) -> Any:
    """One more push (see `rank_main`); returns its results (rank 0's for a plain push, [] on the others)."""
    from trainer_side.publisher import Publisher

    if step.get("plain"):
        results = []
        if rank == 0:  # the rollout then holds a version the job's delta base is not
            with Publisher(job["rollouts"], collective=False, progress=False) as plain:
                results = _plain(plain.push(torch.load(step["plain"]), version=step["version"]))
        dist.barrier()
        return results
    if step.get("weights"):
        _load_rows(state, torch.load(step["weights"]), job.get("prefix", ""))
    return _plain(publisher.push(state, version=step["version"]))


def _load_rows(state: dict[str, torch.Tensor], full: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Copies each DTensor's rows of `full` into its local shard, in place, as an optimizer step would."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with torch.no_grad():
        for name, tensor in full.items():
            held = state[prefix + name]
            assert isinstance(held, DTensor)
            local = held.to_local()
            _, offset = compute_local_shape_and_global_offset(held.shape, held.device_mesh, held.placements)
            local.copy_(tensor[offset[0] : offset[0] + local.shape[0]])


def _plain(results: Any) -> list[dict[str, Any]]:
    keys = ("address", "ok", "fingerprint", "error", "version", "reason", "delta", "bytes_sent", "held_bytes")
    return [{k: str(v) if k == "reason" else v for k, v in asdict(r).items() if k in keys} for r in results]


def _state(job: Mapping[str, Any], mesh: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if job["kind"] == "big":
        generator = torch.Generator().manual_seed(0)
        full = {f"w{i}": torch.randn(n // 256, 256, generator=generator).to(BF16) for i, n in enumerate(job["big"])}
        return {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    weights = torch.load(job["weights"])
    if job["kind"] == "shard1":
        from torch.distributed.device_mesh import init_device_mesh

        grid = init_device_mesh("cpu", (mesh.size(), 1))
        return {
            k: distribute_tensor(v, grid, [Shard(0), Replicate()])
            if "embed_tokens" in k
            else distribute_tensor(v, mesh, [Shard(1)] if v.dim() == 2 else [Replicate()])
            for k, v in weights.items()
        }
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_config(config, dtype=BF16)
    model.load_state_dict(weights, strict=False)  # lm_head is tied to embed_tokens
    model.tie_weights()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    prefixed = job.get("prefix", "")
    return {prefixed + k: v for k, v in model.state_dict().items()}


def _die_after(chunks: int, hang_for: float = 0.0) -> None:
    """Makes this rank exit abruptly after its first `chunks` chunks, as a killed process does; `hang_for`:
    it stops for that long first, as a stuck rank does (and exits 18 rather than 17)."""
    from trainer_side.sharded import chunks as shard_chunks

    original = shard_chunks.PieceMover.chunks

    def dying(self: Any, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        for i, message in enumerate(original(self, *args, **kwargs)):
            if i == chunks:
                time.sleep(hang_for or 0.2)
                os._exit(18 if hang_for else 17)
            yield message

    shard_chunks.PieceMover.chunks = dying  # type: ignore[method-assign]
