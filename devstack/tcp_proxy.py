"""A loopback TCP proxy a test can pause: a network partition without root or iptables.

A client given the proxy's port instead of the server's (a worker's DSN, say) reaches the
server as usual until ``pause()``. From then on no byte moves in either direction and new
connections are accepted but not forwarded — exactly what a partition looks like from the
client: no reset, no error, just silence until its own timeouts fire. ``resume()`` lets the
held bytes through; ``cut()`` closes every connection (a reset), which a partition that
lasted past the server's timeouts ends with.

Threads, not asyncio: the proxy lives inside a synchronous pytest process next to blocking
psycopg calls, and a relay thread per direction keeps each connection's bytes in order.
"""

from __future__ import annotations

import contextlib
import socket
import threading

RELAY_CHUNK_BYTES = 65536
POLL_SECONDS = 0.1


class PausableProxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; see the module docstring."""

    def __init__(self, *, target_port: int) -> None:
        self.target_port = target_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every proxied connection; the proxy keeps accepting new ones."""
        with self._lock:
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            _close(sock)

    def close(self) -> None:
        self._stopping.set()
        self._flowing.set()
        self.cut()
        _close(self._listener)
        self._acceptor.join(5)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=self._connect, args=(client,), name="proxy-connect", daemon=True
            ).start()

    def _connect(self, client: socket.socket) -> None:
        self._track(client)
        if not self._wait_flowing():
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            self._drop(client)
            return
        self._track(server)
        for source, target in ((client, server), (server, client)):
            threading.Thread(
                target=self._relay, args=(source, target), name="proxy-relay", daemon=True
            ).start()

    def _relay(self, source: socket.socket, target: socket.socket) -> None:
        try:
            # Inside the try: a cut() may close the socket before this thread runs.
            source.settimeout(POLL_SECONDS)
            while not self._stopping.is_set():
                if not self._wait_flowing():
                    return
                try:
                    data = source.recv(RELAY_CHUNK_BYTES)
                except TimeoutError:
                    continue
                if not data:
                    break
                # Bytes read just before a pause are held, not delivered, until the resume.
                if not self._wait_flowing():
                    return
                target.sendall(data)
        except OSError:
            pass
        self._drop(source)
        self._drop(target)

    def _wait_flowing(self) -> bool:
        while not self._flowing.wait(POLL_SECONDS):
            if self._stopping.is_set():
                return False
        return not self._stopping.is_set()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
