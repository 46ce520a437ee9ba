"""Finding rollouts: a static list, or a DNS name that resolves to many (a Kubernetes headless Service).

`resolve("dns:weightsync-rollout.weightsync.svc:50051")` returns one HOST:PORT per address the name
has now. A headless Service with publishNotReadyAddresses lists rollouts before they are ready,
which is what a trainer needs: they only become ready once it has pushed to them.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer_side.publisher import Publisher

__all__ = ["Watcher", "follow", "resolve"]

logger = logging.getLogger(__name__)

DNS_PREFIX = "dns:"


def resolve(target: str) -> list[str]:
    """HOST:PORT addresses for `target`: "h:p,h:p" as given, or "dns:NAME:PORT" resolved now (sorted)."""
    if not target.startswith(DNS_PREFIX):
        return [a for a in target.split(",") if a]
    name, _, port = target[len(DNS_PREFIX) :].lstrip("/").rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"{target!r}: expected dns:NAME:PORT")
    try:
        infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        logger.warning("cannot resolve %s: %s", name, error)
        return []
    hosts = sorted({str(info[4][0]) for info in infos})  # an IP address; typeshed allows any sockaddr
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts]


class Watcher:
    """Re-resolves `target` every `interval` seconds and reports who joined and who left.

    `on_change(joined, left)` runs on the watcher's thread, once at start with every rollout found.
    """

    def __init__(
        self,
        target: str,
        on_change: Callable[[list[str], list[str]], None],
        *,
        interval: float = 10.0,
        resolver: Callable[[str], list[str]] = resolve,
        known: Sequence[str] = (),
    ) -> None:
        self.target = target
        self.interval = interval
        self._on_change = on_change
        self._resolve = resolver
        self._known = list(known)  # changes are reported against this
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-discovery", daemon=True)

    @property
    def rollouts(self) -> list[str]:
        return list(self._known)

    def start(self) -> Watcher:
        self.poll()
        self._thread.start()
        return self

    def poll(self) -> None:
        """Resolves once and reports the difference; errors keep the last known list."""
        found = self._resolve(self.target)
        if not found and self._known:
            logger.warning("%s resolved to nothing; keeping %d known rollout(s)", self.target, len(self._known))
            return
        joined = [a for a in found if a not in self._known]
        left = [a for a in self._known if a not in found]
        self._known = found
        if joined or left:
            logger.info("rollouts: %d joined, %d left (%d now)", len(joined), len(left), len(found))
            self._on_change(joined, left)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:
                logger.exception("rollout discovery failed; retrying in %.0f s", self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)


def follow(
    publisher: Publisher,
    target: str,
    *,
    interval: float = 10.0,
    resolver: Callable[[str], list[str]] = resolve,
) -> Watcher:
    """Keeps `publisher`'s rollouts equal to what `target` resolves to, syncing newcomers at once.

    Newcomers get the latest version through `Publisher.reconcile` (needs `delta=True`, which keeps
    it); rollouts that are gone are dropped. Returns the started watcher; `stop()` it when done.
    """

    def changed(joined: list[str], left: list[str]) -> None:
        publisher.set_rollouts(joined, left)
        if joined:
            publisher.reconcile()

    return Watcher(target, changed, interval=interval, resolver=resolver, known=publisher.rollouts).start()
