"""
A TCP relay on 127.0.0.1 that flips one byte on the way: a faulty link between a
client run as a process and a real daemon, for the tests of what the client says.

It runs in threads of the test process (the client under test is another
process), one pair of pumps per connection; a connection that breaks on one
side is closed on both, as a router would.
"""

from __future__ import annotations

import socket
import threading


class CorruptingRelay:
    """
    Relays connections to ``upstream``; in the ``connection``-th one (from 0),
    flips the byte at ``offset`` of what flows ``direction`` ("up": client to
    server, "down": server to client).
    """

    def __init__(
        self, upstream: tuple[str, int], connection: int, direction: str, offset: int
    ) -> None:
        self.upstream = upstream
        self.where = (connection, direction, offset)
        self.flipped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop relaying: close the listener and every connection."""
        for each in [self.listener, *self.sockets]:
            _close(each)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                return
            server.settimeout(None)
            self.sockets += [client, server]
            index, self.accepted = self.accepted, self.accepted + 1
            for source, sink, direction in (
                (client, server, "up"),
                (server, client, "down"),
            ):
                threading.Thread(
                    target=self._pump,
                    args=(source, sink, (index, direction)),
                    daemon=True,
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, which: tuple) -> None:
        seen = 0
        try:
            while data := source.recv(65536):
                data = self._corrupt(which, seen, data)
                seen += len(data)
                sink.sendall(data)
        except OSError:
            _close(source)
            _close(sink)
            return
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _corrupt(self, which: tuple, seen: int, data: bytes) -> bytes:
        connection, direction, offset = self.where
        if which != (connection, direction) or not seen <= offset < seen + len(data):
            return data
        flipped = bytearray(data)
        flipped[offset - seen] ^= 0x55
        self.flipped.set()
        return bytes(flipped)


def _close(each: socket.socket) -> None:
    """Close a socket, waking a thread blocked reading it."""
    try:
        each.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    each.close()
