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

However it was started, EngineCore exits when its rollout is gone (`watch_owner`): vLLM's own does not
notice (a spawned one was still running 48 s after a SIGKILL of its rollout), and on a GPU an orphan
holds the memory the restarted rollout needs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing import context, forkserver
from typing import Any

__all__ = ["OFF_ENV", "OWNER_ENV", "install", "own_engine_processes", "running", "start", "watch_owner"]

logger = logging.getLogger(__name__)

# What EngineCore imports before it can build the model: done in the fork server, once.
OFF_ENV = "WEIGHTSYNC_VLLM_PREWARM"  # "0": vLLM's own spawn (bench.vllm_boot measures the difference)
OWNER_ENV = "WEIGHTSYNC_ENGINE_OWNER"  # the rollout's pid, set before vLLM starts EngineCore
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
        _watch(self._owner)
        super().run()


def own_engine_processes() -> None:
    """Called in the rollout before vLLM starts EngineCore: names this process its owner, for all three
    ways it may start (forked by vLLM, as on GPUs; spawned; from the fork server)."""
    global _hooked
    os.environ[OWNER_ENV] = str(os.getpid())
    if not _hooked:
        os.register_at_fork(after_in_child=watch_owner)  # a forked child loads no plugin: vLLM did already
        _hooked = True


def watch_owner() -> None:
    """In a process vLLM started for the rollout named by OWNER_ENV, exits once that rollout is gone.

    Runs in a child the rollout forked, and from weightsync's vLLM plugin (vllm_plugin.py), which vLLM
    loads in every process it spawns; in the rollout itself it does nothing.
    """
    owner = os.environ.get(OWNER_ENV, "")
    if owner.isdigit():
        _watch(int(owner))


_hooked = False
_watched: int | None = None


def _watch(owner: int) -> None:
    global _watched
    if _watched is None and owner != os.getpid():
        _watched = owner
        threading.Thread(target=_exit_without, args=(owner,), name="owner-watch", daemon=True).start()


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
