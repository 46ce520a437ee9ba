"""A TCP proxy in front of a rollout for tests: counts the bytes that reach it and cuts connections on demand."""

from __future__ import annotations

import socket
import threading

__all__ = ["Proxy"]


class Proxy:
    """Forwards every connection to `target` both ways; `sent` counts the bytes that went to the target.

    `cut_after(n)`: once `n` more bytes have gone to the target, every open connection is cut (the last
    piece delivered only in part, as a network failure would leave it); later connections pass again.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = 0
        self.cuts = 0
        self._limit: int | None = None
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._limit = self.sent + nbytes

    def reset(self) -> None:
        """Counts from zero again."""
        with self._lock:
            self.sent = 0

    def cut(self) -> None:
        """Cuts every open connection now."""
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
            self.cuts += 1
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            host, port = self.target.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                cut = False
                if counted:
                    with self._lock:
                        if self._limit is not None and self.sent + len(data) >= self._limit:
                            data, cut, self._limit = data[: self._limit - self.sent], True, None
                        self.sent += len(data)
                dst.sendall(data)
                if cut:
                    self.cut()
                    return
        except OSError:
            pass
        with self._lock:
            self._sockets -= {src, dst}
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
