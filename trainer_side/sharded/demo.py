"""The demo trainer as an FSDP2 job: `ranks` processes over gloo, each pushing its own shards after every step.

What `python -m trainer_side train --ranks N` (and `make run-trainer RANKS=N`) runs: the tiny model with
`fully_shard` on every decoder layer and the root, trained on the demo task, and after every step every
rank calls `publisher.push(model.state_dict(), version)` (trainer_side/sharded/collective.py). Rank 0 then checks
each rollout's greedy answer against the trainer's own weights (gathered for that check alone: the
tiny model fits anywhere; a real job would not gather).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_sharded_demo"]


def run_sharded_demo(
    model_dir: Path, rollouts: list[str], steps: int, ranks: int, iterations_per_step: int = 20
) -> bool:
    """Spawns `ranks` ranks of the demo; True if every push committed and every answer matched."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    # One malloc arena per rank, not one per gRPC thread: keeps each rank within its stated memory bound
    # (docs/sharded.md). glibc reads it at process start, so it is set for the spawned ranks.
    os.environ.setdefault("MALLOC_ARENA_MAX", "1")
    ok = context.Queue()
    procs = [
        context.Process(target=_rank, args=(rank, ranks, port, model_dir, rollouts, steps, iterations_per_step, ok))
        for rank in range(ranks)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return all(p.exitcode == 0 for p in procs) and not ok.empty() and bool(ok.get())


def _rank(
    rank: int,
    world: int,
    port: int,
    model_dir: Path,
    rollouts: list[str],
    steps: int,
    iterations: int,
    ok: mp.Queue,  # type: ignore[type-arg]
) -> None:
    import grpc
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    from trainer_side.publisher import Publisher
    from trainer_side.train import PROMPT, greedy, new_model, train_iterations
    from weightsync.memory import keep_freed_memory
    from weightsync.v1 import weightsync_pb2 as pb
    from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

    keep_freed_memory()  # a rank is a process of ours: the allocator setting the publisher leaves to its owner
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = new_model(model_dir)  # the same seed on every rank: the same initial weights
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    all_ok = True
    with Publisher(rollouts, progress=False) as publisher:
        start = 1 + max((s.weight_version for s in publisher.status().values() if not isinstance(s, str)), default=0)
        for version in range(start, start + steps):
            loss = train_iterations(model, tokenizer, iterations)
            state = model.state_dict()
            results = publisher.push(state, version)  # every rank: its own shards
            full = {k: v.full_tensor().to(torch.bfloat16) for k, v in state.items()}  # for the check below only
            if rank:
                continue
            reference = new_model(model_dir)
            reference.load_state_dict({k: v.float() for k, v in full.items()})
            expected = greedy(reference.to(torch.bfloat16), prompt_ids, 12)
            for result in results:
                if not result.ok:
                    print(f"step {version}: {result.line()}")
                    all_ok = False
                    continue
                with grpc.insecure_channel(result.address) as channel:
                    answer = pb_grpc.GenerateStub(channel).Generate(
                        pb.GenerateRequest(prompt=PROMPT, max_tokens=12, min_weight_version=version), timeout=60
                    )
                same = list(answer.token_ids) == expected
                all_ok &= same
                print(
                    f"step {version}  loss {loss:5.2f}  {world} ranks  sync {result.seconds * 1000:6.1f} ms  "
                    f"rollout v{answer.weight_version}: {PROMPT!r} -> {answer.text!r}  "
                    f"{'== trainer' if same else '!= trainer ' + repr(tokenizer.decode(expected))}"
                )
    if rank == 0:
        ok.put(all_ok)
    dist.destroy_process_group()
