"""What the command line says about itself: --version, its man pages, completion."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

import xenmig
from xenmig import tap
from xenmig.cli import main as cli
from xenmig.cli import manpage
from xenmig.cli.completion import script
from xenmig.clients.processes import TWISTD
from xenmig.testing import requirePrograms


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def xenmigCommand(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "xenmig.cli.main", *args)


def parsers(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``(prog, parser)`` of the command line and each subcommand, nested ones too."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from parsers(child)


def subcommandNames() -> list[str]:
    top = cli.parser()
    commands = next(a for a in top._actions if a.dest == "command")
    return list(commands.choices)  # type: ignore[arg-type]


def unroff(page: str) -> str:
    """The text of a roff page with its escapes and fonts undone (for searching)."""
    text = page.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")
    return re.sub(r"\\f[BIR]", "", text)


# -- --version -------------------------------------------------------------------------


def test_version_comes_from_the_distribution() -> None:
    """xenmig.version() is the installed distribution's version."""
    assert xenmig.version() == metadata.version("xenmig")


def test_version_of_a_checkout_comes_from_setup_cfg() -> None:
    """Without an installed distribution, the checkout's setup.cfg gives it."""
    setup = Path(__file__).parent.parent / "setup.cfg"
    declared = re.search(r"^version = (\S+)$", setup.read_text(), re.M)
    assert declared is not None
    assert xenmig._checkoutVersion() == f"{declared.group(1)}+checkout"


def test_xenmig_version() -> None:
    """``xenmig --version`` prints the version and exits 0."""
    result = xenmigCommand("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"xenmig {metadata.version('xenmig')}\n"


def test_twistd_xenmig_version() -> None:
    """``twistd xenmig --version`` prints xenmig's version (not Twisted's)."""
    result = run(*TWISTD, "xenmig", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"twistd xenmig (xenmig) {metadata.version('xenmig')}\n"


# -- man pages -------------------------------------------------------------------------


def test_command_page_has_every_subcommand_and_option() -> None:
    """xenmig.1 has a section per subcommand naming each of its options."""
    page = manpage.commandPage(cli.parser())
    text = unroff(page)
    assert page.startswith(f'.TH XENMIG 1 "" "xenmig {xenmig.version()}"')
    for name in subcommandNames():
        assert f'.SS "xenmig {name}"' in text, name
    sections = re.split(r"^\.SS ", text, flags=re.M)
    for prog, parser in parsers(cli.parser()):
        if prog == "xenmig":
            section = sections[0]
        else:
            section = next(s for s in sections if s.startswith(f'"{prog}"'))
        for action in parser._actions:
            for option in action.option_strings:
                if option in ("-h", "--help") and prog != "xenmig":
                    continue  # every subcommand has it: said once, at the top
                assert option in section, (prog, option)
            if not action.option_strings and action.metavar and action.help:
                assert action.help in section, (prog, action.dest)


def test_daemon_page_has_every_option() -> None:
    """twistd-xenmig.8 names every option of ``twistd xenmig`` with its default."""
    text = unroff(manpage.daemonPage())
    assert text.startswith(".TH TWISTD-XENMIG 8")
    options = tap.Options()
    for name, takes in manpage.daemonOptions(options):
        form = rf"--{name}=" if takes else rf"--{name}$"
        assert re.search(form, text, re.M), name
    for name, short, default, *_ in tap.Options.optParameters:
        if short:
            assert f"-{short}, --{name}=" in text, name
        if default not in (None, ""):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"(default: {shown})" in text, name
    for flag in ("--insecure-plaintext", "--allow-root=DIR", "--version"):
        assert flag in text


@pytest.mark.parametrize("page", sorted(manpage.PAGES))
def test_pages_render_without_warnings(page: str) -> None:
    """groff formats each page as a man page without a warning."""
    requirePrograms("groff")
    result = xenmigCommand("manpage", page)
    assert result.returncode == 0, result.stderr
    rendered = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z"],
        input=result.stdout,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0
    assert rendered.stderr == ""


def test_manpage_dir_writes_both_pages(tmp_path: Path) -> None:
    """``manpage --dir DIR`` writes DIR/man1/xenmig.1 and DIR/man8/twistd-xenmig.8."""
    result = xenmigCommand("manpage", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = [tmp_path / "man1" / "xenmig.1", tmp_path / "man8" / "twistd-xenmig.8"]
    assert result.stdout.splitlines() == [str(path) for path in written]
    assert written[0].read_text() == manpage.commandPage(cli.parser())
    assert written[1].read_text() == manpage.daemonPage()


def test_roff_escapes() -> None:
    """Hyphens, backslashes and a leading dot cannot be read as roff."""
    assert manpage.escape("--dir a\\b\n.x") == "\\-\\-dir a\\eb\n\\&.x"


# -- shell completion ------------------------------------------------------------------


def test_bash_completion_names_every_subcommand() -> None:
    """``xenmig completion bash`` prints a script bash accepts naming each command."""
    result = xenmigCommand("completion", "bash")
    assert result.returncode == 0, result.stderr
    for name in subcommandNames():
        assert re.search(rf"\b{name}\b", result.stdout), name
    for option in ("--target", "--server-name", "--insecure-plaintext", "init-ca"):
        assert option in result.stdout
    checked = subprocess.run(
        ["bash", "-n"], input=result.stdout, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_bash_completion_completes_subcommands(tmp_path: Path) -> None:
    """Sourced into bash, the script offers the subcommands after ``xenmig``."""
    completion = tmp_path / "xenmig.bash"
    completion.write_text(script(cli.parser(), "bash"))
    probe = (
        f"source {completion}; COMP_WORDS=(xenmig mi); COMP_CWORD=1; "
        f"COMP_LINE='xenmig mi'; COMP_POINT=${{#COMP_LINE}}; "
        f"_shtab_xenmig; echo ${{COMPREPLY[@]}}"
    )
    result = run("bash", "-c", probe)
    assert result.stdout.split() == ["migrate"], result.stderr


@pytest.mark.parametrize("shell", ["zsh", "tcsh"])
def test_other_shells(shell: str) -> None:
    """zsh and tcsh scripts are made too, naming the subcommands."""
    text = script(cli.parser(), shell)
    assert all(name in text for name in subcommandNames())


def test_file_options_complete_as_paths() -> None:
    """--ca, --cert, --key complete as files, --state-dir and --dir as directories."""
    text = script(cli.parser(), "zsh")
    for option in ("--ca", "--cert", "--key"):
        assert re.search(rf'"{option}\[[^"]*\]:FILE:_files"', text), option
    for option in ("--state-dir", "--dir"):
        assert re.search(rf'"{option}\[[^"]*\]:DIR:_files -/"', text), option
