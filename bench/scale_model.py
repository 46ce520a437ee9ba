"""The scale model's arithmetic: how long one update takes on a fleet, phase by phase, and what bounds it.

Pure functions over two inputs: `Rates` (per-byte costs measured on this machine by the other benches,
and the few stated assumptions this machine cannot measure, each with its source) and `Fleet` (the
model, the trainer's ranks and hosts, the rollouts, each host's NIC and cores, the relay fan-out).

A push streams: the trainer encodes a chunk while earlier ones cross the network and the rollout checks
and stages them, so the streamed phases overlap and the slowest one sets the pace (its "bound"). Then
come the phases that wait for the last byte: the load onto the GPUs and the swap. One process runs on
one core (Python's GIL; measured: more streams per rollout were slower on 2 cores), so a process that
must touch every byte is bounded by its CPU per byte however many cores its host has.

Two rollout designs: "process" (today's: one process per rollout receives every byte, then hands each TP
worker its shard) and "worker" (each TP worker receives its own shard over its own stream, as vLLM
0.33's m2n engine does over NCCL).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["GIB", "Fleet", "Phase", "Prediction", "Rate", "Rates", "predict"]

GIB = 1 << 30
Design = Literal["process", "worker"]
Kind = Literal["full", "delta", "adapter"]


@dataclass(frozen=True, slots=True)
class Rate:
    """One input: its value and where it comes from (a results file and field, or a stated assumption)."""

    value: float
    source: str


@dataclass(frozen=True, kw_only=True)
class Rates:
    """Per-byte costs. CPU figures are seconds per GiB on one core of the machine that measured them."""

    encode_cpu: Rate  # trainer, once per byte: cast, hash, encode into chunk messages
    send_cpu: Rate  # trainer, per byte per destination: gRPC's send
    exchange_cpu: Rate  # trainer, per byte one rank passes to another for a chunk it sends (gloo, both ends)
    receive_cpu: Rate  # rollout, per byte received: gRPC's receive, chunk check, staging copy, verify
    swap_s: Rate  # the swap at commit, seconds per GiB a process holds
    link_efficiency: Rate  # goodput / link rate on a capped link (TCP/IP and gRPC framing)
    relay_hop_s: Rate  # seconds each relay hop adds to a chain beyond forwarding its last chunk
    delta_ratio: Rate  # wire bytes / model bytes of a delta (sparse fine-tuning step)
    diff_cpu: Rate  # trainer, per model byte: the delta's diff against its base
    apply_cpu: Rate  # rollout, per model byte: a delta's patch applied and the result verified
    h2d_gbps: Rate  # host to GPU copy, GB/s per GPU
    handoff_gbps: Rate  # "process" design: host memory copy from the receiving process to a TP worker, GB/s
    fixed_s: Rate  # per update: handshake, commit round trips

    def cpu_per_byte(self, name: str) -> float:
        rate: Rate = getattr(self, name)
        return rate.value / GIB

    def sources(self) -> dict[str, tuple[float, str]]:
        return {name: (getattr(self, name).value, getattr(self, name).source) for name in self.__dataclass_fields__}


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """One deployment. `nic_gbit` None: no link cap (loopback); `shared_cores`: every process of the fleet
    shares that many cores (this machine: the cores a run could get, measured, when other work shares them),
    else each host has `cores` of its own."""

    model_bytes: float
    trainer_ranks: int
    trainer_hosts: int = 1
    rollouts: int = 1  # instances
    gpus_per_rollout: int = 1  # its TP (x PP) workers
    rollout_hosts: int = 1
    nic_gbit: float | None = None
    cores: int = 96
    shared_cores: float | None = None
    relay_fanout: int = 0  # 0: the trainer sends to every rollout; k: a relay tree of fan-out k (1 = a chain)
    design: Design = "process"
    adapter_ratio: float = 0.0  # adapter bytes / model bytes, for kind="adapter"
    gpu: bool = True  # False: a CPU engine (this machine), no host-to-GPU load
    chunk_bytes: int = 1 << 20  # a relay forwards a chunk once all of it has arrived
    link_burst_bytes: int = 0  # what a link passes before its rate applies: the simulated cluster's token bucket
    # Of the wire bytes, those the ranks pass to the rank that sends their chunk: a collective push cuts chunks
    # from the full layout, so a chunk across a rank boundary is gathered first (bench.scale.exchanged_fraction).
    exchanged: float = 0.0


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    seconds: float
    bound: str  # what sets it: "trainer NIC", "rollout CPU per byte", ...
    streamed: bool  # overlaps the others of its kind (the slowest sets the pace)


@dataclass(frozen=True)
class Prediction:
    fleet: Fleet
    kind: Kind
    phases: list[Phase] = field(default_factory=list)

    @property
    def streaming(self) -> Phase:
        """The streamed phase that sets the pace."""
        return max((p for p in self.phases if p.streamed), key=lambda p: p.seconds)

    @property
    def seconds(self) -> float:
        return self.streaming.seconds + sum(p.seconds for p in self.phases if not p.streamed)

    @property
    def bound(self) -> str:
        return self.streaming.bound


def predict(fleet: Fleet, rates: Rates, kind: Kind = "full") -> Prediction:
    """The phases of one `kind` update of `fleet`, each with the seconds its bound allows."""
    whole = fleet.model_bytes
    wire = {"full": whole, "delta": whole * rates.delta_ratio.value, "adapter": whole * fleet.adapter_ratio}[kind]
    if kind == "adapter":
        fleet = replace(fleet, model_bytes=wire)  # an adapter is a small full version of its own
        whole = wire
    f = fleet
    workers = f.gpus_per_rollout if f.design == "worker" else 1  # receiving processes per rollout
    relayed = f.relay_fanout > 0 and f.rollouts > 1
    destinations = 1 if relayed else f.rollouts  # rollouts the trainer sends to itself
    per_rank = wire / f.trainer_ranks
    phases: list[Phase] = []

    # Trainer: each rank encodes its share once, after gathering the other ranks' bytes of its chunks, and sends
    # it to every destination; one core per rank.
    encode = (
        per_rank * rates.cpu_per_byte("encode_cpu")
        + per_rank * f.exchanged * rates.cpu_per_byte("exchange_cpu")
        + per_rank * destinations * rates.cpu_per_byte("send_cpu")
    )
    if kind == "delta":
        # Every tensor is diffed before the first patch goes out (trainer_side/base_store.py): not streamed.
        diff = whole / f.trainer_ranks * rates.cpu_per_byte("diff_cpu")
        phases.append(Phase("trainer diff", diff, "trainer CPU per byte", False))
    phases.append(Phase("trainer encode + send", encode, "trainer CPU per byte", True))

    # Network: every host's NIC carries what leaves and what enters it; relays forward to k children.
    link = f.nic_gbit * 1e9 / 8 * rates.link_efficiency.value if f.nic_gbit is not None else 0.0

    def crossing(nbytes: float) -> float:
        """Seconds for `nbytes` to cross a link that starts idle."""
        return max(nbytes - f.link_burst_bytes, 0.0) / link

    if link:
        out = wire / f.trainer_hosts * destinations
        phases.append(Phase("trainer NIC", crossing(out), "trainer NIC", True))
        per_host = wire * f.rollouts / f.rollout_hosts  # every rollout holds every byte
        if f.design == "process":  # one host of a rollout takes all of its bytes, however many hosts it spans
            per_host = max(per_host, wire)
        if relayed:
            children = min(f.relay_fanout, f.rollouts - 1)
            phases.append(Phase("relay NIC", crossing(wire * children), "relay NIC (forwarding)", True))
        phases.append(Phase("rollout NIC", crossing(per_host), "rollout NIC", True))

    # Rollout: each receiving process checks and stages its bytes on one core.
    mine = wire / workers
    receive = mine * rates.cpu_per_byte("receive_cpu")
    if relayed:  # a relay sends what it receives to its children, on the same core
        receive += mine * min(f.relay_fanout, f.rollouts - 1) * rates.cpu_per_byte("send_cpu")
    receivers_per_host = f.rollouts * workers / f.rollout_hosts
    host_share = min(1.0, f.cores / receivers_per_host) if f.shared_cores is None else 1.0
    phases.append(Phase("rollout receive + verify", receive / host_share, "rollout CPU per byte", True))

    if f.shared_cores is not None:  # every process competes for the same cores: total CPU / cores
        total = f.trainer_ranks * encode + f.rollouts * workers * receive
        cores = f"{f.shared_cores:.2g} shared cores"
        phases.append(Phase("all CPU on shared cores", total / f.shared_cores, cores, True))

    # After the last byte: a delta's last patches are applied, the weights load and swap, and a relay chain drains.
    shard = whole / f.gpus_per_rollout
    commit: list[Phase] = []
    if kind == "delta":
        commit.append(Phase("apply patches", whole / workers * rates.cpu_per_byte("apply_cpu"), "rollout CPU", False))
    if f.gpu:
        load = shard / (rates.h2d_gbps.value * 1e9)
        if f.design == "process":  # the receiving process hands every worker its shard through host memory
            load += shard / (rates.handoff_gbps.value * 1e9)
        commit.append(Phase("load to GPUs", load, "host-to-GPU copy", False))
    swap = shard / GIB * rates.swap_s.value
    per_hop = sum(p.seconds for p in commit) + swap  # what each relay hop repeats of the commit
    commit.append(Phase("swap", swap + rates.fixed_s.value, "swap + round trips", False))
    phases += commit
    if relayed:
        # A relay forwards a chunk once it holds and has checked it (a delta's patches applied: update/core.py)
        # and passes Commit on once its own commit is done, so each hop below the root adds its last chunk's
        # store and forward and its own apply, load and swap; the update's fixed cost is paid once.
        forward = crossing(min(f.chunk_bytes, wire)) if link else 0.0
        hop = rates.relay_hop_s.value + forward + per_hop
        phases.append(Phase("relay drain", _depth(f.rollouts - 1, f.relay_fanout) * hop, "relay depth", False))
    return Prediction(fleet, kind, phases)


def _depth(followers: int, fanout: int) -> int:
    """Hops below the root of a relay tree of `fanout` holding `followers` rollouts besides the root."""
    depth, level, placed = 0, 1, 0
    while placed < followers:
        level *= fanout
        placed += level
        depth += 1
    return depth
