"""
``xenmig migrate --via-daemon``: the local daemon sends, the command line
shows.  Standard library only (no Twisted, no OpenSSL): it speaks AMP on the
daemon's owner-only socket through the small box codec below, sends
SendMigration, draws the events that come back as the in-process command
does, and on Ctrl-C asks the daemon to interrupt.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

from xenmig.model import (
    DEFAULT_STATE_DIR,
    INTERRUPT_SEND,
    LOCAL_SOCKET,
    SEND_EVENT,
    SEND_MIGRATION,
    SEND_PROTOCOL,
)
from xenmig.toolstack.outcome import (
    EXIT_FAILED,
    EXIT_IN_DOUBT,
    EXIT_USAGE,
    printJSONError,
    say,
)
from xenmig.toolstack.progress import ProgressDisplay, printOutcome
from xenmig.toolstack.sendrequest import BARS, refused, requestOptions

#: The longest options one SendMigration carries (the daemon's JSON limit).
MAX_OPTIONS = 60 * 1024
#: The ask key of the one SendMigration a connection carries.
_ASK = b"1"


class DaemonUnreachable(Exception):
    """No daemon on the socket, or one that cannot send: one line, exit 2."""


class LeftEarly(Exception):
    """A second SIGINT or SIGTERM: the command leaves without the daemon's answer."""


class RequestTooLong(Exception):
    """The options do not fit in one AMP value (65,535 bytes)."""


# -- AMP boxes, with the standard library ---------------------------------------


def encodeBox(box: dict[bytes, bytes]) -> bytes:
    """One AMP box: each key and value prefixed by its 16-bit length, then 0."""
    parts = []
    for key, value in box.items():
        if not 0 < len(key) <= 255 or len(value) > 0xFFFF:
            raise ValueError(f"AMP key {key!r} or its value is too long")
        parts += [
            struct.pack("!H", len(key)),
            key,
            struct.pack("!H", len(value)),
            value,
        ]
    return b"".join(parts) + b"\x00\x00"


class BoxReader:
    """Reads AMP boxes from a connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def boxes(self) -> Iterator[dict[bytes, bytes]]:
        """Every box until the daemon closes the connection."""
        box: dict[bytes, bytes] = {}
        while True:
            length = self._exactly(2)
            if length is None:
                return
            (size,) = struct.unpack("!H", length)
            if size == 0:
                yield box
                box = {}
                continue
            key = self._exactly(size)
            value_length = self._exactly(2)
            if key is None or value_length is None:
                return
            value = self._exactly(struct.unpack("!H", value_length)[0])
            if value is None:
                return
            box[key] = value

    def _exactly(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


# -- the run ---------------------------------------------------------------------


def socketPath(given: str) -> str:
    """``--via-daemon``'s value: a state directory, or the socket itself."""
    path = os.path.abspath(given or DEFAULT_STATE_DIR)
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return path
    except OSError:
        pass
    return os.path.join(path, LOCAL_SOCKET)


def connect(path: str) -> socket.socket:
    """
    @raise DaemonUnreachable: naming the socket and what to do.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise DaemonUnreachable(
            f"no daemon socket at {path}: is 'twistd xenmig' running on this host "
            f"with --state-dir {os.path.dirname(path)}? (--via-daemon sends "
            f"through it)"
        )
    except ConnectionRefusedError:
        sock.close()
        raise DaemonUnreachable(
            f"nothing listens on {path} (connection refused): the daemon that made "
            f"it has stopped; start 'twistd xenmig' with --state-dir "
            f"{os.path.dirname(path)} again"
        )
    except OSError as e:
        sock.close()
        raise DaemonUnreachable(
            f"cannot connect to {path}: {e.strerror} (the socket is its daemon's "
            f"owner's only)"
        )
    return sock


class ViaDaemon:
    """One ``migrate --via-daemon``: the request, the events, the exit status."""

    def __init__(self, args: argparse.Namespace, path: str) -> None:
        self.args = args
        self.path = path
        bars = sys.stderr.isatty()
        clock = argparse.Namespace(seconds=time.monotonic)
        self.display = ProgressDisplay(clock, sys.stderr, bars, "xenmig migrate")
        self.latest: list[tuple[str, int, int]] = []
        self.following = False
        self.report: list[str] = []
        self.sock: socket.socket | None = None
        self.interrupted = False

    def run(self) -> int:
        """Send the request, show what comes back; the exit status."""
        options = requestOptions(self.args, os.getcwd())
        options[BARS] = self.display.bars
        encoded = json.dumps(options, separators=(",", ":")).encode()
        if len(encoded) > MAX_OPTIONS:
            raise RequestTooLong(
                f"--via-daemon: the options take {len(encoded)} bytes, more than the "
                f"{MAX_OPTIONS} one request carries: fewer or shorter --device"
            )
        self.sock = sock = connect(self.path)
        request = {
            b"_command": SEND_MIGRATION,
            b"_ask": _ASK,
            b"protocol": str(SEND_PROTOCOL).encode(),
            b"options": encoded,
        }
        previous = {s: signal.signal(s, self._interrupt) for s in _SIGNALS}
        try:
            sock.sendall(encodeBox(request))
            for box in BoxReader(sock).boxes():
                if box.get(b"_command") == SEND_EVENT:
                    self._event(json.loads(box[b"event"]))
                elif box.get(b"_answer") == _ASK:
                    return self._ended(int(box[b"exit_status"]))
                elif box.get(b"_error") == _ASK:
                    return self._refused(box)
        except LeftEarly:
            return self._lost("the command left before the daemon's answer")
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            sock.close()
        return self._lost(
            f"the daemon at {self.path} closed the connection before the migration "
            f"ended"
        )

    def _interrupt(self, number: int, frame: Any) -> None:
        """Ctrl-C (SIGINT) or SIGTERM: the daemon aborts, as in-process."""
        if self.sock is None:
            return
        if self.interrupted:
            raise LeftEarly()
        self.interrupted = True
        box = {b"_command": INTERRUPT_SEND}
        try:
            self.sock.sendall(encodeBox(box))
        except OSError:
            pass

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "phase":
            self.display.phase(event["message"])
            if self.following:
                self.display.redraw()
        elif kind == "say":
            say(self.args, event["message"])
        elif kind == "echo":
            sys.stderr.write(event["text"])
            sys.stderr.flush()
        elif kind == "start":
            self.latest = [tuple(device) for device in event["devices"]]  # type: ignore[misc]
            self.display.follow(lambda: self.latest, event["continued"])
            self.following = True
            self.display.redraw()
        elif kind == "progress" and self.following:
            self.latest = [tuple(device) for device in event["devices"]]  # type: ignore[misc]
            self.display.redraw()
        elif kind == "stop" and self.following:
            self.display.leave()
            self.following = False
        elif kind == "report":
            self.report.append(event["text"])
        elif kind == "error":  # the options refused: as the in-process run says it
            say(self.args, f"error: {event['message']}")
            if self.args.json:
                printJSONError(event["code"], event["message"], EXIT_USAGE)

    def _ended(self, code: int) -> int:
        if self.report:
            printOutcome(
                self.args.json, code, json.loads("".join(self.report)), sys.stdout
            )
        return code

    def _refused(self, box: dict[bytes, bytes]) -> int:
        """The daemon refused SendMigration itself (an older one does not know it)."""
        code = box.get(b"_error_code", b"").decode(errors="replace")
        description = box.get(b"_error_description", b"").decode(errors="replace")
        if "Unhandled Command" in description:
            message = (
                f"the daemon at {self.path} cannot send migrations (it is older than "
                f"this xenmig): upgrade it, or migrate without --via-daemon"
            )
        else:
            message = f"the daemon at {self.path}: {description}"
        return _fail(self.args, "VIA_DAEMON", message, EXIT_USAGE, code)

    def _lost(self, what: str) -> int:
        """No answer from the daemon: what became of the migration is unknown here."""
        return _fail(
            self.args,
            "COMMIT_IN_DOUBT",
            f"{what}: do NOT resume the VM here before asking the target with "
            f"'xenmig status' (the daemon's log says what happened)",
            EXIT_IN_DOUBT,
        )


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _fail(
    args: argparse.Namespace, code: str, message: str, exit: int, wire: str = ""
) -> int:
    say(args, f"error: {message}")
    if args.json:
        printJSONError(wire if wire and wire != "UNHANDLED" else code, message, exit)
    return exit


def runViaDaemon(args: argparse.Namespace) -> int:
    """``xenmig migrate --via-daemon``; its exit status."""
    problem = refused(args, args.settings.values)
    if problem is not None:
        return _fail(args, "USAGE", problem, EXIT_USAGE)
    path = socketPath(args.via_daemon)
    try:
        return ViaDaemon(args, path).run()
    except DaemonUnreachable as e:
        return _fail(args, "CONFIGURATION", str(e), EXIT_USAGE)
    except KeyboardInterrupt:  # before the daemon was asked: nothing started
        return _fail(args, "INTERRUPTED", "interrupted on the source", EXIT_FAILED)
    except RequestTooLong as e:
        return _fail(args, "USAGE", str(e), EXIT_USAGE)
    except OSError as e:
        return _fail(args, "VIA_DAEMON", f"{path}: {e}", EXIT_FAILED)
