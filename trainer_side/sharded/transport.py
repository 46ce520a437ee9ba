"""Transport in a collective push: this rank's chunks to the rollouts, and (rank 0) the commit.

Rank 0 begins the update on every rollout through the push's UpdateSession (trainer_side/session.py);
every rank then streams the chunks it sends straight to every rollout that accepted, under that update's
id, and rank 0 commits where every rank's streams went through, with the checksums combined from every
rank's pieces. The bytes between ranks are trainer_side/sharded/chunks.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from tqdm import tqdm

from trainer_side.outgoing import commit_request
from trainer_side.push_result import PushResult, describe, failure
from trainer_side.resume import chunk_size, held_indices
from trainer_side.session import UpdateSession
from trainer_side.sharded.chunks import Digest
from trainer_side.sharded.plan import combine

__all__ = ["commit_all", "held_bytes", "stream_chunks"]


def stream_chunks(
    session: UpdateSession,
    accepted: Sequence[str],
    messages: Iterator[bytes],
    window: int,
    streams: int,
    held: Mapping[str, bytearray],
) -> tuple[int, dict[str, str]]:
    """This rank's chunks to every accepted rollout at once, but those it `held` (a mask over this rank's
    chunks); returns bytes per rollout and each failure. Raises the window's failure (a tensor of this
    rank's that could not be encoded), for every rank to fail the update with."""
    if not accepted:
        return 0, {}
    shared = session.share(messages, consumers=len(accepted), window=window)
    for slot, address in enumerate(accepted):
        if address in held:
            shared.skip(slot, held[address])

    def send(slot: int, address: str) -> tuple[int, str]:
        bar = tqdm(disable=True)
        try:
            return session.clients[address].stream(shared, slot, streams, bar), ""
        except grpc.RpcError as error:
            return 0, describe(error)
        finally:
            shared.leave(slot)

    with ThreadPoolExecutor(max_workers=len(accepted)) as pool:
        answers = list(pool.map(send, range(len(accepted)), accepted))
    if shared.failure is not None:
        raise shared.failure
    return max(n for n, _ in answers), {a: why for a, (_, why) in zip(accepted, answers, strict=True) if why}


def commit_all(
    session: UpdateSession,
    failed: Mapping[str, PushResult],
    gathered: Sequence[tuple[dict[str, str], list[Digest], int]],
    started: float,
    timeout: float,
) -> list[PushResult]:
    """Rank 0: the checksums from every rank's pieces, then Commit where every rank's streams went through."""
    sent = sum(n for _, _, n in gathered)
    clients, outgoing, update_id = session.clients, session.outgoing, session.update_id
    errors = {
        address: [f"rank {r}: {e[address]}" for r, (e, _, _) in enumerate(gathered) if address in e]
        for address in clients
    }
    pending = outgoing.pending
    if not pending:
        assert outgoing.manifest is not None
        manifest = outgoing.manifest
    elif all(address in failed or errors[address] for address in clients):
        manifest = outgoing.announced  # nothing to commit: the pieces need not be complete
    else:
        manifest = outgoing.complete(combine(outgoing.announced, [d for _, ds, _ in gathered for d in ds]))

    def commit(address: str) -> PushResult:
        if address in failed:
            return failed[address]
        client = clients[address]
        if errors[address]:
            client.abort(update_id)
            return session.failed(address, "; ".join(errors[address]))
        try:
            answer = client.commit(commit_request(update_id, manifest, pending=pending), timeout=timeout)
        except grpc.RpcError as error:
            client.abort(update_id)
            return failure(address, outgoing.version, describe(error), error)
        return session.committed(address, answer, seconds=time.perf_counter() - started, bytes_sent=sent)

    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        return list(pool.map(commit, clients))


def held_bytes(mask: bytearray, total: int, chunk_bytes: int) -> int:
    return sum(chunk_size(i, total, chunk_bytes) for i in held_indices(mask))
