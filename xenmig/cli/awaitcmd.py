"""``xenmig await``: on the target, wait until a domain's migration commits."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from xenmig.cli.arguments import addVerbose, parseMigrationId, positive
from xenmig.cli.connection import addStateDirOption
from xenmig.errors import ConfigurationError, XenmigError
from xenmig.toolstack.outcome import EXIT_FAILED, EXIT_OK, UsageError, say

if TYPE_CHECKING:
    from xenmig.toolstack.failures import Explained


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``await`` and its options to the ``xenmig`` command line."""
    wait = subcommands.add_parser(
        "await", help="on the target: wait until a migration of a domain commits"
    )
    addVerbose(wait)
    wait.add_argument("--domain", required=True, help="the VM's name")
    wait.add_argument(
        "--migration-id",
        type=parseMigrationId,
        metavar="ID",
        help="wait for this migration (even if already claimed)",
    )
    wait.add_argument(
        "--timeout",
        type=positive(float),
        default=3600.0,
        metavar="S",
        help="seconds to wait at most (default 3600)",
    )
    addStateDirOption(wait)
    wait.add_argument("--json", action="store_true", help="print JSON on stdout")
    wait.add_argument(
        "--resume",
        action="store_true",
        help="once committed, resume the VM here through --domain-control",
    )
    wait.add_argument(
        "--domain-control",
        metavar="xl|qmp:PATH|libvirt:URI",
        help="how --resume resumes the VM (default xl)",
    )
    wait.set_defaults(main=main)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """
    Wait on the local daemon's resume gate (AwaitRestored); print what was
    installed; with ``--resume``, resume the VM here.
    """
    from xenmig.toolstack.localcontrol import LocalControl

    resumer = _resumer(args, reactor)
    control = LocalControl(reactor, args.state_dir)
    try:
        answer = await control.awaitRestored(
            args.domain, args.timeout, args.migration_id
        )
    except ConfigurationError:
        raise
    except Exception as e:
        why = _whyNotRestored(e, args.state_dir)
        if args.json:
            result = {
                "domain": args.domain,
                "committed": False,
                "reason": why.message,
                "error": why.asJSON(),
            }
            print(json.dumps(result, indent=2))
        say(args, f"{args.domain}: not restored: {why.message}")
        return EXIT_FAILED
    installed = list(answer["installed"])
    resumed = await _resumeHere(args, resumer) if resumer is not None else None
    if args.json:
        result = {
            "domain": args.domain,
            "committed": True,
            "migration_id": answer["migration_id"],
            "installed": installed,
        }
        if resumer is not None:
            result["resumed"] = resumed
        print(json.dumps(result, indent=2))
    else:
        print(f"migration {answer['migration_id']} of {args.domain} committed")
        for path in installed:
            print(f"  installed {path}")
        if resumed:
            print(f"  resumed the VM ({resumer.description})")
    return EXIT_FAILED if resumed is False else EXIT_OK


def _whyNotRestored(error: BaseException, stateDir: str) -> Explained:
    """Why the wait ended without a VM, and, if the daemon went away, what to do."""
    from twisted.internet.error import ConnectionClosed

    from xenmig.toolstack.failures import Explained, explain

    if isinstance(error, ConnectionClosed):
        return Explained(
            "DAEMON_GONE",
            f"the daemon (state directory {stateDir}) went away while this waited; "
            f"whether the migration committed is in its journal: once the daemon "
            f"runs again, `xenmig status` shows it, and `xenmig await --migration-id "
            f"ID` hands out its commit again (even one this wait had claimed)",
        )
    return explain(error)


def _resumer(args: argparse.Namespace, reactor: Any) -> Any:
    """The IDomainControl that ``await --resume`` resumes the VM with, or None."""
    from xenmig.toolstack.domains import parseDomainControl

    if not args.resume:
        if args.domain_control:
            raise UsageError("--domain-control needs --resume")
        return None
    control = parseDomainControl(args.domain_control or "xl", reactor, args.domain)
    if control is None:
        raise UsageError("--resume needs a domain control: xl, qmp:PATH or libvirt:URI")
    return control


async def _resumeHere(args: argparse.Namespace, control: Any) -> bool:
    """Resume the committed VM on this host; whether that worked."""
    try:
        await control.resume()
    except XenmigError as e:
        say(
            args,
            f"{args.domain}: COMMITTED, BUT RESUMING IT FAILED ({e}): the VM's state "
            f"is installed here; resume it by hand",
        )
        return False
    say(args, f"{args.domain}: resumed ({control.description})")
    return True
