"""`python -m bench.scale --validate`: the scale model's predictions against the runs this machine can do.

Two sets of cases, each measured here and predicted by bench/scale_model.py:
- loopback, no link cap: 1, 2 and 4 trainer ranks (a gloo job, bench/sharded.py) to 1, 2 and 4 rollouts,
  full pushes; every process shares this machine's cores, which the model takes as one more bound;
- the simulated cluster (bench/netsim.py, namespaces: needs root) with every link capped at a few
  rates: relay chains of 1 to 4 rollouts, full and delta pushes (a delta is predicted from its own
  measured wire bytes: the time model is checked, not the delta ratio of one training step).
Each case is predicted twice: from the rates committed in bench/results (other runs, other load) and
from what this run measured before its cases (the baseline in the same run), on the collective path the
loopback cases take (bench/sharded.py):
- the fixed cost of an update, per ranks x rollouts: the same pushes of models/tiny (5 MB), whose time
  is round trips, collective steps and processes waking, not bytes;
- CPU per byte beyond that push's: each side's of one rank to one rollout, and per byte exchanged between
  ranks, from two ranks to one rollout (bench.scale.exchanged_fraction says which bytes each case exchanges);
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
ARENAS = 1  # MALLOC_ARENA_MAX of the trainer ranks: see `_loopback`
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
    (RESULTS / "scale_validation.json").write_text(json.dumps(report, indent=1) + "\n")  # kept for --rescore
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
    beyond = nbytes - calibration["tiny_bytes"]  # the tiny push's bytes are in its time: the fixed cost
    for ranks, rollouts, seconds, *_ in report["measured"]["loopback"]:
        exchanged = calibration["exchanged"][str(ranks)] - calibration["exchanged_tiny"][str(ranks)]
        f = Fleet(
            model_bytes=beyond,
            trainer_ranks=ranks,
            rollouts=rollouts,
            rollout_hosts=rollouts,
            gpu=False,
            exchanged=exchanged / beyond,
        )
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
        *_calibration_lines(report),
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


def _calibration_lines(report: dict[str, Any]) -> list[str]:
    """What this run measured before its cases, as the rates it predicted them with."""
    calibration = report.get("calibration", {})
    if "tiny" not in calibration:
        return []
    fixed = ", ".join(f"{k.replace('x', ' -> ')} {v * 1e3:.0f} ms" for k, v in calibration["fixed_s"].items())
    rates = report["rates_same_run"]
    per_gib = ", ".join(f"{name} {rates[name][0]:.2f}" for name in ("send_cpu", "receive_cpu", "exchange_cpu"))
    exchanged = ", ".join(
        f"{r} ranks {v / report['model_bytes']:.0%}" for r, v in calibration["exchanged"].items() if int(r) > 1
    )
    delta = calibration["delta"]
    return [
        f"This run's rates: a fixed cost per update, ranks -> rollouts pushing models/tiny (5 MB): {fixed}; CPU "
        f"seconds per GiB beyond that push's, on one core: {per_gib}; of the model's bytes, exchanged between "
        f"ranks: {exchanged}; a 1 -> 1 delta on loopback {delta['seconds'] * 1e3:.0f} ms for "
        f"{delta['wire_bytes'] / 2**20:.1f} MiB on the wire (bench/results/scale_validation.json, `calibration` "
        "and `rates_same_run`).",
        "",
    ]


def _same_run_rates(committed: Rates, calibration: dict[str, Any], nbytes: int) -> Rates:
    """The committed rates with what this run measured in their place (see the module's docstring).

    CPU per byte is what a push of the model costs beyond the same push of models/tiny (whose cost, not
    the bytes', is the update's fixed cost): one rank's per byte sent and received, then two ranks' beyond
    one rank's per byte they exchanged.
    """
    tiny, full = calibration["tiny"], calibration["full"]
    beyond = (nbytes - calibration["tiny_bytes"]) / GIB

    def cpu(case: str, side: str) -> float:
        return max(float(full[case][side] - tiny[case][side]), 0.0)

    send = cpu("1x1", "trainer_cpu_s") / beyond
    receive = cpu("1x1", "rollout_cpu_s") / beyond
    exchanged = (calibration["exchanged"]["2"] - calibration["exchanged_tiny"]["2"]) / GIB
    exchange = max(cpu("2x1", "trainer_cpu_s") - send * beyond, 0.0) / exchanged
    delta = calibration["delta"]
    wire_s = delta["wire_bytes"] / GIB * (send + receive)
    # A delta's wall time beyond its fixed cost and its bytes, split between the sides as their CPU was (their
    # CPU overstates their time: the diff runs on a thread pool, and the rollout brings its spare up to date
    # after Commit answered).
    extra = max(delta["seconds"] - calibration["fixed_s"]["1x1"] - wire_s, 0.0) / (nbytes / GIB)
    trainer_share = delta["trainer_cpu_s"] / max(delta["trainer_cpu_s"] + delta["rollout_cpu_s"], 1e-9)
    source = "this run: a 1 -> 1 delta on loopback, less its fixed cost and wire bytes, split as each side's CPU"
    beyond_tiny = "beyond the same push of models/tiny"
    return replace(
        committed,
        encode_cpu=Rate(0.0, "folded into send_cpu: one rank to one rollout, this run"),
        send_cpu=Rate(send, f"this run: 1 rank -> 1 rollout, trainer CPU {beyond_tiny}"),
        receive_cpu=Rate(receive, f"this run: 1 rank -> 1 rollout, rollout CPU {beyond_tiny}"),
        exchange_cpu=Rate(
            exchange, f"this run: 2 ranks -> 1 rollout, trainer CPU {beyond_tiny} and 1 rank's, per byte exchanged"
        ),
        swap_s=Rate(full["1x1"]["swap_s"] / (nbytes / GIB), "this run: 1 rank -> 1 rollout, the rollout's commit"),
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
) -> tuple[dict[str, Any], list[tuple[int, int, list[float], dict[str, Any]]]]:
    """The same-run calibration, then ranks x rollouts pushes, each group with only its own rollouts alive.

    The ranks run with MALLOC_ARENA_MAX=1, as docs/sharded.md tells users to and `train --ranks N` does: with
    glibc's default arenas each push of 4 ranks mapped about 12,000 fresh pages (most of its bytes; about 100
    with one arena), whose cost on this VM moves with the host's memory, so one case measured 0.18-0.66 s
    from push to push. Idle rollouts of other cases are not part of a case's fleet either.
    """
    from bench import sharded
    from bench.models import TINY, model_bytes, random_state
    from bench.sync import Rollout

    combos = [(1, 1), (2, 2), (4, 4), (1, 4), (4, 1)] if quick else [(r, n) for r in (1, 2, 4) for n in (1, 2, 4)]
    tiny_bytes = model_bytes(random_state(TINY))
    calibration: dict[str, Any] = {
        "cores": cores_available(),
        "tiny_bytes": tiny_bytes,
        "exchanged": {str(r): _exchanged_bytes(model, r) for r in (1, 2, 4)},
        "exchanged_tiny": {str(r): _exchanged_bytes(TINY, r) for r in (1, 2, 4)},
        "tiny": {},
        "full": {},
    }
    out = []
    version = 10_000

    def push(path: Path, ranks: int, rollouts: list[Rollout], count: int, size: int) -> dict[str, Any]:
        nonlocal version
        row = sharded.run(path, ranks, rollouts, size, count, version, arenas=ARENAS)
        version += count + 1
        return row

    for n in sorted({n for _, n in combos}):
        cases = [r for r, m in combos if m == n]
        tiny = [Rollout(TINY) for _ in range(n)]
        try:  # the fixed cost of an update: the same pushes of a 5 MB model (1 and 2 ranks: the calibration's too)
            for ranks in sorted({*cases, 1, 2} if n == 1 else set(cases)):
                calibration["tiny"][f"{ranks}x{n}"] = _summary(push(TINY, ranks, tiny, runs * 2, tiny_bytes))
        finally:
            for r in tiny:
                r.stop()
        rollouts = [Rollout(model) for _ in range(n)]
        try:
            if n == 1:  # CPU per byte of each side and per exchanged byte: pushes of their own, before the cases
                for ranks in (1, 2):
                    calibration["full"][f"{ranks}x1"] = _summary(push(model, ranks, rollouts, runs * 3, nbytes))
                calibration["delta"] = _delta_on_loopback(state, rollouts[0], runs, version)
                version += 2 * (runs + 1) + 1
            for ranks in cases:
                try:
                    row = push(model, ranks, rollouts, runs, nbytes)
                except Exception as error:  # noqa: BLE001 (a case that cannot run here does not lose the others)
                    print(f"{ranks} rank(s) -> {n} rollout(s) did not run: {error}", file=sys.stderr, flush=True)
                    continue
                # each push's CPU and page faults beside its time: recorded to say where a case went wrong, not used
                cpu = {k: row[k] for k in ("trainer_cpu_s", "rollout_cpu_s", "trainer_page_faults")}
                out.append((ranks, n, row["push_seconds"], cpu))
                print(f"{ranks} rank(s) -> {n} rollout(s): {statistics.median(row['push_seconds']):.2f} s", flush=True)
        finally:
            for r in rollouts:
                r.stop()
    calibration["fixed_s"] = {k: v["seconds"] for k, v in calibration["tiny"].items()}
    return calibration, out


def _summary(row: dict[str, Any]) -> dict[str, float]:
    """A calibration's pushes: median wall time and commit; mean CPU (the clock ticks in 10 ms)."""
    return {
        "seconds": statistics.median(row["push_seconds"]),
        "swap_s": statistics.median(row["swap_seconds"]),
        "trainer_cpu_s": statistics.mean(row["trainer_cpu_s"]),
        "rollout_cpu_s": statistics.mean(row["rollout_cpu_s"]),
    }


def _exchanged_bytes(model: Path, ranks: int) -> float:
    """Bytes a collective push of `model` from `ranks` ranks passes between them (bench.scale.exchanged_fraction)."""
    from bench.models import meta_state
    from bench.scale import exchanged_fraction
    from weightsync.manifest import wire_layout

    sources = list(meta_state(model).items())  # tied lm_head left out, as the ranks send it
    return exchanged_fraction([tuple(t.shape) for _, t in sources], ranks, repeat=1) * wire_layout(sources).total_bytes


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


def _delta_on_loopback(state: dict[str, torch.Tensor], rollout: Any, runs: int, first_version: int) -> dict[str, float]:
    """A 1 -> 1 delta after a full push, as the chains' driver sends it: seconds, wire bytes, CPU per side."""
    from bench.measure import cpu_seconds
    from trainer_side.publisher import Publisher

    changed = _sparse_step(state)
    seconds, trainer, rollout_cpu, wire = [], [], [], 0
    with Publisher([rollout.address], progress=False, delta=True) as publisher:
        version = first_version
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
