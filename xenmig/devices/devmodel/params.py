"""The ``devmodel`` kind's parameters, one record for its source and its target."""

from __future__ import annotations

from dataclasses import dataclass

from xenmig.errors import BadSpec
from xenmig.params import (
    DeviceParams,
    Where,
    flag,
    key,
    seconds,
    string,
    text,
    whole,
)

KIND = "devmodel"
#: The bound on saving or loading the whole state, unless a time-out says otherwise.
STATE_TIMEOUT = 300.0
#: The most state a target takes from one QEMU (its RAM included): 16 TiB.
MAX_STATE = 1 << 44
#: What a source does with its QEMU after the commit.
RELEASES = ("quit", "keep")
#: The facts a source adds for the target (in the description only).
FACT = Where.DESCRIPTION


@dataclass(frozen=True)
class DevmodelParams(DeviceParams):
    """
    ``devmodel:NAME:qmp=PATH[,xen=1][,live=0][,downtime=MS][,timeout=S]
    [,release=quit|keep]
    [,statedir=DIR]`` and either ``target-qmp=PATH[,target-log=PATH]`` (a QEMU
    waiting with ``-incoming defer``) or ``target-statefile=PATH``, and what the
    source adds at Prepare.
    """

    KIND = KIND

    qmp: str = key("qmp", text, "", required=True, usage="qmp=PATH, QEMU's QMP socket")
    #: Device state only (``xen-save-devices-state``), for a Xen device model.
    xen: bool = key("xen", flag, False)
    #: RAM moves while the VM runs (QEMU's pre-copy); ``live=0``: all when paused.
    live: bool = key("live", flag, True)
    #: QEMU's ``downtime-limit`` for the migration (ms); 0 leaves QEMU's own.
    downtime: int = key("downtime", whole, 0)
    timeout: float = key("timeout", seconds(86400), STATE_TIMEOUT)
    #: ``quit`` (the default) or ``keep`` (the default with ``xen=1``).
    release: str = key("release", text, "")
    statedir: str = key("statedir", text, "")
    targetQmp: str = key("target-qmp", text, "")
    targetStatefile: str = key("target-statefile", text, "")
    targetLog: str = key("target-log", text, "")
    targetOverwrite: bool = key("target-overwrite", flag, False)
    targetTimeout: float = key("target-timeout", seconds(86400), STATE_TIMEOUT)
    format: int = key("format", whole, 1, where=FACT)
    mode: str = key("mode", string, "", where=FACT)
    qemuVersion: str = key("qemu_version", string, "", where=FACT)
    machine: str = key("machine", string, "", where=FACT)
    memory: int = key("memory", whole, 0, where=FACT)
    maxSize: int = key("max_size", whole, 0, required=True, where=FACT)

    @property
    def releaseMode(self) -> str:
        """What the source does with its QEMU after the commit."""
        return self.release or ("keep" if self.xen else "quit")

    def check(self, what: str, where: Where) -> None:
        if bool(self.targetQmp) == bool(self.targetStatefile):
            raise BadSpec(
                f"{what}: give exactly one of target-qmp=PATH (a QEMU waiting with "
                f"-incoming defer) or target-statefile=PATH"
            )
        if self.releaseMode not in RELEASES:
            raise BadSpec(f"{what}: release= is 'quit' or 'keep'")
        if where is Where.DESCRIPTION and not 0 < self.maxSize <= MAX_STATE:
            raise BadSpec(f"{what}: max_size={self.maxSize!r} is unusable")
