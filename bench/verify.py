"""Installed-weight verification's cost: `python -m bench.verify` (also run by `make bench`).

Real torch rollout processes at 256 MiB and 1 GiB, pushed in full: the read-back time GetStatus reports
beside the push time, and the swap pause (commit -> serving, which now holds the read-back) with the
check on and off (`serve --no-verify-installed`), each configuration in its own rollout.
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
from pathlib import Path

from bench.models import make_model, model_bytes, random_state
from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def measure(model_dir: Path, state: dict, runs: int, *, verify: bool) -> dict[str, float]:  # type: ignore[type-arg]
    """Median push, swap and verification seconds over `runs` full pushes (one warm-up first)."""
    args = ["--log-level", "WARNING"] + ([] if verify else ["--no-verify-installed"])
    rollout = RolloutProcess(model_dir, engine="torch", args=args)
    push, swap, check = [], [], []
    try:
        with Publisher([rollout.address], progress=False, timeout=600) as publisher:  # a busy box is slow
            for i, version in zip(range(runs + 1), itertools.count(1), strict=False):
                started = time.perf_counter()
                (result,) = publisher.push(state, version)
                seconds = time.perf_counter() - started
                if not result.ok:
                    raise RuntimeError(result.line())
                status = publisher.status()[rollout.address]
                assert not isinstance(status, str)
                if i:
                    push.append(seconds)
                    swap.append(result.swap_seconds)
                    check.append(status.verification.seconds if verify else 0.0)
    finally:
        rollout.stop()
    return {
        "push_s": statistics.median(push),
        "swap_s": statistics.median(swap),
        "verify_s": statistics.median(check),
    }


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
    print("| model | push | verification | verification / push | swap pause, verified | swap pause, off |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        model_dir = make_model(size, work / "models")
        state = random_state(model_dir)
        on = measure(model_dir, state, args.runs, verify=True)
        off = measure(model_dir, state, args.runs, verify=False)
        rows[size] = {"bytes": model_bytes(state), "verified": on, "off": off}
        share = 100 * on["verify_s"] / on["push_s"]
        print(
            f"| {size} | {on['push_s']:.3f} s | {on['verify_s'] * 1e3:.1f} ms | {share:.1f} % | "
            f"{on['swap_s'] * 1e3:.1f} ms | {off['swap_s'] * 1e3:.1f} ms |"
        )
        del state
    machine["load_average_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine} | rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
