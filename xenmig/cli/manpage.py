"""Man pages made from the parsers themselves: xenmig(1) and twistd-xenmig(8)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from typing import Any

from xenmig import version
from xenmig.cli.arguments import addVerbose
from xenmig.toolstack.outcome import EXIT_OK

#: Each page: its file name, and the section directory it goes in.
PAGES = {"xenmig": "xenmig.1", "twistd-xenmig": "twistd-xenmig.8"}


def register(
    subcommands: argparse._SubParsersAction[Any], top: argparse.ArgumentParser
) -> None:
    """Add ``manpage`` to the ``xenmig`` command line (``top``)."""
    manpage = subcommands.add_parser(
        "manpage",
        help="print a man page (xenmig.1, twistd-xenmig.8), or write both",
        description="Print a man page, made from the command line's own parser "
        "(xenmig) or from the daemon's options (twistd-xenmig); or write both "
        "under a man directory.",
    )
    addVerbose(manpage)
    manpage.add_argument(
        "page",
        nargs="?",
        choices=sorted(PAGES),
        default="xenmig",
        metavar="PAGE",
        help="the page to print (default xenmig)",
    )
    manpage.add_argument(
        "--dir",
        metavar="DIR",
        help="write every page under DIR/man1 and DIR/man8 (e.g. "
        "/usr/local/share/man) and print their paths",
    )
    manpage.set_defaults(main=main, parser=top)


async def main(reactor: Any, args: argparse.Namespace) -> int:
    """Print the page, or write every page under ``--dir``."""
    makers: dict[str, Callable[[], str]] = {
        "xenmig": lambda: commandPage(args.parser),
        "twistd-xenmig": daemonPage,
    }
    if args.dir is None:
        print(makers[args.page](), end="")
        return EXIT_OK
    for page, name in PAGES.items():
        section = os.path.join(args.dir, "man" + name.rpartition(".")[2])
        os.makedirs(section, exist_ok=True)
        path = os.path.join(section, name)
        with open(path, "w") as f:
            f.write(makers[page]())
        print(path)
    return EXIT_OK


# -- roff --------------------------------------------------------------------------


def escape(text: str) -> str:
    """Text as roff shows it: backslashes, hyphens, and no line taken as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line
        for line in text.splitlines()
    )


def _bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _header(name: str, section: str, title: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "" "xenmig {version()}" "{title}"',
        ".SH NAME",
    ]


# -- xenmig(1), from the argparse parser -------------------------------------------


def commandPage(parser: argparse.ArgumentParser) -> str:
    """xenmig(1): every subcommand, nested ones too, with every option."""
    lines = _header("xenmig", "1", "User Commands")
    lines += [escape(f"xenmig - {parser.description}"), ".SH SYNOPSIS"]
    lines += [_usage(parser), ".SH OPTIONS"] + _options(parser, top=True)
    lines.append(".SH COMMANDS")
    for name, child, summary in _subcommands(parser):
        lines += [f'.SS "{escape(name)}"', _usage(child), ".PP"]
        lines += [escape(child.description or summary)] + _options(child)
    epilog = (parser.epilog or "").removeprefix("exit status: ")
    lines += [".SH EXIT STATUS", escape(epilog)]
    lines += [
        ".SH SEE ALSO",
        "\\fBtwistd\\-xenmig\\fR(8), \\fBtwistd\\fR(1); the documentation's cli.md, "
        "daemon.md and certificates.md",
    ]
    return "\n".join(lines) + "\n"


def _subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """``(its prog, the parser, its help)`` of every subcommand, depth first."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {a.dest: a.help or "" for a in action._choices_actions}
        for name, child in action.choices.items():
            yield child.prog, child, summaries.get(name, "")
            yield from _subcommands(child)


def _usage(parser: argparse.ArgumentParser) -> str:
    """The parser's usage line, its program in bold."""
    usage = " ".join(parser.format_usage().split()).removeprefix("usage: ")
    rest = usage.removeprefix(parser.prog)
    return _bold(parser.prog) + escape(rest)


def _options(parser: argparse.ArgumentParser, top: bool = False) -> list[str]:
    """
    A ``.TP`` paragraph for each argument of ``parser`` but its subcommands
    (and ``--help``, but for the ``top`` parser).
    """
    formatter = parser._get_formatter()
    lines = []
    for action in parser._actions:
        if (
            action.help == argparse.SUPPRESS
            or isinstance(action, argparse._SubParsersAction)
            or (isinstance(action, argparse._HelpAction) and not top)
        ):
            continue
        lines += [".TP", _invocation(action)]
        text = formatter._expand_help(action) if action.help else ""
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            text += f" (one of: {', '.join(map(str, action.choices))})"
        if action.required and action.option_strings:
            text += " (required)"
        lines.append(escape(text.strip()) or ".")
    return lines


def _invocation(action: argparse.Action) -> str:
    metavar = action.metavar or (
        action.dest.upper() if action.option_strings else action.dest
    )
    if not action.option_strings:
        return _italic(str(metavar))
    takes = action.nargs != 0
    value = f" {_italic(str(metavar))}" if takes else ""
    return ", ".join(_bold(option) + value for option in action.option_strings)


# -- twistd-xenmig(8), from the daemon's usage.Options -----------------------------


def daemonPage() -> str:
    """twistd-xenmig(8): every option of ``twistd xenmig``, with its default."""
    from xenmig.tap import Options

    options = Options()
    lines = _header("twistd-xenmig", "8", "System Administration")
    lines += [
        escape("twistd-xenmig - the xenmig daemon, run by twistd"),
        ".SH SYNOPSIS",
        "\\fBtwistd\\fR [\\fItwistd options\\fR] \\fBxenmig\\fR [\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        escape(Options.longdesc),
        ".PP",
        escape(
            "twistd's own options (-n to stay in the foreground, --logfile, "
            "--pidfile, ...) come before 'xenmig': see twistd --help."
        ),
        ".SH OPTIONS",
    ]
    for name, takes in daemonOptions(options):
        lines += [".TP", _daemonInvocation(options, name, takes)]
        doc = options.docs.get(name, "").strip()
        default = options.defaults.get(name)
        if takes and default not in (None, "", []):
            doc += (
                f" (default: {default:g})"
                if isinstance(default, float)
                else (f" (default: {default})")
            )
        lines.append(escape(doc) or ".")
    lines += [
        ".SH SEE ALSO",
        "\\fBxenmig\\fR(1), \\fBtwistd\\fR(1); the documentation's daemon.md and "
        "security.md",
    ]
    return "\n".join(lines) + "\n"


#: What the daemon's string options take (others are named after the option).
_DAEMON_METAVARS = {
    "interface": "ADDRESS",
    "state-dir": "DIR",
    "allow-root": "DIR",
    "ca": "FILE",
    "cert": "FILE",
    "key": "FILE",
    "peers": "FILE",
    "on-commit": "COMMAND",
    "tls-minimum": "VERSION",
}


def daemonOptions(options: Any) -> list[tuple[str, bool]]:
    """``(long name, whether it takes a value)`` of every option, as twistd has them."""
    return [(name.rstrip("="), name.endswith("=")) for name in options.longOpt]


def _daemonInvocation(options: Any, name: str, takes: bool) -> str:
    shorts = [s for s, long in options.synonyms.items() if long == name and len(s) == 1]
    parameter = next(
        (p for p in options.optParameters if p[0] == name), [name, None, None, ""]
    )
    coerce: Any = parameter[4] if len(parameter) > 4 else None
    byType = {int: "N", float: "SECONDS"}
    metavar = _DAEMON_METAVARS.get(name) or byType.get(coerce) or name.upper()
    value = f"={_italic(metavar)}" if takes else ""
    forms = [_bold(f"-{short}") for short in shorts] + [_bold(f"--{name}") + value]
    return ", ".join(forms)
