"""Telling systemd how the daemon is: sd_notify's datagrams (READY, RELOADING, ...)."""

from __future__ import annotations

import socket
import time
from collections.abc import MutableMapping

from twisted.logger import Logger

log = Logger()

#: The environment variable systemd sets for a ``Type=notify`` service.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


class SystemdNotifier:
    """
    Sends state lines (``READY=1``, ``STATUS=...``) to the service manager
    through the unix datagram socket ``address`` (a path, or ``@name`` for an
    abstract socket), as ``sd_notify(3)`` does; with no address, nothing.  A
    send never blocks (a datagram of a few bytes, on a non-blocking socket);
    one that fails is logged, and the daemon runs on.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def fromEnvironment(cls, environ: MutableMapping[str, str]) -> SystemdNotifier:
        """
        The notifier of ``$NOTIFY_SOCKET``, taken out of ``environ`` so that
        the programs the daemon runs (hooks, swtpm) do not inherit it.
        """
        return cls(environ.pop(NOTIFY_SOCKET, None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; whether it was sent."""
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        payload = "\n".join(lines).encode("utf-8")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.sendto(payload, target)
        except OSError as e:
            log.warn(
                "cannot notify the service manager at {address} ({lines}): {error}",
                address=self.address,
                lines=", ".join(lines),
                error=e.strerror or str(e),
            )
            return False
        finally:
            sock.close()
        return True

    def ready(self, status: str) -> bool:
        """The daemon serves (at start, and after a reload)."""
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> bool:
        """A reload begins (with ``MONOTONIC_USEC``, as notify-reload wants)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        """The daemon stops."""
        return self.notify("STOPPING=1", f"STATUS={status}")
