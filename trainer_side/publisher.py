"""The trainer's side of the handshake: push one version to many rollouts at once.

Each tensor is cast to bf16 and checksummed once, and each chunk is serialized once and shared
by every rollout's stream through a bounded window, so pushing to N rollouts costs one encode
and the trainer holds only `window` chunks beyond the model itself. A full version starts streaming
at once: its tensors are checksummed as their chunks go out, and the checksums follow in Commit
(BeginUpdateRequest.checksums_at_commit) rather than costing a pass over the model before the first byte.

Delta sync (trainer_side/base_store.py): the publisher keeps the last version it pushed, and sends the
rollouts that confirmed it a patch per tensor where that is smaller; the others get the full version.
A rollout that refuses a delta (it restarted, dropped its copy, or a tensor failed its checksum) gets
the full version in the same push, and `reconcile` (or `reconcile_every`) brings any rollout that
came back empty or behind to the latest version without waiting for the next training step.

One update to one rollout (the handshake, its chunks, what the answer means) is trainer_side/rollout_client.py.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch

from trainer_side.base_store import BaseStore
from trainer_side.names import renamed
from trainer_side.outgoing import EncodeError, Outgoing
from trainer_side.push_result import PushResult, wants_full
from trainer_side.rollout_client import RolloutClient
from trainer_side.session import UpdateSession, new_update_id
from trainer_side.sharded.collective import Collective, in_collective_job
from trainer_side.sharded.rank_base import RankBase
from trainer_side.version_file import VersionFileWriter
from weightsync import metrics, wire
from weightsync.adapter import AdapterConfig
from weightsync.errors import Reason
from weightsync.limits import version_problem
from weightsync.manifest import PIECE_BYTES, manifest_of_state, wire_sources, wire_tensors
from weightsync.relay_tree import relay_tree, subtree_addresses
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["Publisher", "PushResult"]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20  # measured (bench/): 256 KiB and 4 MiB were both slower
DEFAULT_STREAMS = 1  # PushChunks streams per rollout; measured (bench/): more were slower on 2 cores


class Publisher:
    """Holds one channel per rollout; `push` sends a state dict as a version to all of them."""

    def __init__(
        self,
        rollouts: Sequence[str],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window: int = 16,
        streams: int = DEFAULT_STREAMS,
        timeout: float = 60.0,
        progress: bool | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        relay_fanout: int = 0,
        delta: bool = False,
        reconcile_every: float | None = None,
        shared_memory: str | Path | None = None,
        rename: Callable[[str], str] | None = None,
        collective: bool | None = None,
        piece_checksums: bool | None = None,
    ) -> None:
        """`delta` keeps the last version pushed (one more copy of the model in trainer memory) to send
        rollouts only what changed, and lets `reconcile` restore rollouts; `reconcile_every` (seconds)
        starts a thread that calls `reconcile`. Off by default so that a publisher costs no extra memory
        and benchmarks of full syncs stay full syncs; a training loop wants it on.

        `shared_memory` names a directory every rollout can read too (they run on this host, started with
        --shared-memory-dir naming it): full versions are then written there once, and each rollout reads
        the file as it is written instead of receiving chunks. Deltas still go as chunks (they are small).

        Names lose the wrapper components torch.compile, FSDP and activation checkpointing add (`_orig_mod.`
        ...); `rename` then maps each name to the rollout model's (e.g. Megatron to Hugging Face names).

        In a torch.distributed job of several ranks, every rank constructs its Publisher alike and calls
        `push` together: each sends its own shards (trainer_side/sharded/collective.py); `timeout` bounds every
        collective step, so a rank that dies makes the others fail rather than hang. With `delta`, each rank
        keeps and diffs only its own rows (trainer_side/sharded/rank_base.py). `collective=False`
        keeps a publisher that only one rank constructs (after gathering the weights itself) a plain one.

        `piece_checksums` picks the checksum kind (weightsync/manifest.py). None (the default): the combinable
        kind over pieces of PIECE_BYTES (1 MiB, the default chunk size), so each byte is hashed once per side,
        and the fingerprint is `manifest_of_state(state)`'s whatever the chunk size, delta or shared memory.
        True: pieces of `chunk_bytes`, as a collective push of that chunk size announces. False: plain
        xxh3_128 per tensor, for rollouts that predate the combinable kind (they refuse it at Commit)."""
        if not rollouts:
            raise ValueError("no rollouts given; pass at least one HOST:PORT")
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        self.rollouts = list(rollouts)
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.streams = streams
        self.timeout = timeout
        self.progress = progress
        self.relay_fanout = relay_fanout  # 0: push to every rollout; k: a relay tree of fanout k (1 = a chain)
        if shared_memory and relay_fanout:
            raise ValueError("shared_memory and relay exclude each other: co-located rollouts each read the file")
        self._shared = VersionFileWriter(shared_memory) if shared_memory else None
        self._in_file: Outgoing | None = None  # what the shared-memory file holds now
        self._pieces = {None: PIECE_BYTES, True: chunk_bytes, False: 0}[piece_checksums]
        self._base = BaseStore(self._pieces) if delta else None
        self._lock = threading.Lock()  # one push or reconcile at a time: a rollout takes one update at a time
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._credentials = credentials
        self._clients = {address: self._client(address) for address in self.rollouts}
        self._rename = rename
        self._collective = Collective(timeout) if (in_collective_job() if collective is None else collective) else None
        self._rank_base: RankBase | None = None  # a collective publisher's delta base: this rank's rows
        self._pushed_base = ""  # fingerprint of the last full version every rollout confirmed
        if self._collective is not None:
            if shared_memory or relay_fanout or reconcile_every:
                raise ValueError("a collective (multi-rank) publisher takes no shared memory, relays or reconcile")
            self._base, self._rank_base = None, RankBase() if delta else None
        if reconcile_every:
            self._reconciler = threading.Thread(
                target=self._reconcile_forever, args=(reconcile_every,), name="weightsync-reconcile", daemon=True
            )
            self._reconciler.start()

    def _client(self, address: str) -> RolloutClient:
        return RolloutClient(address, credentials=self._credentials, metadata=self._metadata, timeout=self.timeout)

    def set_rollouts(self, joined: Sequence[str], left: Sequence[str]) -> None:
        """Adds and drops rollouts (discovery calls this); newcomers get the latest version at `reconcile`."""
        with self._lock:
            for address in left:
                if address in self._clients:
                    self.rollouts.remove(address)
                    self._clients.pop(address).close()
                    if self._base is not None:
                        self._base.forget(address)
                    if self._rank_base is not None:
                        self._rank_base.forget(address)
            for address in joined:
                if address not in self._clients:
                    self.rollouts.append(address)
                    self._clients[address] = self._client(address)

    def push(self, state: Mapping[str, torch.Tensor], version: int) -> list[PushResult]:
        """Pushes `state` (any float dtype, any device) as `version` to every rollout concurrently.

        Rollouts that confirmed the previous version get a delta where it is smaller; a rollout that
        refuses it gets the full version before this returns. A version outside 1..2**53-1 raises
        ValueError before anything is sent (weightsync.limits.MAX_VERSION).
        """
        if problem := version_problem(version):
            raise ValueError(problem)
        state = renamed(state, self._rename)
        with self._lock:
            if self._collective is not None:  # every rank of the job calls this; each sends its own shards
                results = self._collective.push(
                    self._clients,
                    state,
                    version,
                    chunk_bytes=self.chunk_bytes,
                    window=self.window,
                    streams=self.streams,
                    base=self._rank_base,
                )
                self._record(results)
                return results
            base = self._base
            if base is None:  # cast, copied to the CPU and checksummed tensor by tensor as the chunks go out
                results = self._deliver(Outgoing.streamed(version, wire_sources(state), self._pieces), None, [])
                self._record(results)
                return results
            try:
                plan = base.prepare(state, version, self.rollouts)
            except EncodeError as error:  # before any BeginUpdate: nothing to abort anywhere
                results = [
                    PushResult(address=a, version=version, ok=False, error=f"version {version} not sent: {error}")
                    for a in self.rollouts
                ]
                self._record(results)
                return results
            try:
                results = self._deliver(plan.full, plan.delta, plan.holders)
            finally:
                base.finish(plan)
            self._record(results)
        return results

    def push_adapter(
        self,
        adapter_state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any] | AdapterConfig,
        version: int,
        *,
        base_fingerprint: str = "",
    ) -> list[PushResult]:
        """Pushes a LoRA adapter as `version`: only its tensors travel (bf16), and each rollout serves its
        base with the adapter merged in (docs/lora.md).

        `adapter_state` is PEFT's (`get_peft_model_state_dict(model)`, or adapter_model.safetensors), `config`
        its adapter_config.json fields (or an AdapterConfig), and `base_fingerprint` the full version it
        applies to: by default the AdapterConfig's, else the last full version this publisher pushed. A
        rollout that holds another base refuses with ADAPTER_BASE_MISMATCH; push the base (`push`) to it,
        then the adapter again.
        """
        named = config.base_fingerprint if isinstance(config, AdapterConfig) else ""
        base = base_fingerprint or named or self._pushed_base
        if not base:
            raise ValueError("no base fingerprint: pass base_fingerprint, or push the base model with this publisher")
        tensors = dict(wire_tensors(adapter_state))
        if not isinstance(config, AdapterConfig):
            config = AdapterConfig.from_peft(config, tensors, base)
        elif config.base_fingerprint != base:
            config = dataclasses.replace(config, base_fingerprint=base)
        manifest = manifest_of_state(tensors, piece_bytes=self._pieces)
        with self._lock:
            results = self._push_to(self.rollouts, Outgoing.full(version, manifest, list(tensors.values()), config))
            self._record(results, full=False)
        for r in results:
            if r.reason is Reason.ADAPTER_BASE_MISMATCH:
                logger.warning("%s holds another base model: push the base (version, %s) to it first", r.address, base)
        return results

    def _deliver(self, full: Outgoing, delta: Outgoing | None, holders: Sequence[str]) -> list[PushResult]:
        """Sends `delta` to `holders` and `full` to the rest at once; refused deltas are retried in full."""
        if self.relay_fanout and len(self.rollouts) > 1:
            everyone = delta is not None and set(holders) == set(self.rollouts)
            results = self._push_relayed(delta if everyone and delta is not None else full, full)
            if everyone and wants_full(results[0]):
                logger.warning("relayed delta refused (%s); relaying the full version", results[0].error)
                results = self._push_relayed(full, full)
            return results
        rest = [a for a in self.rollouts if a not in holders]
        with ThreadPoolExecutor(max_workers=2) as pool:
            patched = pool.submit(self._push_to, holders, delta) if delta is not None and holders else None
            whole = self._push_to(rest, full) if rest else []
            by_address = {r.address: r for r in [*whole, *(patched.result() if patched else [])]}
        refused = [a for a in holders if wants_full(by_address[a])]
        if refused:
            for a in refused:
                logger.warning("%s refused the delta (%s); sending the full version", a, by_address[a].error)
            by_address |= {r.address: r for r in self._push_to(refused, full)}
        return [by_address[a] for a in self.rollouts]

    def reconcile(self, *, unreachable: list[str] | None = None) -> list[PushResult]:
        """Pushes the latest version, in full, to every reachable rollout that serves an older one or none.

        A rollout that restarted, started late or missed versions returns to serving the latest version
        without waiting for the next training step. Needs `delta=True` (the publisher keeps that version).
        `unreachable`, if given, gets the addresses whose status could not be read: discovery retries
        those of its newcomers soon rather than at the next round (trainer_side/discovery.py).
        """
        with self._lock:
            base = self._base
            if base is None or base.manifest is None:
                return []
            stale = []
            for address, status in self._statuses(timeout=min(self.timeout, 5.0)).items():
                if isinstance(status, str) and unreachable is not None:
                    unreachable.append(address)
                if isinstance(status, str) or status.state == pb.ROLLOUT_STATE_RECEIVING:
                    continue  # unreachable or busy now: the next round looks again
                if status.weight_version >= base.version:
                    if status.weight_version == base.version and status.fingerprint == base.fingerprint:
                        base.confirm(address, status.fingerprint)
                    continue  # up to date, or newer than anything we hold: not ours to touch
                base.forget(address)
                stale.append(address)
            if not stale:
                return []
            tensors = base.tensors()
            logger.info("reconcile: pushing version %d to %s", base.version, ", ".join(stale))
            results = self._push_to(stale, Outgoing.full(base.version, base.manifest, tensors))
            self._record(results)
        return results

    def assume_base(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Takes `state` as the version rollouts may already hold (e.g. the previous checkpoint on disk).

        Asks each rollout what it serves; those whose fingerprint is this state's get deltas from the
        next push. Returns them. The state's tensors are kept as they are: pass ones nothing else changes.
        """
        with self._lock:
            if self._base is None:
                return []
            tensors = dict(wire_tensors(state))
            manifest = manifest_of_state(tensors, piece_bytes=self._pieces)
            holders = {
                address: status.weight_version
                for address, status in self._statuses(timeout=self.timeout).items()
                if not isinstance(status, str) and status.weight_version and status.fingerprint == manifest.fingerprint
            }
            self._base.assume(max(holders.values(), default=0), manifest, tensors)
            for address in holders:
                self._base.confirm(address, manifest.fingerprint)
            return list(holders)

    def _reconcile_forever(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                for result in self.reconcile():
                    (logger.info if result.ok else logger.warning)("reconcile: %s", result.line())
            except Exception:
                logger.exception("reconcile failed")

    def _record(self, results: Sequence[PushResult], *, full: bool = True) -> None:
        if full and results and all(r.ok for r in results):
            self._pushed_base = results[0].fingerprint  # the base the next adapter applies to
        for r in results:
            metrics.record_push(r.address, r.ok, r.version, r.seconds, r.bytes_sent)
            if self._base is not None:
                if r.ok:
                    self._base.confirm(r.address, r.fingerprint)
                else:
                    self._base.forget(r.address)

    def _push_relayed(self, outgoing: Outgoing, full: Outgoing) -> list[PushResult]:
        """Sends to the relay tree's root only; rollouts the relay did not reach get a direct full push."""
        root, downstream = relay_tree(self.rollouts, self.relay_fanout)
        update_id = new_update_id(outgoing.version)
        [result] = self._push_to([root], outgoing, relay_to=downstream, update_id=update_id)
        fingerprint = outgoing.manifest.fingerprint if outgoing.manifest is not None else ""
        reached = {
            r.address: PushResult(
                address=r.address,
                version=outgoing.version,
                ok=True,
                fingerprint=r.fingerprint,
                seconds=result.seconds,
                relayed_by=root,
            )
            for r in result.relayed
            if r.ok and r.weight_version == outgoing.version and fingerprint and r.fingerprint == fingerprint
        }
        missed = [a for a in subtree_addresses(downstream) if a not in reached]
        if missed:
            logger.warning("relay missed %s; pushing to them directly", ", ".join(missed))
            # A relay that died mid-stream may have left them holding the update open.
            UpdateSession({a: self._clients[a] for a in missed}, outgoing, update_id=update_id).abort()
            reached |= {r.address: r for r in self._push_to(missed, full)}
        return [result, *(reached[a] for a in self.rollouts[1:])]

    def _push_to(
        self,
        targets: Sequence[str],
        outgoing: Outgoing,
        relay_to: Sequence[pb.RelayTarget] = (),
        update_id: str = "",
    ) -> list[PushResult]:
        session = UpdateSession({a: self._clients[a] for a in targets}, outgoing, update_id=update_id)
        update_id = session.update_id
        messages: Iterator[bytes] | None = outgoing.chunks(update_id, self.chunk_bytes)
        shared_file = ""
        if self._shared is not None and not outgoing.is_delta and not relay_to:
            shared_file = str(self._shared.path)
            messages = None  # there already: each rollout reads it whole at BeginUpdate
            if self._in_file is not outgoing:  # written while the rollouts read it, as progress messages say
                self._in_file = None
                self._shared.resize(outgoing.wire_bytes)  # before BeginUpdate: rollouts check the size then
                messages = self._write_file(outgoing, update_id)
        window = session.share(messages, consumers=len(targets), window=self.window) if messages is not None else None
        logger.info(
            "push %s: version %d, %d tensors, %.1f MB%s to %d rollout(s)%s%s",
            update_id,
            outgoing.version,
            len(outgoing.announced),
            outgoing.announced.total_bytes / 1e6,
            f" as a {outgoing.wire_bytes / 1e6:.1f} MB delta" if outgoing.is_delta else "",
            len(targets),
            f", relayed to {len(subtree_addresses(relay_to))} more" if relay_to else "",
            f" through the shared-memory file {shared_file}" if shared_file else "",
        )
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            futures = [
                pool.submit(
                    self._clients[address].push,
                    session,
                    chunk_bytes=self.chunk_bytes,
                    window=window,
                    slot=i,
                    streams=self.streams,
                    progress=self.progress,
                    relay_to=relay_to,
                    shared_file=shared_file,
                )
                for i, address in enumerate(targets)
            ]
            return session.end([f.result() for f in futures])

    def _write_file(self, outgoing: Outgoing, update_id: str) -> Iterator[bytes]:
        """Writes `outgoing` into the shared-memory file, saying after every block how much is written."""
        assert self._shared is not None
        key, pending = update_id.encode(), outgoing.pending
        pieces = outgoing.announced.piece_bytes
        for written in self._shared.blocks(outgoing.payloads, outgoing.sizes, checksum=pending, piece_bytes=pieces):
            yield wire.encode_file_progress(key, written)
        if pending:
            outgoing.complete(self._shared.checksums)
        self._in_file = outgoing

    @property
    def delta_holders(self) -> list[str]:
        """The rollouts the next push may send a delta: they confirmed the base this publisher keeps."""
        with self._lock:
            if self._rank_base is not None:
                return self._rank_base.holders(self.rollouts)
            return self._base.holders(self.rollouts) if self._base is not None else []

    def status(self, *, verify: bool = False) -> dict[str, pb.GetStatusResponse | str]:
        """Each rollout's GetStatus (`verify`: its installed weights re-checked first), or why it did not answer."""
        return self._statuses(timeout=self.timeout, verify=verify)

    def _statuses(self, *, timeout: float, verify: bool = False) -> dict[str, pb.GetStatusResponse | str]:
        return {address: client.status(timeout, verify=verify) for address, client in self._clients.items()}

    def close(self) -> None:
        self._stop.set()
        if self._reconciler is not None:
            self._reconciler.join(self.timeout)
        if self._base is not None:
            self._base.close()
        if self._shared is not None:
            self._shared.close()
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
