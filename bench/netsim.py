"""A simulated cluster on one machine: network namespaces on a bridge, each host's link rate-limited.

Host 0 is the trainer, hosts 1..N the rollouts. Every host reaches the others through its own veth
link, shaped with tc (token bucket) in both directions, so a host's link, as in a real cluster, is
what bounds how fast it can send or receive. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence

__all__ = ["Cluster", "unavailable_reason"]

SUBNET = "10.77.{}.{}"


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"wsprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine does not allow network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Cluster:
    """`hosts` namespaces on one bridge; `rate` (e.g. "200mbit") caps each host's link each way."""

    def __init__(self, hosts: int, rate: str) -> None:
        tag = uuid.uuid4().hex[:5]
        self.prefix = f"ws{tag}"
        self.subnet = int(tag, 16) % 200 + 20
        self.rate = rate
        self.namespaces = [f"{self.prefix}h{i}" for i in range(hosts)]
        self.switch = f"{self.prefix}sw"
        self.addresses = [SUBNET.format(self.subnet, 10 + i) for i in range(hosts)]

    def __enter__(self) -> Cluster:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _up(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            _ip("netns", "add", ns)
            host_if, switch_if = f"{self.prefix}h{i}", f"{self.prefix}s{i}"
            _ip("link", "add", host_if, "type", "veth", "peer", "name", switch_if)
            _ip("link", "set", host_if, "netns", ns, "name", "eth0")
            _ip("link", "set", switch_if, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", switch_if, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # Shape both directions of the host's link: its egress, and the switch port's egress to it.
            for where, dev in ((ns, "eth0"), (self.switch, switch_if)):
                _run(["tc", "-n", where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                      "burst", f"{burst_bytes(self.rate)}b", "latency", "100ms"])  # fmt: skip

    def down(self) -> None:
        for ns in [*self.namespaces, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """`argv` run inside host `host`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def sent_bytes(self, host: int) -> int:
        """Bytes host `host` has sent on its link so far."""
        out = _run(["ip", "-n", self.namespaces[host], "-s", "-j", "link", "show", "eth0"])
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def burst_bytes(rate: str) -> int:
    """A token bucket deep enough for 2 ms at `rate` (at least 256 KiB): shallower ones undershoot fast links."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1}
    for suffix, scale in units.items():
        if rate.endswith(suffix):
            return max(256 << 10, int(float(rate[: -len(suffix)]) * scale / 8 * 0.002))
    raise ValueError(f"rate {rate!r}: give it in bit, kbit, mbit or gbit, e.g. 10gbit")
