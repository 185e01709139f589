"""``xenmig completion``: a shell's completion script, made from the parser by shtab."""

from __future__ import annotations

import argparse
from typing import Any

from xenmig.cli.arguments import addVerbose
from xenmig.toolstack.outcome import EXIT_OK, UsageError

SHELLS = ("bash", "zsh", "tcsh")

#: What shtab completes an argument with, by the argument's metavar.
_FILES = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_DIRECTORIES = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}
_PATHS = {"FILE": _FILES, "DIR": _DIRECTORIES, "STATE_DIR|SOCKET": _FILES}


def register(
    subcommands: argparse._SubParsersAction[Any], top: argparse.ArgumentParser
) -> None:
    """Add ``completion`` to the ``xenmig`` command line (``top``)."""
    completion = subcommands.add_parser(
        "completion",
        help="print the shell completion script (bash, zsh or tcsh)",
        description="Print a completion script for SHELL, generated from xenmig's "
        "own parser: source it, or install it where the shell looks for them.",
    )
    addVerbose(completion)
    completion.add_argument(
        "shell", choices=SHELLS, metavar="SHELL", help="the shell to complete for"
    )
    completion.set_defaults(main=main, parser=top)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Print the script on stdout."""
    print(script(args.parser, args.shell), end="")
    return EXIT_OK


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of ``parser`` for ``shell``: file and directory
    arguments (metavar FILE or DIR, ``--dir``) complete as paths."""
    try:
        import shtab
    except ImportError:
        raise UsageError("shell completion needs the shtab package: pip install shtab")
    _markPaths(parser)
    return shtab.complete(parser, shell=shell)


def _markPaths(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _markPaths(child)
            continue
        paths = _PATHS.get(str(action.metavar))
        if paths is None and "--dir" in action.option_strings:
            paths = _DIRECTORIES
        if paths is not None:
            action.complete = paths  # type: ignore[attr-defined]
