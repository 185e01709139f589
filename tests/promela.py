"""
Helpers of tests/test_model.py: read the resume gate's Promela model
(model/gate.pml) as the code's tables read, and drive spin over it.

Reading the model needs nothing but Python: its phases are the mtype names
``T_*`` (the target session) and ``S_*`` (the source), its edges every
``tmove(m, T_FROM, T_TO)`` and ``smove(m, S_FROM, S_TO)``, ignoring comments and
the code that only a broken variant or a proposed fix compiles (``#ifdef
BUG_...``, ``#ifdef FIX_...``).

Driving spin: L{Verifier} generates the verifier (``spin -a``) and compiles
``pan`` into a directory of its own, once per set of ``-D`` flags, and runs the
searches; L{Search} is what one run of ``pan`` reported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "model" / "gate.pml"

#: The prefix of each machine's phase names in the model.
PREFIX = {"target": "T_", "source": "S_"}


# -- reading the model -----------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """A phase machine: its phases, its edges, where it starts (and ends)."""

    phases: frozenset[str]
    edges: frozenset[tuple[str, str]]
    start: str
    final: frozenset[str] | None = None


def withoutComments(text: str) -> str:
    """``text`` without its C comments, each line where it was."""

    def blank(match: re.Match[str]) -> str:
        return "\n" * match.group(0).count("\n")

    text = re.sub(r"/\*.*?\*/", blank, text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def defaultLines(text: str) -> list[tuple[int, str]]:
    """
    The numbered lines (from 1) spin compiles by default: without the blocks
    only a variant compiles (``#ifdef BUG_X``/``FIX_X``, the ``#else`` of
    ``#ifndef BUG_X``/``FIX_X``).  Any other conditional keeps both branches.
    """
    kept: list[tuple[int, str]] = []
    # each open conditional: (whether a variant's, whether its current branch is kept)
    stack: list[tuple[bool, bool]] = []
    for number, line in enumerate(withoutComments(text).splitlines(), 1):
        directive = line.strip()
        variant = re.match(r"#\s*if(n?)def\s+(BUG|FIX)_\w+", directive)
        if variant:
            stack.append((True, variant.group(1) == "n"))
        elif re.match(r"#\s*if", directive):
            stack.append((False, True))
        elif re.match(r"#\s*else", directive) and stack:
            isVariant, keptNow = stack.pop()
            stack.append((isVariant, not keptNow if isVariant else True))
        elif re.match(r"#\s*endif", directive) and stack:
            stack.pop()
        elif all(keep for _, keep in stack):
            kept.append((number, line))
    return kept


def readMachine(text: str, side: str) -> Machine:
    """The target's or the source's machine as the model has it."""
    prefix = PREFIX[side]
    move = "tmove" if side == "target" else "smove"
    lines = defaultLines(text)
    code = "\n".join(line for _, line in lines)
    phases: set[str] = set()
    for names in re.findall(r"\bmtype\s*=\s*\{([^}]*)\}", code):
        phases |= {
            n.strip()[len(prefix) :]
            for n in names.split(",")
            if n.strip().startswith(prefix)
        }
    pattern = rf"\b{move}\(\s*\w+\s*,\s*{prefix}(\w+)\s*,\s*{prefix}(\w+)\s*\)"
    edges = frozenset(re.findall(pattern, code))
    start = re.search(rf"#define {prefix}START {prefix}(\w+)", code)
    final = re.search(rf"#define {prefix}FINAL\(p\)(.*)", code)
    return Machine(
        phases=frozenset(phases),
        edges=edges,
        start=start.group(1) if start else "",
        final=(
            frozenset(re.findall(rf"\b{prefix}(\w+)", final.group(1)))
            if final
            else None
        ),
    )


def moveLines(text: str) -> dict[int, str]:
    """The lines (by number) of every phase change spin compiles by default."""
    return {
        number: line.strip()
        for number, line in defaultLines(text)
        if re.search(r"\b[ts]move\(\s*\w+\s*,\s*[TS]_", line)
    }


def codeMachine(table: dict, final: frozenset | None = None) -> Machine:
    """
    A transition table of the code (``{Phase: frozenset[Phase]}``) as a Machine;
    it starts in the phase no edge enters.
    """
    entered = {target for targets in table.values() for target in targets}
    starts = sorted(phase.name for phase in table if phase not in entered)
    return Machine(
        phases=frozenset(phase.name for phase in table),
        edges=frozenset((a.name, b.name) for a, bs in table.items() for b in bs),
        start=", ".join(starts),  # one, unless the table changed shape
        final=frozenset(p.name for p in final) if final is not None else None,
    )


def differences(code: Machine, model: Machine) -> list[str]:
    """What the code has and the model lacks, and the other way round."""
    found = []

    def listed(items: set) -> str:
        return ", ".join(
            " -> ".join(item) if isinstance(item, tuple) else item
            for item in sorted(items)
        )

    for what, ours, theirs in [
        ("phases", code.phases, model.phases),
        ("edges", code.edges, model.edges),
    ]:
        if ours - theirs:
            found.append(f"{what} only in the code: {listed(set(ours - theirs))}")
        if theirs - ours:
            found.append(f"{what} only in the model: {listed(set(theirs - ours))}")
    if code.start != model.start:
        found.append(f"start: the code {code.start}, the model {model.start}")
    if code.final is not None and code.final != model.final:
        found.append(
            f"final phases: the code {listed(set(code.final))}, "
            f"the model {listed(set(model.final or ()))}"
        )
    return found


# -- running spin ----------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    """What one run of pan reported."""

    command: str
    output: str
    seconds: float

    def number(self, pattern: str) -> float | None:
        found = re.search(pattern, self.output)
        return float(found.group(1)) if found else None

    @property
    def errors(self) -> int:
        found = self.number(r"errors: (\d+)")
        assert found is not None, self.output
        return int(found)

    @property
    def stored(self) -> int:
        return int(self.number(r"(\d+) states, stored") or 0)

    @property
    def visited(self) -> int:
        """States visited: more than stored when fairness copies them."""
        return int(self.number(r"states, stored \(([\d.e+]+) visited\)") or self.stored)

    @property
    def depth(self) -> int:
        return int(self.number(r"depth reached (\d+)") or 0)

    @property
    def exhaustive(self) -> bool:
        """A full search, not cut short by its depth bound or its memory."""
        return "Full statespace search" in self.output and not any(
            sign in self.output
            for sign in (
                "max search depth too small",
                "reached -DMEMLIM bound",
                "out of memory",
            )
        )

    def unreached(self) -> dict[int, str]:
        """The model's lines pan reports never reached, in any of its processes."""
        lines: dict[int, str] = {}
        section = ""
        for line in self.output.splitlines():
            if line.startswith("unreached in "):
                section = line
            elif section.startswith("unreached in proctype") or (
                section.startswith("unreached in init")
            ):
                found = re.match(r"\s+gate\.pml:(\d+), state \d+, \"(.*)\"", line)
                if found:
                    lines[int(found.group(1))] = found.group(2)
        return lines

    def figures(self) -> str:
        visited = f" ({self.visited} visited)" if self.visited != self.stored else ""
        return (
            f"{self.stored} states stored{visited}, depth {self.depth}, "
            f"{self.seconds:.1f} s"
        )


class Verifier:
    """
    Builds and runs pan for model/gate.pml in ``directory``: one subdirectory
    per build, reused by every search of the same build.
    """

    #: The deepest search pan may make; every model run must stay well within.
    DEPTH = 20000

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._builds: dict[tuple[tuple[str, ...], tuple[str, ...]], Path] = {}
        self._searches: dict[tuple[Path, tuple[str, ...]], Search] = {}

    def build(self, defines: tuple[str, ...], cflags: tuple[str, ...]) -> Path:
        """A directory with the model, its verifier and ``pan``, compiled once."""
        key = (defines, cflags)
        if key not in self._builds:
            where = self.directory / f"build{len(self._builds)}"
            where.mkdir()
            shutil.copy(MODEL, where / MODEL.name)
            generated = subprocess.run(
                ["spin", *defines, "-a", MODEL.name],
                cwd=where,
                capture_output=True,
                text=True,
            )
            output = generated.stdout + generated.stderr
            assert generated.returncode == 0 and "Error" not in output, output
            compiled = subprocess.run(
                ["gcc", "-w", *cflags, "-o", "pan", "pan.c"],
                cwd=where,
                capture_output=True,
                text=True,
            )
            assert compiled.returncode == 0, compiled.stderr
            self._builds[key] = where
        return self._builds[key]

    def search(
        self, defines: tuple[str, ...], cflags: tuple[str, ...], args: tuple[str, ...]
    ) -> Search:
        """Run pan (once for these arguments) with the depth bound; its report."""
        where = self.build(defines, cflags)
        key = (where, args)
        if key not in self._searches:
            command = ["./pan", f"-m{self.DEPTH}", *args]
            started = time.monotonic()
            ran = subprocess.run(command, cwd=where, capture_output=True, text=True)
            seconds = time.monotonic() - started
            self._searches[key] = Search(
                " ".join(["spin", *defines, "-a; gcc", *cflags, ";", *command]),
                ran.stdout + ran.stderr,
                seconds,
            )
        return self._searches[key]

    def story(self, defines: tuple[str, ...], cflags: tuple[str, ...]) -> list[str]:
        """
        The counterexample pan last found in this build, replayed by spin and
        cut down to the changes of phases, journal, installs, claims, crashes
        and of the VM on either host.
        """
        where = self.build(defines, cflags)
        replay = subprocess.run(
            ["spin", *defines, "-t", "-p", MODEL.name],
            cwd=where,
            capture_output=True,
            text=True,
        )
        told = []
        interesting = (
            r"(tph|jph|tres|sph|srcVM|tgtRun|inst|jcl|dec|claims"
            r"|crashes|losses|dups|jfails|ifails)\b"
        )
        for line in replay.stdout.splitlines():
            found = re.match(
                r"\s*\d+:\s+proc\s+\d+ \((\w+):\d+\) \S+ \(state \d+\)\s+\[(.*)\]$",
                line,
            )
            if found and re.match(interesting + r"[^=]*= ", found.group(2)):
                told.append(f"{found.group(1)}: {found.group(2)}")
            elif "START OF CYCLE" in line:
                told.append("-- and from here for ever --")
        return told
