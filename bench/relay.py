"""Relay vs direct fan-out on a simulated cluster: one trainer host, N rollout hosts, every link capped.

`python -m bench.relay [--quick]` builds the cluster (bench/netsim.py), boots a torch-engine rollout
on each rollout host, and from the trainer host times pushes to one rollout, to all directly, and to
all through a relay chain; it also counts the bytes the trainer put on its link. Results go to
bench/results/relay.json. Needs root for the namespaces; says why and exits 2 where that is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.netsim import Cluster, unavailable_reason

__all__ = ["run"]

ROOT = Path(__file__).resolve().parents[1]
PORT = 50051


def _driver(checkpoint: Path, rollouts: list[str], runs: int) -> dict[str, object]:
    """Runs inside the trainer's namespace: times every mode with one long-lived Publisher each."""
    from trainer_side.publisher import Publisher
    from weightsync.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    tx = Path("/sys/class/net/eth0/statistics/tx_bytes")
    modes = {"one": (rollouts[:1], 0), "direct": (rollouts, 0), "relay": (rollouts, 1)}
    out: dict[str, object] = {}
    version = 0
    for name, (targets, relay) in modes.items():
        seconds, sent = [], []
        with Publisher(targets, progress=False, relay_fanout=relay, timeout=120) as publisher:
            for _ in range(runs + 1):  # the first is a warm-up
                version += 1
                before, start = int(tx.read_text()), time.perf_counter()
                results = publisher.push(state, version)
                elapsed, delta = time.perf_counter() - start, int(tx.read_text()) - before
                failed = [r.line() for r in results if not r.ok]
                if failed:
                    raise RuntimeError("; ".join(failed))
                seconds.append(elapsed)
                sent.append(delta)
        out[name] = {"seconds": seconds[1:], "trainer_tx_bytes": sent[1:], "median_s": statistics.median(seconds[1:])}
    return out


def run(*, rollouts: int = 4, rate: str = "200mbit", size: str = "64MiB", runs: int = 5) -> dict[str, object]:
    """Builds the cluster, measures, tears it down; returns the figures."""
    from safetensors.torch import save_file

    from bench.models import make_model, model_bytes, random_state

    work = Path(tempfile.mkdtemp(prefix="ws-relay-"))
    model = make_model(size, work) if size != "tiny" else ROOT / "models" / "tiny"
    state = random_state(model)
    checkpoint = work / "checkpoint.safetensors"
    save_file(state, checkpoint)
    with Cluster(rollouts + 1, rate) as cluster, serving(cluster, model, rollouts) as addresses:
        driver = subprocess.run(
            cluster.command(
                0,
                [
                    sys.executable,
                    "-m",
                    "bench.relay",
                    "--driver",
                    str(checkpoint),
                    "--rollouts",
                    ",".join(addresses),
                    "--runs",
                    str(runs),
                ],
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if driver.returncode != 0:
            raise RuntimeError(f"driver failed: {driver.stderr[-2000:]}")
        figures = json.loads(driver.stdout.strip().splitlines()[-1])
        status = subprocess.run(
            cluster.command(0, [sys.executable, "-m", "trainer_side", "status", "--rollouts", ",".join(addresses)]),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    one = figures["one"]["median_s"]
    return {
        "rollouts": rollouts,
        "link_rate": rate,
        "model_bytes": model_bytes(state),
        **figures,
        "relay_over_one": figures["relay"]["median_s"] / one,
        "direct_over_one": figures["direct"]["median_s"] / one,
        "status": status.stdout,
    }


@contextlib.contextmanager
def serving(cluster: Cluster, model: Path, count: int) -> Iterator[list[str]]:
    """Rollouts on hosts 1..count of `cluster`, up and answering; yields their addresses, stops them after."""
    from rollout_side.process import serve_command

    addresses = [f"{a}:{PORT}" for a in cluster.addresses[1 : count + 1]]
    argv = ["--log-level", "WARNING"]
    servers = [
        subprocess.Popen(
            cluster.command(i + 1, serve_command(model, host=cluster.addresses[i + 1], port=PORT, args=argv)), cwd=ROOT
        )
        for i in range(count)
    ]
    try:
        _wait_for(cluster, addresses)
        yield addresses
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(60)


def _wait_for(cluster: Cluster, addresses: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    command = cluster.command(0, [sys.executable, "-m", "trainer_side", "status", "--rollouts", ",".join(addresses)])
    while subprocess.run(command, cwd=ROOT, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("rollouts in the simulated cluster did not come up")
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model, 3 runs")
    parser.add_argument("--rate", default="200mbit", help="cap on every host's link, each way (tc syntax)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "relay.json")
    parser.add_argument("--driver", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rollouts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(_driver(args.driver, args.rollouts.split(","), args.runs)))
        return 0
    if reason := unavailable_reason():
        print(f"skipped: {reason}", file=sys.stderr)
        return 2
    result = run(rate=args.rate, size="tiny" if args.quick else "64MiB", runs=3 if args.quick else args.runs)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "status"}, indent=2))
    print(result["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
