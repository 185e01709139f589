"""
A userspace fault proxy: a TCP relay between two hosts that delays, slows,
stalls, resets, black-holes and corrupts, as told at run time.

The kernel here has no ``netem``, so the tests put this relay between a source
and a target (in the router namespace of L{nethosts.Network}: the source
connects to the proxy's address, the proxy to the target's).  It runs as its own
process (asyncio, no reactor shared with the test)::

    python tests/faultproxy.py --listen 10.77.1.1:9002 --connect 10.77.2.2:8002 \\
        --control /tmp/x/proxy.sock

Its socket buffers are small (``--buffer``, 256 KiB), as a router's: the bytes
it holds are acknowledged to the sender, which would otherwise see a stalled path
take megabytes.  It is steered through ``--control``, a unix socket taking one
JSON object per line and answering one (the L{FaultProxy} client does this from
the tests).
Directions: ``up`` is from the connecting side (the source) to the target,
``down`` the other way; a fault applies to the directions given (default both).

Commands (``{"op": ...}``):

- ``set``: change the faults; keys left out stay as they are:
  ``delay`` (seconds added to every chunk), ``rate`` (bytes per second per
  direction, shared by all connections; 0: unlimited), ``stall`` (true: hold
  every byte, reading nothing more, until false), ``stall_after`` (bytes per
  connection and direction after which that connection stalls for good; 0: off),
  ``reset_after`` (bytes per connection and direction after which the connection
  is reset, both sides; 0: off), ``blackhole`` (true: bytes received are dropped
  and new connections never reach the target), ``corrupt_at`` (flip the bits of
  the byte at this offset of each new connection's stream; -1: off),
  ``directions`` (``["up"]``, ``["down"]`` or both, for the faults above).
- ``reset``: reset (RST) every open connection now; ``min_bytes`` resets only
  those that carried at least that many bytes up.
- ``stats``: the counts: ``connections`` accepted, ``open``, ``resets``,
  ``bytes_up``/``bytes_down`` forwarded, ``dropped`` (black-holed),
  ``corrupted`` (bytes altered), ``stalled`` (connections stalled now).
- ``clear``: every fault off (counts kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHUNK = 64 * 1024
DIRECTIONS = ("up", "down")


class Faults:
    """The faults in force, and the counts."""

    def __init__(self) -> None:
        self.clear()
        self.stats = {
            "connections": 0,
            "open": 0,
            "resets": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "dropped": 0,
            "corrupted": 0,
            "stalled": 0,
        }
        self.unstalled = asyncio.Event()
        self.unstalled.set()
        self._budget = {d: 0.0 for d in DIRECTIONS}
        self._budgetAt = {d: time.monotonic() for d in DIRECTIONS}

    def clear(self) -> None:
        self.delay = 0.0
        self.rate = 0
        self.stall = False
        self.stallAfter = 0
        self.resetAfter = 0
        self.blackhole = False
        self.corruptAt = -1
        self.directions = set(DIRECTIONS)
        if hasattr(self, "unstalled"):
            self.unstalled.set()

    def update(self, settings: dict[str, Any]) -> None:
        known = {
            "delay": ("delay", float),
            "rate": ("rate", int),
            "stall": ("stall", bool),
            "stall_after": ("stallAfter", int),
            "reset_after": ("resetAfter", int),
            "blackhole": ("blackhole", bool),
            "corrupt_at": ("corruptAt", int),
        }
        for key, value in settings.items():
            if key == "op":
                continue
            if key == "directions":
                unknown = set(value) - set(DIRECTIONS)
                if unknown or not value:
                    raise ValueError(f"directions must be up and/or down: {value}")
                self.directions = set(value)
            elif key in known:
                attribute, kind = known[key]
                setattr(self, attribute, kind(value))
            else:
                raise ValueError(f"unknown setting {key!r}")
        if self.stall:
            self.unstalled.clear()
        else:
            self.unstalled.set()

    def applies(self, direction: str) -> bool:
        return direction in self.directions

    async def pace(self, direction: str, size: int) -> None:
        """Wait until ``size`` bytes fit under ``rate`` in this direction."""
        while self.rate and self.applies(direction):
            now = time.monotonic()
            elapsed = now - self._budgetAt[direction]
            self._budgetAt[direction] = now
            budget = min(
                self._budget[direction] + elapsed * self.rate, float(self.rate) / 4
            )
            if budget >= 0:
                self._budget[direction] = budget - size
                return
            self._budget[direction] = budget
            await asyncio.sleep(min(-budget / self.rate, 0.25))


class Relay:
    """One proxied connection: two pumps, and a way to reset both sides."""

    def __init__(self, proxy: Proxy, reader: Any, writer: Any) -> None:
        self.proxy = proxy
        self.faults = proxy.faults
        self.client = (reader, writer)
        self.server: tuple[Any, Any] | None = None
        self.carried = {d: 0 for d in DIRECTIONS}
        self.corrupted = {d: False for d in DIRECTIONS}
        self.corruptAt = self.faults.corruptAt
        self.closed = False
        self.held = False
        self.ended = 0

    async def run(self) -> None:
        faults = self.faults
        faults.stats["connections"] += 1
        faults.stats["open"] += 1
        try:
            if faults.blackhole:
                await self._swallow(self.client[0])
                return
            try:
                self.server = await asyncio.open_connection(*self.proxy.upstream)
            except OSError:
                self.reset()
                return
            upstream = self.server[1].get_extra_info("socket")
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.proxy.buffer)
            self.client[1].transport.set_write_buffer_limits(high=self.proxy.buffer)
            self.server[1].transport.set_write_buffer_limits(high=self.proxy.buffer)
            pumps = {
                asyncio.ensure_future(self._pump("up", *self._ends("up"))),
                asyncio.ensure_future(self._pump("down", *self._ends("down"))),
            }
            await asyncio.gather(*pumps)
        finally:
            faults.stats["open"] -= 1
            self.proxy.relays.discard(self)
            self.close()

    def _ends(self, direction: str) -> tuple[Any, Any]:
        assert self.server is not None
        if direction == "up":
            return self.client[0], self.server[1]
        return self.server[0], self.client[1]

    async def _swallow(self, reader: Any) -> None:
        while data := await reader.read(CHUNK):
            self.faults.stats["dropped"] += len(data)

    async def _pump(self, direction: str, reader: Any, writer: Any) -> None:
        try:
            while not self.closed:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._forward(direction, data, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self.ended += 1
            if not self.closed:
                # a clean end one way: half-close the other side
                try:
                    writer.write_eof()
                except (OSError, RuntimeError):
                    pass

    async def _forward(self, direction: str, data: bytes, writer: Any) -> None:
        faults = self.faults
        applies = faults.applies(direction)
        if applies and faults.blackhole:
            faults.stats["dropped"] += len(data)
            return
        if applies and faults.stallAfter:
            room = faults.stallAfter - self.carried[direction]
            if room <= 0 or len(data) > room:
                await self._send(direction, data[: max(room, 0)], writer)
                await self._stallForever()
                return
        if applies and faults.resetAfter:
            room = faults.resetAfter - self.carried[direction]
            if len(data) >= room:
                await self._send(direction, data[: max(room, 0)], writer)
                self.reset()
                return
        if applies and not faults.unstalled.is_set():
            faults.stats["stalled"] += 1
            try:
                while not (faults.unstalled.is_set() or self.closed):
                    await asyncio.sleep(0.05)
            finally:
                faults.stats["stalled"] -= 1
        if applies and faults.delay:
            await asyncio.sleep(faults.delay)
        await faults.pace(direction, len(data))
        await self._send(direction, data, writer)

    async def _send(self, direction: str, data: bytes, writer: Any) -> None:
        if not data or self.closed:
            return
        start = self.carried[direction]
        at = self.corruptAt
        if (
            at >= 0
            and self.faults.applies(direction)
            and not self.corrupted[direction]
            and start <= at < start + len(data)
        ):
            altered = bytearray(data)
            altered[at - start] ^= 0xFF
            data = bytes(altered)
            self.corrupted[direction] = True
            self.faults.stats["corrupted"] += 1
        self.carried[direction] += len(data)
        self.faults.stats[f"bytes_{direction}"] += len(data)
        writer.write(data)
        await writer.drain()

    async def _stallForever(self) -> None:
        self.held = True
        self.faults.stats["stalled"] += 1
        try:
            while not self.closed and not self.ended:
                await asyncio.sleep(0.1)
        finally:
            self.faults.stats["stalled"] -= 1
        self.close()  # the other side ended: nothing held can go anywhere now

    def reset(self) -> None:
        """Close both sides with a TCP reset (RST), not a clean close."""
        if self.closed:
            return
        self.faults.stats["resets"] += 1
        for pair in (self.client, self.server):
            if pair is None:
                continue
            sock = pair[1].get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                except OSError:
                    pass
            pair[1].transport.abort()
        self.closed = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pair in (self.client, self.server):
            if pair is not None:
                pair[1].close()


class Proxy:
    """The listening relay and its control socket."""

    def __init__(self, upstream: tuple[str, int], buffer: int = 256 * 1024) -> None:
        self.upstream = upstream
        self.buffer = buffer
        self.faults = Faults()
        self.relays: set[Relay] = set()

    async def accepted(self, reader: Any, writer: Any) -> None:
        relay = Relay(self, reader, writer)
        self.relays.add(relay)
        await relay.run()

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "set":
            self.faults.update(request)
        elif op == "clear":
            self.faults.clear()
        elif op == "reset":
            least = int(request.get("min_bytes", 0))
            for relay in list(self.relays):
                if relay.carried["up"] >= least:
                    relay.reset()
        elif op != "stats":
            raise ValueError(f"unknown op {op!r}")
        return {"ok": True, "stats": dict(self.faults.stats)}

    async def control(self, reader: Any, writer: Any) -> None:
        try:
            while line := await reader.readline():
                try:
                    answer = self.command(json.loads(line))
                except (ValueError, TypeError) as e:
                    answer = {"ok": False, "error": str(e)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


def parseAddress(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(args: argparse.Namespace) -> None:
    proxy = Proxy(parseAddress(args.connect), args.buffer)
    host, port = parseAddress(args.listen)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A router's buffers, not a host's: what the proxy holds is acknowledged to
    # the sender, so keep it small (accepted sockets inherit it).
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.buffer)
    listener.bind((host, port))
    server = await asyncio.start_server(proxy.accepted, sock=listener)
    if os.path.exists(args.control):
        os.unlink(args.control)
    control = await asyncio.start_unix_server(proxy.control, args.control)
    print("fault proxy ready", flush=True)
    async with server, control:
        await asyncio.gather(server.serve_forever(), control.serve_forever())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="faultproxy.py")
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--connect", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--control", required=True, help="the control unix socket")
    parser.add_argument(
        "--buffer",
        type=int,
        default=256 * 1024,
        help="socket buffer sizes, bytes (small, as a router's: default 256 KiB)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


# -- the tests' side ------------------------------------------------------------------


class FaultProxy:
    """
    A running fault proxy, steered from a test (blocking calls on its local
    control socket: for synchronous tests and fixtures).

    @ivar listen: ``HOST:PORT`` where it accepts (give it as the ``--target``).
    """

    def __init__(self, process: Any, listen: str, control: str) -> None:
        self.process = process
        self.listen = listen
        self.controlPath = control

    @property
    def port(self) -> int:
        """The port it accepts on."""
        return int(self.listen.rsplit(":", 1)[1])

    @classmethod
    def start(cls, network: Any, listen: str, connect: str, control: str) -> FaultProxy:
        """Run a proxy in ``network``'s router, wait until it is ready."""
        import subprocess
        import sys

        argv = [
            sys.executable,
            os.path.abspath(__file__),
            "--listen",
            listen,
            "--connect",
            connect,
            "--control",
            control,
        ]
        process = network.popenInRouter(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        line = process.stdout.readline()
        if "ready" not in line:
            process.kill()
            rest = process.stdout.read()
            raise RuntimeError(f"the fault proxy did not start: {line}{rest}")
        return cls(process, listen, control)

    def call(self, **request: Any) -> dict[str, Any]:
        """Send one command; its answer's ``stats``, or raise with its error."""
        with self._connection() as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                data = sock.recv(4096)
                if not data:
                    raise RuntimeError("the fault proxy closed its control socket")
                answer += data
        reply = json.loads(answer)
        if not reply["ok"]:
            raise ValueError(reply["error"])
        return dict(reply["stats"])

    @contextmanager
    def _connection(self) -> Iterator[socket.socket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(self.controlPath)
            yield sock
        finally:
            sock.close()

    def set(self, **faults: Any) -> dict[str, Any]:
        """Change the faults (``delay=0.1``, ``stall=True``, ...); the counts."""
        return self.call(op="set", **faults)

    def clear(self) -> dict[str, Any]:
        return self.call(op="clear")

    def reset(self, minBytes: int = 0) -> dict[str, Any]:
        """Reset every open connection (that carried ``minBytes`` up)."""
        return self.call(op="reset", min_bytes=minBytes)

    def stats(self) -> dict[str, Any]:
        return self.call(op="stats")

    def stop(self) -> None:
        """SIGTERM the proxy (by pid) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


if __name__ == "__main__":
    main()
