"""bench/measure.py: the CPU time the benchmarks report is what the process really used."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.measure import cpu_seconds


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_seconds_counts_this_process_busy_and_not_asleep() -> None:
    before = cpu_seconds()
    _spin(0.3)
    busy = cpu_seconds() - before
    before = cpu_seconds()
    time.sleep(0.3)
    asleep = cpu_seconds() - before
    assert 0.2 <= busy <= 0.6, busy
    assert asleep <= 0.05, asleep


def test_cpu_seconds_of_another_process_includes_its_threads() -> None:
    code = (
        "import threading,time\n"
        + "def spin():\n    end=time.thread_time()+0.3\n    while time.thread_time()<end: pass\n"
    )
    code += "ts=[threading.Thread(target=spin) for _ in range(2)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
    code += "import sys; sys.stdout.write('done\\n'); sys.stdout.flush(); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        assert cpu_seconds(child.pid) >= 0.5  # two threads, 0.3 s each
    finally:
        child.kill()
        child.wait()
