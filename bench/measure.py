"""Summaries of repeated runs, and what processes use: resident memory (peak and current) and CPU time."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

__all__ = ["GB", "Cpu", "MiB", "cpu_seconds", "page_faults", "peak_rss", "reset_peak_rss", "rss", "summary"]

GB = 1e9
MiB = 1 << 20


def summary(samples: Sequence[float]) -> dict[str, object]:
    """Median, min and max of measured runs (warm-up runs are never passed in)."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
        "samples": [round(s, 6) for s in samples],
    }


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces): state is [0]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time (user + system, every thread) a process has used so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def page_faults(pid: int | str = "self") -> int:
    """Minor page faults so far: pages mapped fresh. On this VM their cost moves with the host (docs/benchmarks.md)."""
    return int(_stat(pid)[7])  # minflt


@dataclass
class Cpu:
    """CPU seconds per measured run of the sending and the receiving processes (all of them together).

    On a machine whose cores are all busy during a transfer, wall time is at least their sum divided by
    the cores: the figure that says what a transfer costs beside how fast it went.
    """

    sender: list[float] = field(default_factory=list)
    receiver: list[float] = field(default_factory=list)


def _status_kib(pid: int | str, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss(pid: int | str = "self") -> int:
    """Resident bytes now."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident bytes since start or since the last `reset_peak_rss`."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Resets VmHWM to the current RSS (Linux 4.0+; another process needs the same user or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine() -> dict[str, object]:
    """What the figures were measured on, for the JSON next to them."""
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_before": os.getloadavg()[0],
    }
