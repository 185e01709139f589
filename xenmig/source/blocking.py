"""
A blocking client for toolstacks that are not Twisted (xend, scripts, threads).

Usage, from any thread but the reactor's::

    from xenmig.source.blocking import BlockingMigrationClient
    from xenmig.source.client import tlsArguments
    from xenmig import tls

    options = tlsArguments("hostb", tls.loadIdentity(cert, key),
                           tls.loadAuthority(ca))
    with BlockingMigrationClient("hostb", 8002, **options, resume=True) as client:
        migration = client.prepare("vm1", [DeviceSpec.parse("file:blob:...")])
        migration.precopy()          # optional, VM running
        pauseTheVM()
        migration.paused()
        try:
            migration.transfer()
            migration.commit()       # CommitInDoubt: do NOT resume; ask
        except CommitInDoubt:
            raise
        except Exception:
            resumeTheVM()            # the migration was aborted and rolled back
            raise

Threads: the first client starts Twisted's global reactor in one background
thread (``installSignalHandlers=False``; signals stay with the application, and
ended child processes are reaped by polling instead of on SIGCHLD) and every call
is handed to it with ``blockingCallFromThread``; the calling thread blocks until
the step finishes and gets its result or its exception.  Each
method may be called from any thread except the reactor's own (that would
deadlock: it raises instead).  Steps of *one* migration must be called in
order, not concurrently; different migrations may run from different threads
at once.  Every step is bounded by the client's time-outs
(L{xenmig.source.connection.ClientTimeouts}), so no call blocks forever.

Shutdown: L{shutdown} stops the reactor thread (after a migration's last step:
it does not wait for migrations under way) and joins it.  It runs by itself
when the interpreter exits (before non-daemon threads are joined), so a
program that forgets it still exits.  A stopped reactor cannot be started
again: call L{shutdown} once, when the program is done with migrations.  A
program that runs its own reactor must use L{xenmig.source.client} directly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import blockingCallFromThread

from xenmig.interfaces import IConvergencePolicy, IDeviceKind
from xenmig.model import DEFAULT_PORT, ContentDigest, DeviceSpec
from xenmig.source.client import MigrationClient
from xenmig.source.connection import ClientTimeouts
from xenmig.source.migration import SourceMigration

T = TypeVar("T")

#: Seconds between two reapings of ended child processes (see _startReaper).
REAP_INTERVAL = 0.2


class ReactorThread:
    """The global reactor, run once in a background thread for blocking callers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._reaper: LoopingCall | None = None

    @property
    def reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor

    def start(self) -> Any:
        """Start the reactor thread unless it runs; the reactor."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(
                    "xenmig.source.blocking was shut down; the reactor cannot restart"
                )
            if self._thread is None:
                reactor = self.reactor
                if reactor.running:
                    raise RuntimeError(
                        "the Twisted reactor already runs in this process: use "
                        "xenmig.source.client directly, not the blocking client"
                    )
                self._thread = threading.Thread(
                    target=reactor.run,
                    kwargs={"installSignalHandlers": False},
                    name="xenmig-reactor",
                    daemon=True,
                )
                self._thread.start()
                reactor.callFromThread(self._startReaper, reactor)
                _registerExit(shutdown)
        return self.reactor

    def _startReaper(self, reactor: Any) -> None:
        """
        Without signal handlers no SIGCHLD tells Twisted a child has exited: a
        child whose pipes close before it exits (a shell running a background
        job, swtpm, qemu) would never be reaped, and its processEnded never
        come.  Reap every few tenths of a second instead.
        """
        from twisted.internet.process import reapAllProcesses

        self._reaper = LoopingCall(reapAllProcesses)
        self._reaper.clock = reactor
        self._reaper.start(REAP_INTERVAL, now=False)

    def call(self, function: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """
        Run ``function`` in the reactor thread and wait for its result (a
        Deferred's or a coroutine's result, once it fires).

        @raise RuntimeError: if called from the reactor thread itself.
        """
        reactor = self.start()
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking xenmig call from the reactor thread")

        def inReactor() -> Any:
            result = function(*args, **kw)
            if hasattr(result, "__await__") and not isinstance(result, Deferred):
                return Deferred.fromCoroutine(result)
            return result

        return blockingCallFromThread(reactor, inReactor)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the reactor and join its thread (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopped = True
        if thread is None or threading.current_thread() is thread:
            return
        reactor = self.reactor
        reactor.callFromThread(_stopQuietly, reactor)
        thread.join(timeout)


def _stopQuietly(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def _registerExit(function: Callable[[], None]) -> None:
    """Run ``function`` at exit, before the interpreter joins non-daemon threads
    (the reactor's thread pool threads are not daemons)."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(function)
    else:  # pragma: no cover - every supported Python has it
        import atexit

        atexit.register(function)


_THREAD = ReactorThread()


def shutdown(timeout: float = 30.0) -> None:
    """Stop the reactor thread of every blocking client; it cannot restart."""
    _THREAD.stop(timeout)


class BlockingMigration:
    """One migration, driven step by step from a plain thread."""

    def __init__(self, thread: ReactorThread, migration: SourceMigration) -> None:
        self._thread = thread
        self._migration = migration

    @property
    def migrationId(self) -> str:
        return self._migration.migrationId

    @property
    def phase(self) -> str:
        return str(self._thread.call(lambda: self._migration.phase.value))

    def precopy(self, policy: IConvergencePolicy | None = None) -> dict[str, list[int]]:
        """Pre-copy rounds while the VM runs; bytes per round, per device."""
        return self._thread.call(self._migration.precopy, policy)

    def paused(self) -> None:
        """Note that the toolstack has just paused the VM."""
        self._thread.call(self._migration.paused)

    def transfer(self) -> dict[str, ContentDigest]:
        """The final state, verified by the target; digests by device."""
        return self._thread.call(self._migration.transfer)

    def commit(self) -> list[str]:
        """
        The point of no return; what the target installed.

        @raise xenmig.errors.CommitInDoubt: do NOT resume the VM here; ask.
        """
        return self._thread.call(self._migration.commit)

    def abort(self, reason: str) -> None:
        """Abort before commit and roll back; the VM may then be resumed here."""
        self._thread.call(self._migration.abort, reason)

    def report(self) -> dict[str, Any]:
        """The JSON report (per-device bytes, digests, phase durations)."""
        return self._thread.call(self._migration.report)

    def progress(self) -> list[tuple[str, int, int]]:
        """``(device, bytes sent, bytes expected)`` for every device."""
        return self._thread.call(self._migration.progress)


class BlockingMigrationClient:
    """
    L{MigrationClient} for code that blocks: same arguments, same steps.

    Usable as a context manager; leaving it does not stop the shared reactor
    thread (see L{shutdown}).
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        tls: Any = None,
        timeouts: ClientTimeouts | None = None,
        kinds: dict[str, IDeviceKind] | None = None,
        **options: Any,
    ) -> None:
        """
        The arguments of L{MigrationClient}; give the TLS ones with
        L{xenmig.source.client.tlsArguments} so that state streams send from
        their own threads, and ``resume=True`` to reconnect a broken link.
        ``onRetry``, if given, is called in the reactor's thread.
        """
        self._thread = _THREAD
        reactor = self._thread.start()
        self._client = MigrationClient(
            reactor, host, port, tls, timeouts, kinds, **options
        )

    def __enter__(self) -> BlockingMigrationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hang up the control connections kept for later migrations (if any)."""
        if len(self._client.idle):
            self._thread.call(self._client.closeIdle)

    def prepare(
        self,
        domain: str,
        specs: Sequence[DeviceSpec],
        migrationId: str | None = None,
        bandwidth: int | None = None,
    ) -> BlockingMigration:
        """
        Open a migration on the target (VM still running); ``bandwidth``: the
        most bytes per second its streams send together (None: no limit).

        @raise xenmig.errors.DeviceRefused: naming each refused device and why.
        """
        migration = self._thread.call(
            self._client.prepare, domain, list(specs), migrationId, bandwidth
        )
        return BlockingMigration(self._thread, migration)

    def query(self, migrationId: str) -> dict[str, Any]:
        """The target's status of a migration."""
        return self._thread.call(self._client.query, migrationId)

    def listMigrations(self, limit: int = 50) -> list[dict[str, Any]]:
        """The target's most recent migrations."""
        return self._thread.call(self._client.listMigrations, limit)

    def abortMigration(self, migrationId: str, reason: str) -> str:
        """Abort a migration on the target by id; its phase afterwards."""
        return self._thread.call(self._client.abortMigration, migrationId, reason)
