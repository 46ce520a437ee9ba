"""`make demo`: the whole loop on one machine, dummy boot to verified answers, in under a minute or two."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from rollout_side.process import RolloutProcess
from trainer_side.train import run_demo
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "torch"])
    parser.add_argument("--model", type=Path, default=Path("models/tiny"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    log = Path(tempfile.gettempdir()) / f"weightsync-demo-rollout-{os.getpid()}.log"
    print(f"1. starting a rollout ({args.engine} engine, dummy weights); its log: {log}")
    started = time.monotonic()
    rollout = RolloutProcess(args.model, engine=args.engine, log=log)
    address = rollout.address
    try:
        print(f"   accepting pushes on {address} after {time.monotonic() - started:.1f} s; its engine boots meanwhile")
        times = _watch(address, started)
        print("2. Generate before any push:")
        try:
            pb_grpc.GenerateStub(grpc.insecure_channel(address)).Generate(
                pb.GenerateRequest(prompt="the cat sat"), timeout=30
            )
            print("   answered?! a rollout must not serve dummy weights")
            return 1
        except grpc.RpcError as error:
            print(f"   refused as it should be: {error.code().name}: {error.details()}")
        print(f"3. training {args.steps} steps, pushing after each, comparing the rollout's answer with ours:")
        ok = run_demo(args.model, [address], args.steps)
        for what, seconds in times.items():
            print(f"   {what} {seconds:.1f} s after launch")
        print("4. done:", "every push verified, every answer equal to the trainer's" if ok else "MISMATCH, see above")
        return 0 if ok else 1
    finally:
        print(f"   rollout stopped (exit {rollout.stop()})")


def _watch(address: str, started: float) -> dict[str, float]:
    """Fills the returned dict, from a background poll, with when the engine was up and a version served."""
    seen: dict[str, float] = {}
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))

    def poll() -> None:
        while len(seen) < 2 and time.monotonic() - started < 300:
            try:
                status = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
            except grpc.RpcError:
                return
            now = time.monotonic() - started
            if status.state in (pb.ROLLOUT_STATE_DUMMY, pb.ROLLOUT_STATE_SERVING):
                seen.setdefault("its engine was up (ready for Generate the moment a push commits)", now)
            if status.weight_version > 0:
                seen.setdefault("it served the first pushed version", now)
            time.sleep(0.05)

    threading.Thread(target=poll, daemon=True).start()
    return seen


if __name__ == "__main__":
    sys.exit(main())
