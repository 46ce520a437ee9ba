"""`python -m bench.scale --validate`: the scale model's predictions against the runs this machine can do.

Two sets of cases, each measured here and predicted by bench/scale_model.py:
- loopback, no link cap: 1, 2 and 4 trainer ranks (a gloo job, bench/sharded.py) to 1, 2 and 4 rollouts,
  full pushes; every process shares this machine's cores, which the model takes as one more bound;
- the simulated cluster (bench/netsim.py, namespaces: needs root) with every link capped at a few
  rates: relay chains of 1 to 4 rollouts, full and delta pushes (a delta is predicted from its own
  measured wire bytes: the time model is checked, not the delta ratio of one training step).
Each case is predicted twice: from the rates committed in bench/results (other runs, other load) and
from the CPU per byte measured at the start of this run (one rank to one rollout), the baseline in the
same run. Writes bench/results/scale_validation.json. A case outside 25% is reported with the phase the
model took as binding, which is where the model is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.measure import machine
from bench.netsim import Cluster, unavailable_reason
from bench.scale import RESULTS, measured_rates
from bench.scale_model import GIB, Fleet, Rate, Rates, predict

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25
SIZE = "64MiB"
MARKERS = ("<!-- scale-validation:begin -->", "<!-- scale-validation:end -->")


def main(*, quick: bool = False, docs: bool = True) -> int:
    if reason := unavailable_reason():
        print(f"refused: {reason}", file=sys.stderr)
        return 2
    from bench.models import make_model, model_bytes, random_state

    work = Path(tempfile.mkdtemp(prefix="ws-scale-"))
    model = make_model(SIZE, work)
    state = random_state(model)
    nbytes = model_bytes(state)
    runs = 2 if quick else 3
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    calibration, local = _loopback(model, state, nbytes, runs, quick)
    caps = ["200mbit"] if quick else ["100mbit", "400mbit"]
    networked = []
    for cap in caps:
        try:
            networked.append(_chains(model, state, cap, runs))
        except Exception as error:  # noqa: BLE001 (as above: say so and keep the rest)
            print(f"the simulated cluster at {cap} did not run: {error}", file=sys.stderr, flush=True)
    committed = measured_rates(gpu=False)
    same_run = replace(
        committed,
        encode_cpu=Rate(0.0, "folded into send_cpu: one rank to one rollout, this run"),
        send_cpu=Rate(calibration["sender_cpu_s"] / (nbytes / GIB), "this run: 1 rank -> 1 rollout, trainer CPU"),
        receive_cpu=Rate(calibration["receiver_cpu_s"] / (nbytes / GIB), "this run: 1 rank -> 1 rollout, rollout CPU"),
    )
    cases = []
    for ranks, rollouts, seconds in local:
        f = Fleet(model_bytes=nbytes, trainer_ranks=ranks, rollouts=rollouts, rollout_hosts=rollouts, shared_cores=2)
        cases.append(
            _case(
                f"{ranks} rank(s) -> {rollouts} rollout(s), loopback, full",
                replace(f, gpu=False),
                "full",
                seconds,
                committed,
                same_run,
            )
        )
    for measured in networked:
        cap = measured["cap"]
        gbit = _gbit(cap)
        for n, entry in measured["chains"].items():
            f = Fleet(
                model_bytes=nbytes,
                trainer_ranks=1,
                rollouts=int(n),
                rollout_hosts=int(n),
                nic_gbit=gbit,
                shared_cores=2,
                relay_fanout=1 if int(n) > 1 else 0,
                gpu=False,
            )
            name = f"relay chain of {n} at {cap}"
            cases.append(_case(f"{name}, full", f, "full", entry["full"], committed, same_run))
            ratio = Rate(entry["delta_wire_bytes"] / nbytes, "this push's wire bytes")
            cases.append(
                _case(
                    f"{name}, delta ({entry['delta_wire_bytes'] / nbytes:.1%} of the bytes)",
                    f,
                    "delta",
                    entry["delta"],
                    replace(committed, delta_ratio=ratio),
                    replace(same_run, delta_ratio=ratio),
                )
            )
    within = sum(c["within"] for c in cases)
    report = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "model_bytes": nbytes,
        "runs": runs,
        "tolerance": TOLERANCE,
        "calibration": calibration,
        "rates_committed": committed.sources(),
        "rates_same_run": same_run.sources(),
        "cases": cases,
        "within": within,
        "seconds": time.perf_counter() - started,
    }
    (RESULTS / "scale_validation.json").write_text(json.dumps(report, indent=1) + "\n")
    if docs:
        from bench.report import update_readme

        update_readme(ROOT / "docs" / "benchmarks.md", markdown(report), *MARKERS)
    print(f"{'case':62s} {'measured':>9s} {'committed':>10s} {'same run':>9s}  binding (same run)")
    for c in cases:
        mark = "ok " if c["within"] else "OUT"
        print(
            f"{c['case']:62s} {c['measured_s']:8.2f}s {c['predicted_committed_s']:9.2f}s "
            f"{c['predicted_same_run_s']:8.2f}s  {mark} {c['error_same_run']:+.0%} {c['bound']}"
        )
    print(f"{within} of {len(cases)} cases within {TOLERANCE:.0%} (same-run rates); load {load_before:.1f} before")
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The validation table for docs/benchmarks.md, from scale_validation.json."""
    m = report["machine"]
    lines = [
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), load average {report['load_before']:.1f} before and "
        f"{report['load_after']:.1f} after (the machine was shared), {report['model_bytes'] / 2**20:.0f} MiB model, "
        f"median of {report['runs']} runs; {report['within']} of {len(report['cases'])} cases within "
        f"{report['tolerance']:.0%} with the same run's CPU per byte.",
        "",
        "| case | measured | predicted, committed rates | predicted, this run's rates | error | binding phase |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        out = "" if c["within"] else " (out)"
        lines.append(
            f"| {c['case']} | {c['measured_s']:.2f} s | {c['predicted_committed_s']:.2f} s | "
            f"{c['predicted_same_run_s']:.2f} s | {c['error_same_run']:+.0%}{out} | {c['bound']} |"
        )
    return "\n".join(lines) + "\n"


def _case(name: str, f: Fleet, kind: Any, seconds: list[float], committed: Rates, same_run: Rates) -> dict[str, Any]:
    measured = statistics.median(seconds)
    a, b = predict(f, committed, kind), predict(f, same_run, kind)
    error = b.seconds / measured - 1
    return {
        "case": name,
        "measured_s": measured,
        "samples": seconds,
        "predicted_committed_s": a.seconds,
        "predicted_same_run_s": b.seconds,
        "error_committed": a.seconds / measured - 1,
        "error_same_run": error,
        "within": abs(error) <= TOLERANCE,
        "bound": b.bound,
        "phases": [{"name": p.name, "seconds": p.seconds, "bound": p.bound} for p in b.phases],
    }


def _loopback(
    model: Path, state: dict[str, torch.Tensor], nbytes: int, runs: int, quick: bool
) -> tuple[dict[str, float], list[tuple[int, int, list[float]]]]:
    """The same-run calibration (CPU per byte, one rank to one rollout), then ranks x rollouts pushes."""
    from bench import sharded
    from bench.baselines import SocketSink
    from bench.sync import Rollout, measure_sync

    combos = [(1, 1), (2, 2), (4, 4), (1, 4), (4, 1)] if quick else [(r, n) for r in (1, 2, 4) for n in (1, 2, 4)]
    rollouts = [Rollout(model) for _ in range(max(n for _, n in combos))]
    out = []
    try:
        sink = SocketSink(nbytes)
        try:
            got = measure_sync(state, rollouts[:1], [sink], runs=runs, warmup=1)
        finally:
            sink.close()
        calibration = {
            "sender_cpu_s": statistics.mean(got.cpu.sender),
            "receiver_cpu_s": statistics.mean(got.cpu.receiver),
            "seconds": statistics.median(got.seconds),
        }
        version = 10_000
        for ranks, n in combos:
            try:
                row = sharded.run(model, ranks, rollouts[:n], nbytes, runs, version)
            except Exception as error:  # noqa: BLE001 (a case that cannot run here does not lose the others)
                print(f"{ranks} rank(s) -> {n} rollout(s) did not run: {error}", file=sys.stderr, flush=True)
                continue
            finally:
                version += runs + 1
            out.append((ranks, n, row["push_seconds"]))
            print(f"{ranks} rank(s) -> {n} rollout(s): {statistics.median(row['push_seconds']):.2f} s", flush=True)
    finally:
        for r in rollouts:
            r.stop()
    return calibration, out


def _chains(model: Path, state: dict[str, torch.Tensor], cap: str, runs: int) -> dict[str, Any]:
    """Relay chains of 1-4 rollouts in a simulated cluster whose every link is capped at `cap`."""
    from safetensors.torch import save_file

    from bench.relay import serving

    checkpoint = model / "checkpoint.safetensors"
    if not checkpoint.exists():
        save_file(state, checkpoint)
    with Cluster(5, cap) as cluster, serving(cluster, model, 4) as addresses:
        argv = [
            sys.executable,
            "-m",
            "bench.scale_validate",
            "--driver",
            str(checkpoint),
            "--rollouts",
            ",".join(addresses),
        ]
        driver = subprocess.run(
            cluster.command(0, [*argv, "--runs", str(runs)]), cwd=ROOT, capture_output=True, text=True, timeout=1800
        )
        if driver.returncode != 0:
            raise RuntimeError(f"driver failed: {driver.stderr[-2000:]}")
    chains: dict[str, Any] = json.loads(driver.stdout.strip().splitlines()[-1])
    for n, entry in chains.items():
        full, delta = statistics.median(entry["full"]), statistics.median(entry["delta"])
        print(f"{cap}, chain of {n}: full {full:.2f} s, delta {delta:.2f} s", flush=True)
    return {"cap": cap, "chains": chains}


def _driver(checkpoint: Path, rollouts: list[str], runs: int) -> dict[str, Any]:
    """Inside the trainer's namespace: per chain length, full pushes, then a delta after a full one."""
    from trainer_side.publisher import Publisher
    from weightsync.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    changed = {k: v.clone() for k, v in state.items()}
    for t in changed.values():
        t.view(-1)[::97] += 0.01  # about 1% of the elements: a sparse step
    version = 0
    out: dict[str, Any] = {}
    for n in range(1, len(rollouts) + 1):
        relay = 1 if n > 1 else 0
        full, delta, wire = [], [], 0
        with Publisher(rollouts[:n], progress=False, relay_fanout=relay, timeout=300) as publisher:
            for i in range(runs + 1):  # the first is a warm-up
                version += 1
                seconds, _ = _timed(publisher, state, version)
                if i:
                    full.append(seconds)
        with Publisher(rollouts[:n], progress=False, relay_fanout=relay, delta=True, timeout=300) as publisher:
            for _ in range(runs):
                version += 1
                _timed(publisher, state, version)  # the base: a full push
                version += 1
                seconds, wire = _timed(publisher, changed, version)
                delta.append(seconds)
        out[str(n)] = {"full": full, "delta": delta, "delta_wire_bytes": wire}
    return out


def _timed(publisher: Any, state: dict[str, torch.Tensor], version: int) -> tuple[float, int]:
    started = time.perf_counter()
    results = publisher.push(state, version)
    seconds = time.perf_counter() - started
    failed = [r.line() for r in results if not r.ok]
    if failed:
        raise RuntimeError("; ".join(failed))
    return seconds, results[0].bytes_sent


def _gbit(rate: str) -> float:
    from bench.scale import _bits

    return _bits(rate) / 1e9


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the simulated cluster's driver (run by --validate)")
    parser.add_argument("--driver", type=Path, required=True)
    parser.add_argument("--rollouts", required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(_driver(args.driver, args.rollouts.split(","), args.runs)))
