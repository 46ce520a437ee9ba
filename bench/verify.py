"""Installed-weight verification's cost: `python -m bench.verify` (also run by `make bench`).

Real torch rollout processes at 256 MiB and 1 GiB, pushed in full: the verification time GetStatus reports
beside the push time, the swap pause (how long each swap held the engine's generating thread, from the
rollout's weightsync_rollout_swap_pause_seconds) and the commit (Commit -> serving, verification included)
with the check on and off (`serve --no-verify-installed`), each configuration in its own rollout.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.models import make_model, model_bytes, random_state
from rollout_side.process import RolloutProcess, free_port
from trainer_side.publisher import Publisher

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def measure(model_dir: Path, state: dict, runs: int, *, verify: bool) -> dict[str, float]:  # type: ignore[type-arg]
    """Median push, commit, swap pause and verification seconds over `runs` full pushes (one warm-up first)."""
    metrics_port = free_port()
    args = ["--log-level", "WARNING", "--metrics-port", str(metrics_port)] + (
        [] if verify else ["--no-verify-installed"]
    )
    rollout = RolloutProcess(model_dir, engine="torch", args=args)
    push, commit, pause, check = [], [], [], []
    try:
        with Publisher([rollout.address], progress=False, timeout=600) as publisher:  # a busy box is slow
            for i, version in zip(range(runs + 1), itertools.count(1), strict=False):
                paused = pause_total(metrics_port)
                started = time.perf_counter()
                (result,) = publisher.push(state, version)
                seconds = time.perf_counter() - started
                if not result.ok:
                    raise RuntimeError(result.line())
                status = publisher.status()[rollout.address]
                assert not isinstance(status, str)
                if i:
                    push.append(seconds)
                    commit.append(result.swap_seconds)
                    pause.append(pause_total(metrics_port) - paused)
                    check.append(status.verification.seconds if verify else 0.0)
    finally:
        rollout.stop()
    return {
        "push_s": statistics.median(push),
        "commit_s": statistics.median(commit),
        "pause_s": statistics.median(pause),
        "verify_s": statistics.median(check),
    }


def pause_total(port: int) -> float:
    """The rollout's weightsync_rollout_swap_pause_seconds_sum: every swap's pause so far (one swap per push)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("weightsync_rollout_swap_pause_seconds_sum "):
                return float(line.split()[1])
    raise RuntimeError("the rollout exports no weightsync_rollout_swap_pause_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["256MiB", "1GiB"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verify.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ws-bench-verify-"))
    # The machine as the run found it: on a shared box the load average explains the spread between runs.
    machine = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "load_average_before": list(os.getloadavg()),
    }
    rows: dict[str, object] = {}
    print(
        "| model | push | verification | verification / push | swap pause, verified | swap pause, off "
        "| commit, verified | commit, off |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        model_dir = make_model(size, work / "models")
        state = random_state(model_dir)
        on = measure(model_dir, state, args.runs, verify=True)
        off = measure(model_dir, state, args.runs, verify=False)
        rows[size] = {"bytes": model_bytes(state), "verified": on, "off": off}
        share = 100 * on["verify_s"] / on["push_s"]
        print(
            f"| {size} | {on['push_s']:.3f} s | {on['verify_s'] * 1e3:.1f} ms | {share:.1f} % | "
            f"{on['pause_s'] * 1e3:.1f} ms | {off['pause_s'] * 1e3:.1f} ms | "
            f"{on['commit_s'] * 1e3:.1f} ms | {off['commit_s'] * 1e3:.1f} ms |"
        )
        del state
    machine["load_average_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine} | rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
