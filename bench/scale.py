"""`python -m bench.scale [--validate]`: how long a 7B, 70B and 1T update takes on a fleet, phase by phase.

The arithmetic is bench/scale_model.py; its inputs are read here from the results the other benches
committed (bench/results/*.json: CPU seconds per byte on each side, link efficiency, relay hop, delta
ratio), and the few rates this machine cannot measure are stated with their source. Writes
bench/results/scale.json, the users' table in docs/benchmarks.md and the README's headline (between the
scale markers). `--validate` predicts the runs this machine can do and measures them
(bench/scale_validate.py; namespaces need root: it says why and exits 2 where that is refused).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.scale_model import GIB, Fleet, Prediction, Rate, Rates, predict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TABLE = ("<!-- scale:begin -->", "<!-- scale:end -->")
HEADLINE = ("<!-- scale-headline:begin -->", "<!-- scale-headline:end -->")

# Models of the table: parameters, GPUs per rollout instance, hidden size (for a rank-16 LoRA's size), source.
MODELS = {
    "7B": (7.62e9, 1, 3584, "Qwen2.5-7B config: 7.62B parameters; served at TP 1"),
    "70B": (70.6e9, 8, 8192, "Llama-3.1-70B config: 70.6B parameters; served at TP 8, one host"),
    "1T": (1.04e12, 16, 7168, "Kimi-K2 config: 1.04T parameters, FP8 targets sent as bf16; served on 16 GPUs"),
}
# The weight shapes (rows, columns) that hold most of each model's bytes: how FSDP's row shards meet the chunks.
SHAPES = {
    "7B": [(3584, 3584), (512, 3584), (512, 3584), (3584, 3584), (18944, 3584), (18944, 3584), (3584, 18944)],
    "70B": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192), (8192, 28672)],
    "1T": [(2048, 7168), (2048, 7168), (7168, 2048)],  # one routed expert: 384 per layer hold ~97% of Kimi-K2
}
SHAPES_SOURCE = "one decoder layer's attention and MLP (7B, 70B), one routed expert (1T), from their configs"
CHUNK_BYTES = 1 << 20  # the Publisher's default
FLEETS = [(8, 8), (64, 32), (256, 128)]  # (trainer GPUs, rollout hosts)
NICS = [100, 200, 400]
GPUS_PER_HOST = 8
LORA_RANK = 16  # the adapter: rank 16 on every linear layer, about 2 * rank / hidden of the weights
ASSUMED = {
    "h2d_gbps": Rate(
        25.0, "assumption: pageable host-to-GPU copy over PCIe Gen5 x16 (64 GB/s per direction, H100 datasheet), ~40%"
    ),
    "handoff_gbps": Rate(10.0, "assumption: one core's memcpy from the receiving process's staging to a worker's"),
    "fixed_s": Rate(0.01, "assumption: BeginUpdate and Commit round trips on a datacenter network"),
}
# Published figures, with their hardware (issue 26).
PUBLISHED = [
    ("checkpoint-engine (MoonshotAI)", "Kimi-K2 1T FP8", "256 H20, RDMA", "16-20 s"),
    ("Perplexity", "Kimi-K2 1T", "256 training GPUs to 128 inference GPUs, RDMA WRITE", "~1.3 s"),
    ("TRL", "Qwen3-0.6B", "1 H100, NCCL", "~0.18 s"),
]


def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((RESULTS / name).read_text())
    return loaded


def measured_rates(*, gpu: bool) -> Rates:
    """The per-byte costs the other benches measured here (AMD EPYC, 2 cores unless the file says else)."""
    bench = _load("bench.json")
    size = "256MiB"
    nbytes = bench["models"][size]["bytes"]
    cpu = bench["transfer"][size]["cpu"]
    per_gib = GIB / nbytes / 1e3  # ms per run -> s per GiB
    sent, bare_sent = cpu["weightsync"]["sender_ms"], cpu["grpc_bare"]["sender_ms"]
    relay, delta = _load("relay.json"), _load("delta.json")
    link = relay["model_bytes"] * 8 / relay["one"]["median_s"] / _bits(relay["link_rate"])
    sparse, dbytes = delta["sparse"], delta["config"]["bytes"]
    if gpu:
        h100 = _load("gpu_push_h100.json")["throughput"]
        swap = Rate(h100["median_swap_s"] / (h100["model_bytes"] / GIB), "gpu_push_h100.json median_swap_s (H100)")
    else:
        seconds = bench["transfer"][size]["weightsync"]["swap_seconds"]["median"]
        swap = Rate(seconds * GIB / nbytes, "bench.json weightsync swap_seconds (torch engine, CPU)")
    return Rates(
        exchange_cpu=_exchange_cpu(cpu["raw_tcp"], per_gib),
        encode_cpu=Rate(max(sent - bare_sent, 0.0) * per_gib, "bench.json cpu: weightsync sender_ms - grpc_bare's"),
        send_cpu=Rate(bare_sent * per_gib, "bench.json cpu: grpc_bare sender_ms"),
        receive_cpu=Rate(cpu["weightsync"]["receiver_ms"] * per_gib, "bench.json cpu: weightsync receiver_ms"),
        swap_s=swap,
        link_efficiency=Rate(min(link, 1.0), f"relay.json: one rollout at {relay['link_rate']}, goodput / rate"),
        relay_hop_s=Rate(
            max(
                (relay["relay"]["median_s"] - relay["one"]["median_s"]) / max(relay["rollouts"] - 1, 1)
                - (1 << 20) * 8 / _bits(relay["link_rate"]) / min(link, 1.0),
                0.0,
            ),
            "relay.json: (chain of 4 - one rollout) / 3 hops, less one 1 MiB chunk at the link's goodput",
        ),
        delta_ratio=Rate(sparse["bytes_ratio"]["median"], "delta.json sparse bytes_ratio (AdamW, lr 1e-6)"),
        diff_cpu=Rate(sparse["trainer_diff_s"]["median"] * GIB / dbytes, "delta.json sparse trainer_diff_s"),
        apply_cpu=Rate(sparse["rollout_apply_verify_s"]["median"] * GIB / dbytes, "delta.json rollout_apply_verify_s"),
        **ASSUMED,
    )


def _exchange_cpu(raw_tcp: dict[str, float], per_gib: float) -> Rate:
    """Trainer CPU per byte its ranks exchange: as the last validation measured it, else raw TCP's, both ends."""
    validation = RESULTS / "scale_validation.json"
    measured = json.loads(validation.read_text()).get("rates_same_run", {}) if validation.exists() else {}
    if "exchange_cpu" in measured:
        return Rate(measured["exchange_cpu"][0], "scale_validation.json rates_same_run: " + measured["exchange_cpu"][1])
    both = (raw_tcp["sender_ms"] + raw_tcp["receiver_ms"]) * per_gib
    return Rate(both, "assumption until --validate measures it: raw TCP's CPU, both ends (bench.json raw_tcp)")


def exchanged_fraction(
    shapes: Sequence[tuple[int, ...]], ranks: int, chunk_bytes: int = CHUNK_BYTES, *, repeat: int = 4
) -> float:
    """Of a collective push's bytes, those its ranks pass to another before sending (trainer_side/sharded/).

    Each tensor is sharded by rows over `ranks` as FSDP2's Shard(0) does (torch.chunk); chunks are cut from the
    full layout and sent by the rank that holds their first byte, so the rest of a chunk across a rank
    boundary is exchanged. Computed with the push's own plan over `shapes` laid out in bf16, `repeat` times
    over so that a few typical shapes start at several places within a chunk (1 for a whole model's shapes).
    """
    from trainer_side.sharded.plan import chunk_owners, spans_of
    from weightsync.manifest import wire_layout

    sources = [(f"t{i}", torch.empty(shape, device="meta")) for i, shape in enumerate([*shapes] * repeat)]
    layout = wire_layout(sources)
    rows: list[list[tuple[int, int, int]]] = [[] for _ in range(ranks)]
    for tensor, (_, t) in enumerate(sources):
        dim0 = t.shape[0] if t.dim() else 1
        each = -(-dim0 // ranks)
        for rank in range(ranks):
            first = min(dim0, rank * each)
            rows[rank].append((tensor, first, min(dim0, first + each) - first))
    chunks = chunk_owners(spans_of(layout, rows), layout.total_bytes, chunk_bytes)
    moved = sum(p.end - p.start for pieces in chunks for p in pieces if p.span.rank != pieces[0].span.rank)
    return moved / layout.total_bytes


@functools.cache
def _exchanged(model: str, ranks: int) -> float:
    return exchanged_fraction(SHAPES[model], ranks)


def _bits(rate: str) -> float:
    for suffix, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if rate.endswith(suffix):
            return float(rate[: -len(suffix)]) * scale
    raise ValueError(f"link rate {rate!r}")


def fleet(model: str, trainer_gpus: int, rollout_hosts: int, nic: float, **changes: Any) -> Fleet:
    params, gpus, hidden, _ = MODELS[model]
    return Fleet(
        model_bytes=params * 2,  # bf16 on the wire
        trainer_ranks=trainer_gpus,
        trainer_hosts=max(trainer_gpus // GPUS_PER_HOST, 1),
        rollouts=max(rollout_hosts * GPUS_PER_HOST // gpus, 1),
        gpus_per_rollout=gpus,
        rollout_hosts=rollout_hosts,
        nic_gbit=nic,
        adapter_ratio=2 * LORA_RANK / hidden,
        exchanged=_exchanged(model, trainer_gpus),
        **changes,
    )


def _cell(p: Prediction) -> str:
    return f"{p.seconds:,.1f} s ({p.bound})" if p.seconds >= 1 else f"{p.seconds:.2f} s ({p.bound})"


def table(rates: Rates) -> tuple[str, list[dict[str, Any]]]:
    """The users' table (markdown) and its rows (for the JSON)."""
    lines = [
        "| model | trainer GPUs -> rollout hosts (instances x GPUs) | NIC per host | full, one process per rollout "
        "| full, per-worker receive | full, per-worker, relay tree of 2 | delta, per-worker | adapter, per-worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for model in MODELS:
        for trainers, hosts in FLEETS:
            for nic in NICS:
                base = fleet(model, trainers, hosts, nic)
                cells = {
                    "process_full": predict(base, rates),
                    "worker_full": predict(replace(base, design="worker"), rates),
                    "worker_relay_full": predict(replace(base, design="worker", relay_fanout=2), rates),
                    "worker_delta": predict(replace(base, design="worker"), rates, "delta"),
                    "worker_adapter": predict(replace(base, design="worker"), rates, "adapter"),
                }
                where = f"{trainers} -> {hosts} ({base.rollouts} x {base.gpus_per_rollout})"
                lines.append(
                    f"| {model} | {where} | {nic} Gbit | " + " | ".join(_cell(p) for p in cells.values()) + " |"
                )
                rows.append(
                    {
                        "model": model,
                        "trainer_gpus": trainers,
                        "rollout_hosts": hosts,
                        "nic_gbit": nic,
                        "exchanged": base.exchanged,  # of the bytes, passed between trainer ranks first
                        **{k: {"seconds": p.seconds, "bound": p.bound, "phases": _phases(p)} for k, p in cells.items()},
                    }
                )
    inputs = ", ".join(f"{name} {rate.value:.3g}" for name, rate in vars(rates).items())
    lines += ["", f"Inputs (CPU in s per GiB on one core; sources in bench/results/scale.json): {inputs}."]
    lines += ["", "| published | model | hardware | update |", "|---|---|---|---|"]
    lines += [f"| {who} | {model} | {hw} | {t} |" for who, model, hw, t in PUBLISHED]
    return "\n".join(lines) + "\n", rows


def _phases(p: Prediction) -> list[dict[str, Any]]:
    return [asdict(phase) for phase in p.phases]


def twenty_seconds(rates: Rates) -> str:
    """Which design reaches 1T in 20 s on 400 Gbit hosts (256 trainer GPUs, 128 rollout hosts), at what cost."""
    base = fleet("1T", 256, 128, 400)
    out = []
    for design, relay in (("process", 0), ("worker", 0), ("worker", 2)):
        p = predict(replace(base, design=design, relay_fanout=relay), rates)
        over = [x for x in p.phases if x.streamed and x.seconds > 20]
        needs = "; ".join(
            f"{x.name} {x.seconds:,.0f} s: {x.seconds / 20:.1f}x its {x.bound} to fit in 20 s" for x in over
        )
        how = f"{design} design" + (f", relay tree of {relay}" if relay else ", direct fan-out")
        out.append(f"- 1T, 256 trainer GPUs -> 128 hosts at 400 Gbit, {how}: {p.seconds:,.0f} s. {needs or 'Fits.'}")
    return "\n".join(out) + "\n"


def headline(rates: Rates) -> str:
    smallest = predict(replace(fleet("7B", 8, 8, 100), design="process"), rates)
    big = predict(replace(fleet("70B", 64, 32, 200), design="process"), rates)
    huge = predict(replace(fleet("1T", 256, 128, 400), design="worker"), rates)
    validation = RESULTS / "scale_validation.json"
    checked = "not yet validated"
    if validation.exists():
        v = json.loads(validation.read_text())
        checked = f"{v['within']} of {len(v['cases'])} of this machine's runs predicted within {v['tolerance']:.0%}"
    return (
        f"- At scale (modelled by `python -m bench.scale` from rates measured here; {checked}: "
        f"[table](docs/benchmarks.md#at-cluster-scale)): a 7B full update to 8 rollout hosts at 100 Gbit "
        f"{smallest.seconds:.1f} s ({smallest.bound}); 70B, 64 trainer GPUs to 32 hosts at 200 Gbit, "
        f"{big.seconds:.0f} s ({big.bound}); 1T, 256 to 128 hosts at 400 Gbit with per-worker receive, "
        f"{huge.seconds:.0f} s ({huge.bound}), against checkpoint-engine's 16-20 s over RDMA.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--validate", action="store_true", help="predict and measure this machine's runs")
    parser.add_argument("--quick", action="store_true", help="with --validate: fewer cases, one run each")
    parser.add_argument(
        "--rescore", action="store_true", help="with --validate: predict the committed run's measurements again"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md and README.md")
    args = parser.parse_args(argv)
    if args.validate:
        from bench import scale_validate

        if args.rescore:
            return scale_validate.rescore(docs=not args.no_docs)
        return scale_validate.main(quick=args.quick, docs=not args.no_docs)
    rates = measured_rates(gpu=True)
    text, rows = table(rates)
    design = twenty_seconds(rates)
    print(text)
    print(design)
    out = {"rates": rates.sources(), "assumptions": {k: v.source for k, v in ASSUMED.items()}, "rows": rows}
    out["models"] = {k: v[3] for k, v in MODELS.items()}
    out["shapes"] = {"source": SHAPES_SOURCE, **SHAPES}  # what `exchanged` in each row was computed from
    (RESULTS / "scale.json").write_text(json.dumps(out, indent=1) + "\n")
    if not args.no_docs:
        report.update_readme(ROOT / "docs" / "benchmarks.md", text + "\n" + design, *TABLE)
        report.update_readme(ROOT / "README.md", headline(rates), *HEADLINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
