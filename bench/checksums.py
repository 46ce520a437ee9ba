"""`python -m bench.checksums [--mib N] [--runs R]`: CPU seconds the two checksum kinds cost each side.

The plain kind hashes every byte twice per side: the chunk's xxh3_64 and the tensor's xxh3_128. The
combinable kind (Manifest.piece_bytes = chunk size, weightsync/manifest.py) takes a chunk inside one
tensor as one piece, so its chunk hash is also its piece hash and each byte is hashed once per side.
Measured here without sockets, on one thread, over a Qwen2-like set of bf16 tensors of N MiB:
- trainer: `Outgoing.chunks` (hash, encode) over the whole version, as one push does;
- rollout: per chunk what `Incoming.take_chunk` does (the copy into staging, then xxh3_64 over the
  staged copy, recorded for the combinable kind), then `Verifier.feed` over what arrived.
Writes bench/results/checksums.json with the median of R runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rollout_side.update.staging import Verifier
from trainer_side.outgoing import Outgoing
from weightsync import wire
from weightsync.manifest import tensor_bytes
from weightsync.memory import prefaulted_buffer

CHUNK = 1 << 20
RESULTS = Path(__file__).parent / "results" / "checksums.json"


def model(mib: int) -> dict[str, torch.Tensor]:
    """Layers of a 1024-wide Qwen2-like model (q, k, v, o, gate, up, down, two norms) up to `mib` MiB."""
    out: dict[str, torch.Tensor] = {}
    shapes = [(1024, 1024), (256, 1024), (256, 1024), (1024, 1024), (2816, 1024), (2816, 1024), (1024, 2816)]
    layer, total = 0, 0
    generator = torch.Generator().manual_seed(0)
    while total < mib << 20:
        for i, shape in enumerate(shapes):
            out[f"l{layer}.w{i}"] = torch.randn(shape, generator=generator).to(torch.bfloat16)
            total += out[f"l{layer}.w{i}"].numel() * 2
        out[f"l{layer}.norm1"] = torch.ones(1024, dtype=torch.bfloat16)
        out[f"l{layer}.norm2"] = torch.ones(1024, dtype=torch.bfloat16)
        layer += 1
    return out


def cpu(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def trainer_side(state: dict[str, torch.Tensor], piece_bytes: int) -> float:
    outgoing = Outgoing.streamed(1, list(state.items()), piece_bytes)
    return cpu(lambda: sum(len(m) for m in outgoing.chunks("bench", CHUNK)))


def rollout_side(state: dict[str, torch.Tensor], piece_bytes: int) -> float:
    outgoing = Outgoing.streamed(1, list(state.items()), piece_bytes)
    messages = list(outgoing.chunks("bench", CHUNK))
    manifest = outgoing.manifest
    assert manifest is not None
    staged = prefaulted_buffer(manifest.total_bytes)  # as the rollout's staging is: no page faults counted
    view = tensor_bytes(staged)

    def receive() -> None:
        verifier = Verifier(manifest, view)
        for message in messages:
            chunk = wire.decode_chunk(message)
            start, end = wire.chunk_span(chunk.index, manifest.total_bytes, CHUNK)
            view[start:end] = chunk.data
            assert wire.chunk_checksum(view[start:end]) == chunk.checksum  # over the staged copy
            if verifier.piece_bytes:
                verifier.chunk_digests[start] = (end - start, chunk.checksum)
            verifier.feed(end)
        assert verifier.mismatch is None and verifier.checksums == [e.checksum for e in manifest]

    return cpu(receive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = model(args.mib)
    nbytes = sum(t.numel() * 2 for t in state.values())
    rows = {}
    for side, fn in (("trainer", trainer_side), ("rollout", rollout_side)):
        for kind, g in (("xxh3_128 per tensor", 0), ("combined from chunk hashes", CHUNK)):
            fn(state, g)  # warm
            rows[f"{side}: {kind}"] = statistics.median(fn(state, g) for _ in range(args.runs))
    report = {"bytes": nbytes, "chunk_bytes": CHUNK, "runs": args.runs, "cpu_seconds": rows}
    for name, seconds in rows.items():
        print(f"{name:45s} {seconds:6.3f} CPU s  ({nbytes / seconds / 1e9:5.2f} GB per CPU s)")
    for side in ("trainer", "rollout"):
        before, after = rows[f"{side}: xxh3_128 per tensor"], rows[f"{side}: combined from chunk hashes"]
        print(f"{side}: {before - after:.3f} CPU s saved per {nbytes / 2**20:.0f} MiB ({1 - after / before:.0%})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
