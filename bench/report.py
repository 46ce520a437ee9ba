"""Turns bench results into a PNG and the README's markdown table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["markdown", "plot", "update_readme"]

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MiB = 1 << 20

# (key in results["transfer"][size], label)
ROWS = [
    ("raw_tcp", "raw TCP loopback (`sendall` / `recv_into` a preallocated buffer)"),
    ("weightsync", "**weightsync** full sync, gRPC over TCP, torch engine"),
    ("raw_uds", "raw Unix domain socket"),
    ("weightsync_uds", "weightsync over a Unix domain socket (own row)"),
    ("weightsync_shm", "weightsync through a shared-memory file, co-located pods (own row)"),
    ("gloo", "torch.distributed gloo send/recv"),
    ("grpc_naive", "naive gRPC stream, generated protobuf, 1 MiB chunks"),
    (
        "grpc_bare",
        "gRPC alone, beside each push: 1 MiB messages encoded beforehand, received and dropped (no checks, no staging)",
    ),
    ("safetensors_shm", "safetensors file through /dev/shm"),
    ("safetensors_disk", "safetensors file through disk (fsync, cold read)"),
]


def _rate(entry: dict[str, Any]) -> dict[str, Any]:
    """A row's GB/s summary: weightsync rows nest it under "gbps"."""
    return entry["gbps"] if "gbps" in entry else entry


def _fmt(s: dict[str, Any], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    sizes = list(results["transfer"])
    runs = results["config"]["runs"]
    machine = results["machine"]
    lines = [
        f"Median of {runs} runs after {results['config']['warmup']} warm-up runs (min-max); GB/s = 1e9 bytes/s. "
        f"{machine['cores']} cores ({machine['cpu']}), torch {machine['torch']}, grpcio {machine['grpcio']}, "
        f"{machine['date']}. The weightsync row's ratios are per run, against the raw TCP run just before it; "
        "other rows give the ratio of medians.",
        "",
        "| path | " + " | ".join(f"{s} GB/s | ratio to TCP" for s in sizes) + " |",
        "|---|" + "---:|---:|" * len(sizes),
    ]
    for key, label in ROWS:
        cells = []
        for size in sizes:
            entry = results["transfer"][size].get(key)
            if entry is None:
                cells += ["", ""]
                continue
            tcp = results["transfer"][size]["raw_tcp"]["median"]
            # weightsync over TCP: per-run ratios to the TCP run beside it; other rows: medians' ratio.
            ratio = _fmt(entry["ratio"]) if key == "weightsync" else f"{_rate(entry)['median'] / tcp:.2f}"
            cells += [_fmt(_rate(entry)), ratio]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += _cpu_table(results)
    if "fanout" in results:
        lines += [
            "",
            f"Fan-out, {results['fanout_model']} model, one trainer to N rollouts at once (aggregate GB/s):",
            "",
            "| rollouts | weightsync | raw TCP to N receivers | ratio | through shared memory (own column) | ratio |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        shm = results.get("fanout_shm", {})
        for count, entry in results["fanout"].items():
            row = f"| {count} | {_fmt(entry['gbps'])} | {_fmt(entry['socket_gbps'])} | {_fmt(entry['ratio'])} |"
            other = shm.get(count)
            row += f" {_fmt(other['gbps'])} | {_fmt(other['ratio'])} |" if other else " | |"
            lines.append(row)
    lines += [
        "",
        "Memory and commit (single rollout; the swap pause itself: bench.verify):",
        "",
        "| model | rollout peak RSS during syncs | bound 2 x model + 256 MiB | runtime alone | "
        "peak minus runtime | trainer RSS added by pushes | commit to serving | commit / sync time | "
        "verification (in the commit) | verification / push time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runtime = results.get("runtime_rss", 0)
    for size in sizes:
        ws = results["transfer"][size]["weightsync"]
        swap_ms = {k: v * 1e3 for k, v in _num(ws["swap_seconds"]).items()}
        lines.append(
            f"| {size} | {ws['rollout_peak_rss'] / MiB:.0f} MiB | {ws['rss_bound'] / MiB:.0f} MiB | "
            f"{runtime / MiB:.0f} MiB | {(ws['rollout_peak_rss'] - runtime) / MiB:.0f} MiB | "
            f"{ws['trainer_rss_added'] / MiB:.0f} MiB | {_fmt(swap_ms, 1)} ms | "
            f"{_fmt(ws['swap_pct'], 1)} % | {_verify_cell(ws)} |"
        )
    if results.get("sweep"):
        lines += [
            "",
            f"Chunk size x parallel streams per rollout ({next(iter(results['transfer']))}, one rollout):",
            "",
            "| chunk | streams | GB/s | ratio to TCP |",
            "|---:|---:|---:|---:|",
        ]
        for row in results["sweep"]:
            lines.append(
                f"| {row['chunk_bytes'] >> 10} KiB | {row['streams']} | {_fmt(row['gbps'])} | {_fmt(row['ratio'])} |"
            )
    return "\n".join(lines) + "\n"


CPU_ROWS = [
    ("raw_tcp", "raw TCP loopback"),
    ("grpc_bare", "gRPC alone, beside each push (no checks, no staging)"),
    ("weightsync", "**weightsync** over TCP"),
    ("weightsync_shm", "weightsync through a shared-memory file"),
]


def _cpu_table(results: dict[str, Any]) -> list[str]:
    """What each path costs in CPU time, beside the wall time it took (one receiver)."""
    sizes = [s for s in results["transfer"] if "cpu" in results["transfer"][s]]
    if not sizes:
        return []
    lines = [
        "",
        "CPU time per transfer, one receiver (mean ms of user + system time over every thread of each process): "
        "with both cores busy, wall time is at least (sender + receiver) / cores.",
        "",
        "| path | " + " | ".join(f"{s}: sender | receiver | wall" for s in sizes) + " |",
        "|---|" + "---:|---:|---:|" * len(sizes),
    ]
    for key, label in CPU_ROWS:
        cells = []
        for size in sizes:
            transfer = results["transfer"][size]
            cpu, entry = transfer["cpu"].get(key), transfer.get(key)
            if cpu is None or entry is None:
                cells += ["", "", ""]
                continue
            wall_ms = 1e3 * results["models"][size]["bytes"] / (_rate(entry)["median"] * 1e9)
            cells += [f"{cpu['sender_ms']:.0f} ms", f"{cpu['receiver_ms']:.0f} ms", f"{wall_ms:.0f} ms"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *(_cpu_ratios(size, results["transfer"][size]["cpu"]) for size in sizes)]
    return lines


def _cpu_ratios(size: str, cpu: dict[str, Any]) -> str:
    """weightsync's CPU, both sides together, against gRPC alone's and raw TCP's in the same run (issue 26)."""

    def both(key: str) -> float:
        return float(cpu[key]["sender_ms"] + cpu[key]["receiver_ms"]) if key in cpu else float("nan")

    ours = both("weightsync")
    return (
        f"- {size}: weightsync's CPU, both sides, {ours:.0f} ms = {ours / both('grpc_bare'):.2f}x gRPC alone's "
        f"(goal: at most 1.25x) and {ours / both('raw_tcp'):.2f}x raw TCP's; gRPC alone is "
        f"{both('grpc_bare') / both('raw_tcp'):.2f}x raw TCP's (each push beside both, run by run)."
    )


def _num(s: dict[str, Any]) -> dict[str, float]:
    return {k: s[k] for k in ("median", "min", "max")}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["transfer"])
    panels = 2 if "fanout" in results else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 2, 4.2), squeeze=False)
    ax = axes[0][0]
    keys = [k for k, _ in ROWS]
    width = 0.8 / len(sizes)
    for i, size in enumerate(sizes):
        meds, lows, highs = [], [], []
        for key in keys:
            entry = results["transfer"][size].get(key)
            s = _rate(entry) if entry else {"median": 0, "min": 0, "max": 0}
            meds.append(s["median"])
            lows.append(s["median"] - s["min"])
            highs.append(s["max"] - s["median"])
        xs = [k + i * width for k in range(len(keys))]
        ax.bar(xs, meds, width, yerr=[lows, highs], capsize=2, label=size)
    ax.set_xticks([k + width * (len(sizes) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("GB/s (median, min-max)")
    ax.set_title("sender tensors -> receiver memory, one host")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        counts = list(results["fanout"])
        bars = [("fanout", "gbps", "weightsync"), ("fanout", "socket_gbps", "raw TCP")]
        if "fanout_shm" in results:
            bars.append(("fanout_shm", "gbps", "shared memory"))
        width = 0.8 / len(bars)
        for j, (block, field, label) in enumerate(bars):
            s = [results[block][c][field] for c in counts]
            ax.bar(
                [k + j * width for k in range(len(counts))],
                [x["median"] for x in s],
                width,
                yerr=[[x["median"] - x["min"] for x in s], [x["max"] - x["median"] for x in s]],
                capsize=2,
                label=label,
            )
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(counts))])
        ax.set_xticklabels([f"{c} rollout(s)" for c in counts])
        ax.set_ylabel("aggregate GB/s")
        ax.set_title(f"fan-out, {results['fanout_model']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def update_readme(readme: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the text between the `begin` and `end` markers (the file must already hold them)."""
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {begin} ... {end} block; add it where the table goes first")
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{table}{end}", text))


def _verify_cell(ws: dict[str, Any]) -> str:
    """Installed-weight verification time and its share of the push (results from before it show "-")."""
    if "verify_seconds" not in ws:
        return "- | -"
    verify_ms = {k: v * 1e3 for k, v in _num(ws["verify_seconds"]).items()}
    return f"{_fmt(verify_ms, 1)} ms | {_fmt(ws['verify_pct'], 1)} %"
