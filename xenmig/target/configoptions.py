"""The daemon's options read from its configuration file, then its command line."""

from __future__ import annotations

import getopt
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from xenmig.errors import ConfigurationError
from xenmig.target.configfile import DAEMON_CONFIG, DaemonFile, readDaemonFile


class ConfigFileOptions:
    """
    What ``twistd xenmig``'s options (a C{usage.Options}) add for the
    configuration file: ``--config FILE`` (else L{DAEMON_CONFIG}, when it
    exists) is read before the command line, whose options override it, and
    every option remembers where its value came from (L{sources}).
    """

    optParameters: list[list[Any]]
    optFlags: list[list[Any]]
    shortOpt: str
    longOpt: list[str]
    synonyms: dict[str, str]
    #: The configuration file read, if any.
    file: DaemonFile | None
    #: Where each option's value comes from: "command line", a file, "default".
    sources: dict[str, str]

    if TYPE_CHECKING:  # what usage.Options, a dict, has

        def __getitem__(self, key: str) -> Any: ...

        def __setitem__(self, key: str, value: Any) -> None: ...

    def settingKinds(self) -> dict[str, type]:
        """Every option a configuration file may set, and its type."""
        kinds: dict[str, type] = {}
        for parameter in self.optParameters:
            coerce = parameter[4] if len(parameter) > 4 else None
            kinds[parameter[0]] = coerce if coerce in (int, float) else str
        kinds.update({flag[0]: bool for flag in self.optFlags})
        kinds["allow-root"] = list
        del kinds["config"]
        return kinds

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Read the configuration file (``--config``, else L{DAEMON_CONFIG} if it
        exists) first, then the command line, which overrides it.  A bad file
        stops here with one line naming it and the key.
        """
        argv = list(sys.argv[1:] if options is None else options)
        given = self._given(argv)
        path = given.get("config", DAEMON_CONFIG)
        if path == DAEMON_CONFIG and not os.path.exists(path):
            path = ""
        if path:
            try:
                self.file = readDaemonFile(path, self.settingKinds())
            except ConfigurationError as e:
                raise SystemExit(f"xenmig: {e}")
            self._apply(self.file, given)
        for name in self.settingKinds():
            where = "command line" if name in given else "default"
            self.sources.setdefault(name, where)
        super().parseOptions(argv)  # type: ignore[misc]

    def _given(self, argv: list[str]) -> dict[str, str]:
        """The options on the command line ``argv``: long name -> last value."""
        try:
            pairs, _ = getopt.getopt(argv, self.shortOpt, self.longOpt)
        except getopt.error:
            return {}  # the real parse says what is wrong
        return {self.synonyms[option.lstrip("-")]: value for option, value in pairs}

    def _apply(self, file: DaemonFile, given: dict[str, str]) -> None:
        for key, value in file.values.items():
            if key not in given:
                self[key] = list(value) if key == "allow-root" else value
                self.sources[key] = file.path
        if file.hasPeers and "peers" not in given:
            self["peers"] = file.path
            self.sources["peers"] = file.path

    @property
    def peersInConfig(self) -> bool:
        """Whether the peers in force are the ``[[peer]]`` tables of the file."""
        return self.file is not None and self["peers"] == self.file.path

    def named(self, name: str) -> str:
        """How a message names an option: ``--name``, or ``FILE: name``."""
        source = self.sources.get(name, "default")
        if source not in ("command line", "default"):
            return f"{source}: {name}"
        return f"--{name}"
