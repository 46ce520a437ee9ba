"""vLLM's EngineCore process forked from a pre-warmed server instead of a fresh interpreter (CPU builds).

vLLM's CPU platform starts EngineCore with multiprocessing's "spawn": a new interpreter that imports
vLLM and torch again (about 5 s on two cores) after the rollout process has finished importing them
itself, so the two imports run one after the other. Here a fork server is started at launch and imports
EngineCore's modules on the other core while the rollout imports its own; EngineCore is then forked from
it, ready at once. The fork server is single-threaded and has run nothing but imports, which is what
makes forking it safe where forking the rollout (gRPC threads, OpenMP) would not be.

vLLM sets environment variables for its child just before starting it; a fork server's children would
otherwise see the server's environment from when it started, so each child takes its parent's at start().
GPU builds fork EngineCore already (vLLM's default there) and are left alone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing import context, forkserver
from typing import Any

__all__ = ["OFF_ENV", "install", "running", "start"]

logger = logging.getLogger(__name__)

# What EngineCore imports before it can build the model: done in the fork server, once.
OFF_ENV = "WEIGHTSYNC_VLLM_PREWARM"  # "0": vLLM's own spawn (bench.vllm_boot measures the difference)
PRELOAD = ["vllm.v1.engine.core", "vllm.v1.executor.uniproc_executor", "vllm.v1.worker.cpu_worker"]


class _Process(context.ForkServerProcess):
    """A fork-server child that runs with its parent's environment as of start(), not the server's, and
    exits when that parent is gone (killed, say): its own parent is the fork server, which outlives it."""

    _environ: dict[str, str]
    _owner: int

    def start(self) -> None:
        self._environ, self._owner = dict(os.environ), os.getpid()
        super().start()

    def run(self) -> None:
        os.environ.clear()
        os.environ.update(self._environ)
        threading.Thread(target=_exit_without, args=(self._owner,), name="owner-watch", daemon=True).start()
        super().run()


def _exit_without(owner: int) -> None:
    """Ends this process (as SIGTERM would) once `owner` has exited."""
    while running(owner):
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def running(pid: int) -> bool:
    """Whether `pid` runs: exists and is not a zombie (exited, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:
        return True  # no /proc: existing is all we can tell


class _Context(context.ForkServerContext):
    Process = _Process


_context = _Context()
_started: threading.Thread | None = None


def start() -> None:
    """Starts the fork server and its imports in the background (call early, once the environment is set)."""
    global _started
    if _started is not None or os.environ.get(OFF_ENV) == "0":
        return
    _context.set_forkserver_preload(PRELOAD)
    _started = threading.Thread(target=forkserver.ensure_running, name="vllm-prewarm", daemon=True)
    _started.start()


def install() -> bool:
    """Makes vLLM start EngineCore from the fork server; False (vLLM's own start) if its layout differs."""
    if _started is None:
        return False
    try:
        from vllm.v1.engine import utils
    except ImportError:
        return False
    if not callable(getattr(utils, "get_mp_context", None)):
        logger.warning("this vLLM starts EngineCore differently: not using the pre-warmed fork server")
        return False
    _started.join()

    def get_mp_context() -> Any:
        return _context

    utils.get_mp_context = get_mp_context
    return True
