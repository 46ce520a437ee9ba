"""Finding rollouts: a static list, or a DNS name that resolves to many (a Kubernetes headless Service).

`resolve("dns:weightsync-rollout.weightsync.svc:50051")` returns one HOST:PORT per address the name
has now. A headless Service with publishNotReadyAddresses lists rollouts before they are ready,
which is what a trainer needs: they only become ready once it has pushed to them. It lists them even
before they listen; `follow` keeps trying those until they do, so each is pushed to the moment it can be.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from weightsync.channel import listening

if TYPE_CHECKING:
    from trainer_side.publisher import Publisher

__all__ = ["Follower", "Watcher", "follow", "resolve"]

logger = logging.getLogger(__name__)

DNS_PREFIX = "dns:"
# A newcomer is listed in DNS once its pod has an IP, seconds before its rollout listens (it imports
# vLLM first) and accepts a push while its engine boots: look again this often, a TCP connect per look.
RETRY_EVERY = 0.5
GIVE_UP_AFTER = 600.0  # seconds a newcomer may take to listen: a GPU pod's image pull and boot, generously


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


class Follower(Watcher):
    """A Watcher that keeps a publisher's rollouts equal to what `target` resolves to (see `follow`).

    Newcomers wait in `waiting` until one reconcile round has read their status; a thread of their own
    looks at them every RETRY_EVERY seconds, so a slow one delays neither the poll nor the others.
    """

    def __init__(
        self,
        publisher: Publisher,
        target: str,
        *,
        interval: float = 10.0,
        resolver: Callable[[str], list[str]] = resolve,
    ) -> None:
        super().__init__(target, self._changed, interval=interval, resolver=resolver, known=publisher.rollouts)
        self._publisher = publisher
        self._since: dict[str, float] = {}  # newcomer -> when it joined (monotonic)
        self._since_lock = threading.Lock()  # the watcher's thread adds and drops, the newcomers' thread looks
        self._wake = threading.Event()  # set by a join (look now) and by stop()
        self._newcomers = threading.Thread(target=self._retry, name="rollout-newcomers", daemon=True)

    @property
    def waiting(self) -> list[str]:
        """Newcomers whose status no reconcile round has read yet."""
        with self._since_lock:
            return list(self._since)

    def start(self) -> Follower:
        self._newcomers.start()
        super().start()
        return self

    def _changed(self, joined: list[str], left: list[str]) -> None:
        self._publisher.set_rollouts(joined, left)
        now = time.monotonic()
        with self._since_lock:
            for address in left:
                self._since.pop(address, None)
            self._since |= {address: now for address in joined}
        if joined:
            self._wake.set()

    def _retry(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(RETRY_EVERY)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._look()
            except Exception:
                logger.exception("syncing newcomers failed; retrying in %.1f s", RETRY_EVERY)

    def _look(self) -> None:
        """Reconciles once if a waiting newcomer listens; stops waiting for those it reached or gave up on."""
        with self._since_lock:
            since = dict(self._since)
        now = time.monotonic()
        expired = [a for a, joined in since.items() if now - joined > GIVE_UP_AFTER]
        for address in expired:
            logger.warning(
                "%s never answered in %.0f s; the next push or reconcile round tries it again", address, GIVE_UP_AFTER
            )
        ready = [a for a in since if a not in expired and listening(a, timeout=RETRY_EVERY)]
        missed: list[str] = []
        if ready:
            for result in self._publisher.reconcile(unreachable=missed):
                (logger.info if result.ok else logger.warning)("newcomer: %s", result.line())
        with self._since_lock:
            for address in [*expired, *(a for a in ready if a not in missed)]:
                if self._since.get(address) == since[address]:  # not one that left and joined again meanwhile
                    del self._since[address]

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        super().stop()
        if self._newcomers.is_alive():
            self._newcomers.join(RETRY_EVERY + 5)


def follow(
    publisher: Publisher,
    target: str,
    *,
    interval: float = 10.0,
    resolver: Callable[[str], list[str]] = resolve,
) -> Follower:
    """Keeps `publisher`'s rollouts equal to what `target` resolves to, syncing newcomers at once.

    Newcomers get the latest version through `Publisher.reconcile` (needs `delta=True`, which keeps
    it) as soon as they listen: one that joined before it listened is looked at every RETRY_EVERY
    seconds until it answers, leaves, or GIVE_UP_AFTER passes. Rollouts that are gone are dropped.
    Returns the started follower; `stop()` it when done.
    """
    return Follower(publisher, target, interval=interval, resolver=resolver).start()
