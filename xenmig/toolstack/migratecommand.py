"""One ``xenmig migrate`` run from the source's side: its steps, the VM, its report."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from xenmig.clients.processes import fireOnce
from xenmig.errors import BadSpec, CommitInDoubt, MigrationAborted, XenmigError
from xenmig.model import hostPort
from xenmig.source.phase import FINAL, Phase
from xenmig.toolstack.failures import Explained, diagnose
from xenmig.toolstack.outcome import (
    EXIT_FAILED,
    EXIT_IN_DOUBT,
    EXIT_OK,
    EXIT_USAGE,
    Reach,
    reach,
)
from xenmig.toolstack.progress import (
    ProgressDisplay,
    downtimeLine,
    formatBytes,
    formatRate,
    formatSeconds,
    printOutcome,
    ramRound,
)

if TYPE_CHECKING:
    from xenmig.source.migration import SourceMigration


class PauseFailed(XenmigError):
    """The toolstack's pause command failed or did not finish in time."""


class TerminalConsole:
    """
    Where a L{MigrateCommand} speaks to its operator: one-line messages and
    the pause and resume commands' output on stderr, the outcome on stdout.
    (The daemon's local sender forwards the same to ``--via-daemon``.)
    """

    def __init__(self, command: str = "migrate") -> None:
        self.command = command
        self.echo: Any = sys.stderr

    def say(self, message: str) -> None:
        """One line for the operator, named after the subcommand."""
        print(f"xenmig {self.command}: {message}", file=sys.stderr, flush=True)

    def outcome(self, json: bool, code: int, report: dict[str, Any]) -> None:
        """The report as JSON (``json``), else a committed migration's summary."""
        printOutcome(json, code, report, sys.stdout)


class MigrateCommand:
    """
    One ``xenmig migrate``: prepare, [pre-copy, pause the VM,] transfer, commit;
    on a failure, abort (and with ``--live``, resume the VM here).
    """

    def __init__(
        self,
        reactor: Any,
        migration: SourceMigration,
        args: argparse.Namespace,
        display: ProgressDisplay,
        policy: Any = None,
        control: Any = None,
        console: Any = None,
        reached: Reach | None = None,
    ) -> None:
        self.reactor = reactor
        self.migration = migration
        self.args = args
        self.display = display
        self.policy = policy
        self.control = control  # an IDomainControl, or None
        self.released: bool | None = None
        self.target = hostPort(*args.target)
        self.reach = reached or reach(args)
        #: A L{TerminalConsole}, or what forwards the same elsewhere.
        self.console = console or TerminalConsole(args.command)
        #: Why the migration did not commit (for --json), once it is known.
        self.error: Explained | None = None
        self.pause: dict[str, Any] | None = None
        self.resumed: bool | None = None
        self.interrupted = False
        self.shuttingDown = False
        self.done: Deferred[None] = Deferred()

    async def run(self) -> int:
        """Migrate; print the outcome; the exit status."""
        trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._shutdown
        )
        try:
            code = await self._run()
        finally:
            self.display.stop()
            if not self.shuttingDown:
                self.reactor.removeSystemEventTrigger(trigger)
        self._output(code)
        self.done.callback(None)
        return code

    async def _run(self) -> int:
        migration = self.migration
        try:
            self.display.phase(
                f"migration {migration.migrationId} of {self.args.domain} to "
                f"{self.target}: preparing {len(self.args.device)} device(s)"
            )
            await migration.prepare(self.args.device)
            self._goOn()
            self.display.phase("the target accepted every device")
            if migration.bandwidth:
                self.display.phase(
                    f"bandwidth limited to {formatRate(migration.bandwidth)}, "
                    f"shared by the migration's streams"
                )
            if self.args.live:
                await self._precopy()
                self._goOn()  # never pause the VM after an interrupt
            if self.args.live or self.control is not None:
                await self._pauseVM()
                self._goOn()
            await self._transfer()
            self._goOn()
        except Exception as e:
            return await self._failed(e)
        try:
            self.display.phase("committing")
            await migration.commit()
        except CommitInDoubt as e:
            return self._inDoubt(e)
        except Exception as e:
            # The target's definite word: it did not commit (SourceMigration
            # turns every other outcome into CommitInDoubt).
            return await self._failed(e, notCommitted=True)
        self.display.phase("committed: the VM now belongs to the target")
        if self.control is not None:
            await self._releaseVM()
        return EXIT_OK

    def _goOn(self) -> None:
        """Stop between steps once interrupted (SIGINT, SIGTERM)."""
        if self.interrupted:
            raise MigrationAborted("interrupted on the source")

    async def _precopy(self) -> None:
        self.display.phase("pre-copy while the VM runs")
        self.display.start(self.migration.progress)
        rounds = await self.migration.precopy(self.policy)
        self.display.stop()
        for name, sent in rounds.items():
            self.display.phase(
                f"{name}: {len(sent)} pre-copy round(s), {formatBytes(sum(sent))}"
            )
            figures = self.migration.devices[name].roundFigures or []
            for number, figure in enumerate(figures):
                if "ram_remaining" in figure:
                    self.display.phase(ramRound(name, number, figure))
        downtime = self.migration.report().get("downtime")
        if downtime is not None:
            self.display.phase(downtimeLine(downtime))

    async def _pauseVM(self) -> None:
        from xenmig.clients.processes import runShell

        command = self.args.pause_command
        if self.control is not None:
            command = self.control.description
        self.display.phase(f"pausing the VM: {command}")
        started = self.reactor.seconds()
        self.pause = {"command": command, "status": None, "seconds": None}
        if self.control is not None:
            await self.control.pause()  # DomainControlError says what failed
            status: int | None = 0
        else:
            child = await runShell(
                self.reactor, command, self.args.command_timeout, echo=self.console.echo
            )
            status = child.status
        self.pause["status"] = status
        self.pause["seconds"] = round(self.reactor.seconds() - started, 6)
        if status != 0:
            raise PauseFailed(
                f"the pause command {command!r} exited with status {status}"
            )
        self.migration.paused()
        self.display.phase(f"VM paused ({formatSeconds(self.pause['seconds'])})")

    async def _transfer(self) -> None:
        self.display.phase("transferring the final state")
        # After pre-copy rounds, the bars show the final round alone.
        self.display.start(self.migration.progress, continued="final round")
        digests = await self.migration.transfer()
        self.display.stop()
        for name, digest in digests.items():
            self.display.phase(f"{name}: verified by the target ({digest.hex})")

    def _inDoubt(self, error: CommitInDoubt) -> int:
        self.display.stop()
        self.error = Explained("COMMIT_IN_DOUBT", str(error))
        self.console.say(f"COMMIT IN DOUBT: {error}")
        self.console.say(
            f"do NOT resume the VM here: it may already run on the target; ask "
            f"with 'xenmig status {self.migration.migrationId} --target "
            f"{self.target} --ca ... --cert ...' (COMMITTED: destroy it here; "
            f"ABORTED: resume it here)",
        )
        return EXIT_IN_DOUBT

    async def _failed(self, error: BaseException, notCommitted: bool = False) -> int:
        """
        Say why the migration aborted, resume the VM here if it was paused;
        ``notCommitted``: the target refused the commit (and reversed it).
        """
        self.display.stop()
        migration = self.migration
        contacted = migration.control is not None
        if self.interrupted:
            explained = Explained("INTERRUPTED", "interrupted on the source")
        else:
            answered = "prepared" in migration.times
            explained = await diagnose(self.reactor, error, self.reach, answered)
        if migration.phase not in FINAL or migration.phase is Phase.ABORTED:
            # Aborted already (an interrupt, say): its Abort may still be on
            # its way to the target; the command ends once it has arrived.
            await migration.abort(explained.message)
        # An error in its own words leaves the reason the migration recorded
        # (the target's own, when it aborted first); an explained one replaces it.
        if not (explained.verbatim and migration.reason):
            migration.reason = explained.message
        self.error = Explained(explained.code, migration.reason)
        self.console.say(
            f"migration {migration.migrationId} aborted: {migration.reason}"
        )
        if notCommitted:
            self.console.say(
                "the target did not commit: it removed what it had installed and "
                "will never release the VM there",
            )
        if self.pause is not None:
            await self._resumeVM()
        elif self.args.live:
            self.console.say("the VM was not paused: it keeps running here")
        elif notCommitted:
            self.console.say("the VM may be resumed here")
        else:
            self.console.say(
                "nothing was installed on the target; the VM may be resumed here",
            )
        if isinstance(error, BadSpec) and not contacted:
            return EXIT_USAGE
        return EXIT_FAILED

    async def _resumeVM(self) -> None:
        from xenmig.clients.processes import ProcessFailed, runShell

        command = self.args.resume_command
        if self.control is not None:
            command = self.control.description
        self.console.say(f"resuming the VM here: {command}")
        try:
            if self.control is not None:
                await self.control.resume()
                status: Any = 0
            else:
                child = await runShell(
                    self.reactor,
                    command,
                    self.args.command_timeout,
                    echo=self.console.echo,
                )
                status = child.status
        except (ProcessFailed, XenmigError) as e:
            status = str(e)
        self.resumed = status == 0
        if self.resumed:
            self.console.say("the VM was resumed here")
        else:
            self.console.say(
                f"THE RESUME COMMAND FAILED ({status}): resume the VM here by hand "
                f"(the target did not commit and will not release it)",
            )

    async def _releaseVM(self) -> None:
        """After the commit: let the domain control release the VM here."""
        assert self.control is not None
        try:
            await self.control.release()
            self.released = True
            self.display.phase(f"released the VM here ({self.control.description})")
        except XenmigError as e:
            self.released = False
            self.console.say(
                f"the VM runs on the target; releasing it here failed: {e}"
            )

    def _shutdown(self) -> Deferred[None] | None:
        """Before the reactor stops (SIGINT, SIGTERM): L{interrupt}."""
        self.shuttingDown = True
        return self.interrupt()

    def interrupt(self) -> Deferred[None] | None:
        """
        Abort unless committing (as SIGINT does); a Deferred that fires once
        the command has ended (or after the commit's time-out), None if it has.
        """
        if self.done.called:
            return None
        self.interrupted = True
        migration = self.migration
        committing = "commit" in migration.times
        if migration.phase not in FINAL and not (committing):
            Deferred.fromCoroutine(
                migration.abort("interrupted on the source")
            ).addErrback(lambda _: None)
        waiter: Deferred[None] = Deferred()
        self.done.addBoth(lambda result: fireOnce(waiter, None))
        waiter.addTimeout(self.migration.client.timeouts.commit + 30, self.reactor)
        return waiter.addErrback(lambda _: None)

    def report(self, code: int) -> dict[str, Any]:
        """The client's report, with the target, exit status and the VM's pause."""
        report = self.migration.report()
        report["target"] = self.target
        report["exit_status"] = code
        report["error"] = None if self.error is None else self.error.asJSON()
        if self.args.live or self.control is not None:
            report["live"] = {"pause": self.pause, "resumed": self.resumed}
        if self.control is not None:
            report["domain_control"] = {
                "control": self.control.description,
                "released": self.released,
            }
        return report

    def _output(self, code: int) -> None:
        self.console.outcome(self.args.json, code, self.report(code))
