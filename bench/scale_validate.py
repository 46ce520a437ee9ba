"""`python -m bench.scale --validate`: the scale model's predictions against the runs this machine can do.

Two sets of cases, each measured here and predicted by bench/scale_model.py:
- loopback, no link cap: 1, 2 and 4 trainer ranks (a gloo job, bench/sharded.py) to 1, 2 and 4 rollouts,
  full pushes; every process shares this machine's cores, which the model takes as one more bound;
- the simulated cluster (bench/netsim.py, namespaces: needs root) with every link capped at a few
  rates: relay chains of 1 to 4 rollouts, full and delta pushes (a delta is predicted from its own
  measured wire bytes: the time model is checked, not the delta ratio of one training step).
Each case is predicted twice: from the rates committed in bench/results (other runs, other load) and
from what this run measured before its cases (the baseline in the same run):
- the CPU per byte of one rank to one rollout, and its commit (swap) time;
- the fixed cost of an update, per ranks x rollouts: the same pushes of models/tiny (5 MB), whose time
  is round trips, collective steps and processes waking, not bytes;
- a delta's costs per model byte (the diff against the trainer's base, the patch applied and each
  patched tensor verified): a 1 -> 1 delta on loopback, less its fixed cost and its wire bytes;
- the cores free for it, two busy processes for a second: recorded only (see `_case`); every process
  is predicted on the machine's 2 cores.
Writes bench/results/scale_validation.json. A case outside 25% is reported with the phase the model
took as binding, which is where the model is wrong.
"""

from __future__ import annotations

import argparse
import datetime
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
from bench.netsim import Cluster, burst_bytes, unavailable_reason
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
    report = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "model_bytes": nbytes,
        "runs": runs,
        "tolerance": TOLERANCE,
        "calibration": calibration,
        "measured": {"loopback": local, "chains": networked},
        "seconds": time.perf_counter() - started,
    }
    return _score(report, docs=docs)


def rescore(*, docs: bool = True) -> int:
    """Predicts the committed run's measurements again with today's model (after a fix to the model)."""
    report = json.loads((RESULTS / "scale_validation.json").read_text())
    if "measured" not in report:
        print("refused: the committed run predates stored measurements; run --validate", file=sys.stderr)
        return 2
    report["predictions"] = (
        f"recomputed on {datetime.date.today()} from this run's measurements by the model of that day "
        "(`python -m bench.scale --validate --rescore`)"
    )
    return _score(report, docs=docs)


def _score(report: dict[str, Any], *, docs: bool) -> int:
    """Predicts every measured case, writes the results JSON (and the docs' table), prints the comparison."""
    calibration, nbytes = report["calibration"], report["model_bytes"]
    committed = measured_rates(gpu=False)
    same_run = _same_run_rates(committed, calibration, nbytes)
    cases = []
    for ranks, rollouts, seconds in report["measured"]["loopback"]:
        f = Fleet(model_bytes=nbytes, trainer_ranks=ranks, rollouts=rollouts, rollout_hosts=rollouts, gpu=False)
        fixed = Rate(calibration["fixed_s"][f"{ranks}x{rollouts}"], f"this run: {ranks} -> {rollouts} of models/tiny")
        cases.append(
            _case(
                f"{ranks} rank(s) -> {rollouts} rollout(s), loopback, full",
                f,
                "full",
                seconds,
                committed,
                replace(same_run, fixed_s=fixed),
                cores=calibration["cores"],
            )
        )
    for measured in report["measured"]["chains"]:
        cap = measured["cap"]
        gbit = _gbit(cap)
        for n, entry in measured["chains"].items():
            f = Fleet(
                model_bytes=nbytes,
                trainer_ranks=1,
                rollouts=int(n),
                rollout_hosts=int(n),
                nic_gbit=gbit,
                relay_fanout=1 if int(n) > 1 else 0,
                gpu=False,
                link_burst_bytes=burst_bytes(cap),
            )
            name = f"relay chain of {n} at {cap}"
            cores = measured["cores"]
            cases.append(_case(f"{name}, full", f, "full", entry["full"], committed, same_run, cores=cores))
            ratio = Rate(entry["delta_wire_bytes"] / nbytes, "this push's wire bytes")
            cases.append(
                _case(
                    f"{name}, delta ({entry['delta_wire_bytes'] / nbytes:.1%} of the bytes)",
                    f,
                    "delta",
                    entry["delta"],
                    replace(committed, delta_ratio=ratio),
                    replace(same_run, delta_ratio=ratio),
                    cores=cores,
                )
            )
    within = sum(c["within"] for c in cases)
    report |= {
        "rates_committed": committed.sources(),
        "rates_same_run": same_run.sources(),
        "cases": cases,
        "within": within,
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
    load = report["load_before"]
    print(f"{within} of {len(cases)} cases within {TOLERANCE:.0%} (same-run rates); load {load:.1f} before")
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The validation table for docs/benchmarks.md, from scale_validation.json."""
    m = report["machine"]
    lines = [
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), load average {report['load_before']:.1f} before and "
        f"{report['load_after']:.1f} after (the machine was shared), {report['model_bytes'] / 2**20:.0f} MiB model, "
        f"median of {report['runs']} runs; {report['within']} of {len(report['cases'])} cases within "
        f"{report['tolerance']:.0%} with this run's rates."
        + (f" Predictions {report['predictions']}." if report.get("predictions") else ""),
        "",
        *_calibration_lines(report.get("calibration", {})),
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


def _calibration_lines(calibration: dict[str, Any]) -> list[str]:
    """What this run measured before its cases, as the rates it predicted them with."""
    if "fixed_s" not in calibration:
        return []
    fixed = ", ".join(f"{k.replace('x', ' -> ')} {v * 1e3:.0f} ms" for k, v in calibration["fixed_s"].items())
    delta = calibration["delta"]
    return [
        f"This run's rates: a fixed cost per update, ranks -> rollouts pushing models/tiny: {fixed}; a 1 -> 1 delta "
        f"on loopback {delta['seconds'] * 1e3:.0f} ms for {delta['wire_bytes'] / 2**20:.1f} MiB on the wire; "
        f"CPU per byte and commit of 1 -> 1 (bench/results/scale_validation.json, `calibration`).",
        "",
    ]


def _same_run_rates(committed: Rates, calibration: dict[str, Any], nbytes: int) -> Rates:
    """The committed rates with what this run measured in their place (see the module's docstring)."""
    gib = nbytes / GIB
    send = calibration["sender_cpu_s"] / gib
    receive = calibration["receiver_cpu_s"] / gib
    delta = calibration["delta"]
    wire_s = delta["wire_bytes"] / GIB * (send + receive)
    # A delta's wall time beyond its fixed cost and its bytes, split between the sides as their CPU was (their
    # CPU overstates their time: the diff runs on a thread pool, and the rollout brings its spare up to date
    # after Commit answered).
    extra = max(delta["seconds"] - calibration["fixed_s"]["1x1"] - wire_s, 0.0) / gib
    trainer_share = delta["trainer_cpu_s"] / max(delta["trainer_cpu_s"] + delta["rollout_cpu_s"], 1e-9)
    source = "this run: a 1 -> 1 delta on loopback, less its fixed cost and wire bytes, split as each side's CPU"
    return replace(
        committed,
        encode_cpu=Rate(0.0, "folded into send_cpu: one rank to one rollout, this run"),
        send_cpu=Rate(send, "this run: 1 rank -> 1 rollout, trainer CPU"),
        receive_cpu=Rate(receive, "this run: 1 rank -> 1 rollout, rollout CPU"),
        swap_s=Rate(calibration["swap_s"] / gib, "this run: 1 rank -> 1 rollout, the rollout's commit"),
        fixed_s=Rate(calibration["fixed_s"]["1x1"], "this run: 1 -> 1 of models/tiny"),
        diff_cpu=Rate(extra * trainer_share, source),
        apply_cpu=Rate(extra * (1 - trainer_share), source),
    )


def _case(
    name: str, f: Fleet, kind: Any, seconds: list[float], committed: Rates, same_run: Rates, *, cores: float
) -> dict[str, Any]:
    """Predicts with the committed rates and with this run's, every process sharing the machine's 2 cores.

    `cores`, what a probe found free just before (recorded, not used): a 1 s probe of a machine whose load
    moved between 4 and 10 during the run said 0.67-0.76, and predictions from it were 50-140% high.
    """
    measured = statistics.median(seconds)
    a, b = predict(replace(f, shared_cores=2), committed, kind), predict(replace(f, shared_cores=2), same_run, kind)
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
        "cores_free_probe": cores,
        "phases": [{"name": p.name, "seconds": p.seconds, "bound": p.bound} for p in b.phases],
    }


def _loopback(
    model: Path, state: dict[str, torch.Tensor], nbytes: int, runs: int, quick: bool
) -> tuple[dict[str, Any], list[tuple[int, int, list[float]]]]:
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
        calibration: dict[str, Any] = {
            "sender_cpu_s": statistics.mean(got.cpu.sender),
            "receiver_cpu_s": statistics.mean(got.cpu.receiver),
            "seconds": statistics.median(got.seconds),
            "swap_s": statistics.median(got.swap_seconds),
            "cores": cores_available(),
            "delta": _delta_on_loopback(state, rollouts[0], runs),
            "fixed_s": _fixed(combos, runs),
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


def cores_available(seconds: float = 1.0) -> float:
    """The cores this run can get now: CPU time two busy processes get in `seconds` of wall time, over it."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spin, args=(seconds,)) for _ in range(2)]
    for p in procs:
        p.start()
    started = time.perf_counter()
    time.sleep(0.2)  # past their start-up
    before = [_cpu(p.pid) for p in procs]
    mark = time.perf_counter()
    time.sleep(seconds * 0.6)
    got = sum(_cpu(p.pid) - b for p, b in zip(procs, before, strict=True)) / (time.perf_counter() - mark)
    for p in procs:
        p.join(seconds + 5 - (time.perf_counter() - started))
        if p.is_alive():
            p.kill()
    return max(min(got, 2.0), 0.5)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _cpu(pid: int | None) -> float:
    from bench.measure import cpu_seconds

    return cpu_seconds(pid or "self")


def _delta_on_loopback(state: dict[str, torch.Tensor], rollout: Any, runs: int) -> dict[str, float]:
    """A 1 -> 1 delta after a full push, as the chains' driver sends it: seconds, wire bytes, CPU per side."""
    from bench.measure import cpu_seconds
    from trainer_side.publisher import Publisher

    changed = _sparse_step(state)
    seconds, trainer, rollout_cpu, wire = [], [], [], 0
    with Publisher([rollout.address], progress=False, delta=True) as publisher:
        version = 5_000
        for _ in range(runs + 1):  # the first is a warm-up
            version += 1
            _timed(publisher, state, version)
            version += 1
            a, b = cpu_seconds(), cpu_seconds(rollout.pid)
            took, wire = _timed(publisher, changed, version)
            seconds.append(took)
            trainer.append(cpu_seconds() - a)
            rollout_cpu.append(cpu_seconds(rollout.pid) - b)
    return {
        "seconds": statistics.median(seconds[1:]),
        "wire_bytes": wire,
        "trainer_cpu_s": statistics.mean(trainer[1:]),
        "rollout_cpu_s": statistics.mean(rollout_cpu[1:]),
    }


def _fixed(combos: list[tuple[int, int]], runs: int) -> dict[str, float]:
    """Seconds of each ranks x rollouts push of models/tiny (5 MB): an update's cost that is not its bytes."""
    from bench import sharded
    from bench.models import TINY, model_bytes, random_state
    from bench.sync import Rollout

    rollouts = [Rollout(TINY) for _ in range(max(n for _, n in combos))]
    nbytes = model_bytes(random_state(TINY))
    out = {}
    try:
        for i, (ranks, n) in enumerate(combos):
            row = sharded.run(TINY, ranks, rollouts[:n], nbytes, runs, 20_000 + i * (runs + 1))
            out[f"{ranks}x{n}"] = statistics.median(row["push_seconds"])
    finally:
        for r in rollouts:
            r.stop()
    return out


def _sparse_step(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """About 1% of the elements changed: a sparse fine-tuning step."""
    changed = {k: v.clone() for k, v in state.items()}
    for t in changed.values():
        t.view(-1)[::97] += 0.01
    return changed


def _chains(model: Path, state: dict[str, torch.Tensor], cap: str, runs: int) -> dict[str, Any]:
    """Relay chains of 1-4 rollouts in a simulated cluster whose every link is capped at `cap`."""
    from safetensors.torch import save_file

    from bench.relay import serving

    checkpoint = model / "checkpoint.safetensors"
    if not checkpoint.exists():
        save_file(state, checkpoint)
    with Cluster(5, cap) as cluster, serving(cluster, model, 4) as addresses:
        cores = cores_available()
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
    return {"cap": cap, "chains": chains, "cores": cores}


def _driver(checkpoint: Path, rollouts: list[str], runs: int) -> dict[str, Any]:
    """Inside the trainer's namespace: per chain length, full pushes, then a delta after a full one."""
    from trainer_side.publisher import Publisher
    from weightsync.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    changed = _sparse_step(state)
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
