"""The other ways to move the same weights between two processes on this host, for comparison.

Every receiver is its own process, started with `spawn` (the bench process holds gRPC channels,
which must not be forked). Each function returns seconds per measured run, warm-up excluded;
"sender tensors to receiver memory" is what each one times.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.measure import Cpu, cpu_seconds
from bench.models import random_state
from rollout_side.process import free_port
from weightsync.manifest import tensor_bytes
from weightsync.memory import prefaulted_buffer

__all__ = [
    "GrpcAlone",
    "SocketSink",
    "gloo_seconds",
    "naive_grpc_seconds",
    "safetensors_seconds",
    "socket_fanout_seconds",
]

_CTX = mp.get_context("spawn")
_TIMEOUT = 600


# -- raw sockets: sendall from the tensors, recv_into one preallocated, pre-faulted buffer ----------


def _sink_main(nbytes: int, unix_path: str | None, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    buffer = prefaulted_buffer(nbytes)
    view = tensor_bytes(buffer)
    if unix_path:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(unix_path)
    else:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
    server.listen(1)  # before saying ready: a connect to a socket not yet listening is refused
    ready.put(unix_path or server.getsockname()[1])
    conn, _ = server.accept()
    while True:
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], min(nbytes - got, 4 << 20))
            if not n:
                return
            got += n
        conn.sendall(b"k")


class SocketSink:
    """A receiver process on TCP loopback (or a Unix socket) that takes `nbytes` per run."""

    def __init__(self, nbytes: int, *, unix: bool = False) -> None:
        self.nbytes = nbytes
        path = None
        if unix:
            path = os.path.join(tempfile.mkdtemp(prefix="ws-bench-"), "sink.sock")
        ready: mp.Queue = _CTX.Queue()  # type: ignore[type-arg]
        self.process = _CTX.Process(target=_sink_main, args=(nbytes, path, ready), daemon=True)
        self.process.start()
        where = ready.get(timeout=_TIMEOUT)
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(where)
        else:
            self.sock = socket.create_connection(("127.0.0.1", where))

    def send(self, views: Sequence[memoryview]) -> None:
        for view in views:
            self.sock.sendall(view)
        if not self.sock.recv(1):
            raise ConnectionError("sink closed")

    def seconds(self, views: Sequence[memoryview]) -> float:
        started = time.perf_counter()
        self.send(views)
        return time.perf_counter() - started

    def close(self) -> None:
        self.sock.close()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def socket_fanout_seconds(sinks: Sequence[SocketSink], views: Sequence[memoryview]) -> float:
    """One sender to every sink at once, one thread each (sendall releases the GIL)."""
    if len(sinks) == 1:
        return sinks[0].seconds(views)
    threads = [threading.Thread(target=sink.send, args=(views,)) for sink in sinks]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


# -- torch.distributed gloo: the CPU stand-in for an NCCL broadcast ---------------------------------


def _gloo_main(rank: int, port: int, model_dir: str, runs: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    import torch.distributed as dist

    state = random_state(Path(model_dir))
    if rank == 1:
        # The receiver lands every tensor in views of one preallocated, pre-faulted buffer.
        flat = prefaulted_buffer(sum(t.numel() * t.element_size() for t in state.values()))
        offset, views = 0, []
        for t in state.values():
            size = t.numel() * t.element_size()
            views.append(flat[offset : offset + size].view(t.dtype).view(t.shape))
            offset += size
        state = dict(zip(state, views, strict=True))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ack = torch.zeros(1)
    seconds = []
    for _ in range(runs):
        dist.barrier()
        started = time.perf_counter()
        for tensor in state.values():
            if rank == 0:
                dist.send(tensor, dst=1)
            else:
                dist.recv(tensor, src=0)
        if rank == 0:
            dist.recv(ack, src=1)
        else:
            dist.send(ack, dst=0)
        seconds.append(time.perf_counter() - started)
    if rank == 0:
        out.put(seconds)
    dist.destroy_process_group()


def gloo_seconds(model_dir: Path, runs: int, warmup: int) -> list[float]:
    """torch.distributed send/recv of each tensor over gloo (TCP loopback), two processes."""
    port = free_port()
    out: mp.Queue = _CTX.Queue()  # type: ignore[type-arg]
    procs = [
        _CTX.Process(target=_gloo_main, args=(rank, port, str(model_dir), runs + warmup, out), daemon=True)
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        seconds = out.get(timeout=_TIMEOUT)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return seconds[warmup:]


# -- safetensors: a checkpoint file written by the trainer, read by the rollout ---------------------


def _safetensors_reader(requests: mp.Queue, done: mp.Queue) -> None:  # type: ignore[type-arg]
    from safetensors.torch import load_file

    loaded = None
    while (path := requests.get()) is not None:
        loaded = None  # drop the previous version first, as a rollout would
        loaded = load_file(path)
        done.put(len(loaded))


def safetensors_seconds(
    state: dict[str, torch.Tensor], folder: Path, runs: int, warmup: int, *, disk: bool
) -> list[float]:
    """save_file in this process, load_file in another; on disk, written through (fsync) and read
    back from the device (the file's cached pages are dropped), on /dev/shm from memory."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    requests: mp.Queue = _CTX.Queue()  # type: ignore[type-arg]
    done: mp.Queue = _CTX.Queue()  # type: ignore[type-arg]
    reader = _CTX.Process(target=_safetensors_reader, args=(requests, done), daemon=True)
    reader.start()
    seconds = []
    try:
        for _ in range(runs + warmup):
            path.unlink(missing_ok=True)
            started = time.perf_counter()
            save_file(state, str(path))
            if disk:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            requests.put(str(path))
            done.get(timeout=_TIMEOUT)
            seconds.append(time.perf_counter() - started)
    finally:
        requests.put(None)
        reader.join(30)
        path.unlink(missing_ok=True)
    return seconds[warmup:]


# -- naive gRPC: generated protobuf classes, one PushChunksRequest per chunk ------------------------


def _naive_server(nbytes: int, chunk_bytes: int, bare: bool, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    import grpc

    from weightsync.memory import keep_freed_memory
    from weightsync.v1 import weightsync_pb2 as pb
    from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

    # Only the naive server stores what it receives; gRPC alone drops it and holds no staging.
    staging = tensor_bytes(prefaulted_buffer(nbytes)) if not bare else memoryview(b"")

    async def drop(request_iterator, context):  # type: ignore[no-untyped-def]
        size = 0
        async for raw in request_iterator:
            size += len(raw)
        return pb.PushChunksResponse(bytes=size)

    class Servicer(pb_grpc.WeightSyncServicer):
        async def PushChunks(self, request_iterator, context):  # type: ignore[no-untyped-def]
            size = 0
            async for request in request_iterator:
                start = request.index * chunk_bytes
                staging[start : start + len(request.data)] = request.data
                size += len(request.data)
            return pb.PushChunksResponse(bytes=size)

    async def serve() -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        server = grpc.aio.server(options=options)
        if bare:
            keep_freed_memory()
            handler = grpc.stream_unary_rpc_method_handler(
                drop, request_deserializer=None, response_serializer=pb.PushChunksResponse.SerializeToString
            )
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("weightsync.v1.WeightSync", {"PushChunks": handler}),)
            )
        else:
            pb_grpc.add_WeightSyncServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


def _start_server(nbytes: int, chunk_bytes: int, *, bare: bool) -> tuple[mp.process.BaseProcess, int]:
    """A `_naive_server` process, started and listening; returns it and its port."""
    ready: mp.Queue = _CTX.Queue()  # type: ignore[type-arg]
    server = _CTX.Process(target=_naive_server, args=(nbytes, chunk_bytes, bare, ready), daemon=True)
    server.start()
    return server, ready.get(timeout=_TIMEOUT)


def _naive_client(
    port: int,
    server_pid: int,
    model_dir: str,
    chunk_bytes: int,
    runs: int,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    from weightsync import wire
    from weightsync.channel import open_channel
    from weightsync.manifest import wire_tensors
    from weightsync.v1 import weightsync_pb2 as pb
    from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

    named = dict(wire_tensors(random_state(Path(model_dir))))
    payloads = [tensor_bytes(t) for t in named.values()]
    channel = open_channel(f"127.0.0.1:{port}")
    push = pb_grpc.WeightSyncStub(channel).PushChunks

    def requests():  # type: ignore[no-untyped-def]
        for index, pieces in wire.iter_wire_payloads(payloads, chunk_bytes):
            yield pb.PushChunksRequest(update_id="naive", index=index, data=b"".join(pieces))

    seconds, cpu = [], Cpu()
    for _ in range(runs):
        sender, receiver = cpu_seconds(), cpu_seconds(server_pid)
        started = time.perf_counter()
        push(requests(), timeout=_TIMEOUT)
        seconds.append(time.perf_counter() - started)
        cpu.sender.append(cpu_seconds() - sender)
        cpu.receiver.append(cpu_seconds(server_pid) - receiver)
    out.put((seconds, cpu))
    channel.close()


def naive_grpc_seconds(
    model_dir: Path, nbytes: int, runs: int, warmup: int, chunk_bytes: int = 1 << 20
) -> tuple[list[float], Cpu]:
    """A generated-protobuf PushChunks stream, both ends in fresh processes with default settings.

    Returns each measured run's seconds, and the CPU time both ends used in it.
    """
    server, port = _start_server(nbytes, chunk_bytes, bare=False)
    out: mp.Queue = _CTX.Queue()  # type: ignore[type-arg]
    args = (port, server.pid, str(model_dir), chunk_bytes, runs + warmup, out)
    client = _CTX.Process(target=_naive_client, args=args)
    client.start()
    try:
        seconds, cpu = out.get(timeout=_TIMEOUT)
    finally:
        client.join(30)
        server.kill()
        server.join(10)
    return seconds[warmup:], Cpu(cpu.sender[warmup:], cpu.receiver[warmup:])


class GrpcAlone:
    """gRPC's part of a push alone, the ceiling of any sync through it, run beside each push it is compared to.

    The same bytes as PushChunks messages encoded up front, sent from this process without a serializer
    to a server process that receives them as bytes and drops them (freed buffers kept warm on both ends,
    as weightsync's are): no checksums, no staging. Pairing each run with a push, seconds apart, in the same
    process, keeps the ratio of the two from riding on the host's mood of the minute.
    """

    def __init__(self, views: Sequence[memoryview], nbytes: int, chunk_bytes: int = 1 << 20) -> None:
        from weightsync import wire
        from weightsync.channel import open_channel, raw_push_chunks

        self.process, port = _start_server(nbytes, chunk_bytes, bare=True)
        self._messages = [wire.encode_chunk(b"bare", i, p) for i, p in wire.iter_wire_payloads(views, chunk_bytes)]
        self._channel = open_channel(f"127.0.0.1:{port}")
        self._push = raw_push_chunks(self._channel)

    def seconds(self) -> float:
        started = time.perf_counter()
        self._push(iter(self._messages), timeout=_TIMEOUT)
        return time.perf_counter() - started

    def close(self) -> None:
        self._channel.close()
        self.process.kill()
        self.process.join(10)
