"""
From ``xenmig migrate``'s options to a L{MigrateCommand} ready to run: the
checks, the client, the migration.  The command line runs it in its own
process; the daemon's local sender runs the same for ``--via-daemon``.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from xenmig.toolstack.outcome import Reach, UsageError


def buildCommand(
    reactor: Any,
    args: argparse.Namespace,
    tls: Callable[[], dict[str, Any]],
    display: Any,
    console: Any = None,
    reached: Reach | None = None,
    idle: Any = None,
) -> Any:
    """
    Check ``migrate``'s options, then make its L{MigrateCommand} (to ``run``):
    ``tls()`` gives the client's TLS keyword arguments, ``display`` shows the
    progress, ``console`` speaks to the operator (see L{MigrateCommand});
    ``idle``, the control connections kept to this target by earlier
    migrations (L{xenmig.source.idlepool.IdleConnections}), if any.

    @raise UsageError, BadSpec, ConfigurationError: one line naming the option.
    """
    from xenmig.plugins import LazyKinds
    from xenmig.source.client import MigrationClient
    from xenmig.source.connection import ClientTimeouts
    from xenmig.source.device import SourceContext
    from xenmig.source.migration import SourceMigration
    from xenmig.source.resumable import ResumePolicy
    from xenmig.toolstack.migratecommand import MigrateCommand

    control = _domainControl(args, reactor)
    if control is not None and (args.pause_command or args.resume_command):
        raise UsageError("give --domain-control or the pause and resume commands")
    if (
        args.live
        and control is None
        and not (args.pause_command and args.resume_command)
    ):
        raise UsageError(
            "--live needs --pause-command and --resume-command (or --domain-control)"
        )
    if not args.live and (args.pause_command or args.resume_command):
        raise UsageError("--pause-command and --resume-command need --live")
    kinds = LazyKinds()
    for spec in args.device:
        if spec.kind not in kinds:
            known = ", ".join(sorted(kinds)) or "none"
            raise UsageError(
                f"device {spec.name}: no device kind {spec.kind!r} here "
                f"(known: {known})"
            )
    for spec in args.device:  # the kind's own checks (it raises BadSpec)
        kinds[spec.kind].source(spec, SourceContext(None, reactor, spec.name))
    names = [spec.name for spec in args.device]
    if len(set(names)) != len(names):
        raise UsageError("two --device options have the same NAME")
    policy = _policy(args)
    host, port = args.target
    timeouts = ClientTimeouts(stall=args.stall_timeout)
    if args.busy_timeout is not None:
        timeouts = replace(timeouts, busy=args.busy_timeout)
    client = MigrationClient(
        reactor,
        host,
        port,
        kinds=kinds,
        timeouts=timeouts,
        onRetry=display.phase,
        resume=not args.no_resume,
        resumePolicy=ResumePolicy(seconds=args.reconnect_timeout),
        **tls(),
    )
    if idle is not None:
        client.idle = idle
    migrationId = args.migration_id or uuid.uuid4().hex
    migration = SourceMigration(
        client, args.domain, migrationId, bandwidth=args.bandwidth
    )
    return MigrateCommand(
        reactor, migration, args, display, policy, control, console, reached
    )


def _domainControl(args: argparse.Namespace, reactor: Any) -> Any:
    """The IDomainControl of ``--domain-control`` (None for none or absent)."""
    if not args.domain_control:
        return None
    from xenmig.toolstack.domains import parseDomainControl

    return parseDomainControl(args.domain_control, reactor, args.domain)


def _policy(args: argparse.Namespace) -> Any:
    from xenmig.source.convergence import ConvergencePolicy, DowntimePolicy

    if args.downtime_fallback and args.max_downtime is None:
        raise UsageError("--downtime-fallback needs --max-downtime")
    if args.max_downtime is not None:
        if not args.live:
            raise UsageError("--max-downtime needs --live (it ends pre-copy)")
        if args.convergence:
            raise UsageError("give --convergence or --max-downtime, not both")
        return DowntimePolicy(
            args.max_downtime,
            maxRounds=args.max_rounds or 10,
            fallback=args.downtime_fallback or "abort",
        )
    if args.convergence and args.max_rounds:
        raise UsageError("give --convergence or --max-rounds, not both")
    if args.convergence:
        return ConvergencePolicy.parse(args.convergence)
    if args.max_rounds:
        return ConvergencePolicy(maxRounds=args.max_rounds)
    return None
