"""The ``vtpm`` kind's parameters, one record for its source and its target."""

from __future__ import annotations

from dataclasses import dataclass

from xenmig.errors import BadSpec
from xenmig.params import DeviceParams, Where, choice, flag, key, seconds, text, whole

#: The bound on one control-channel exchange, unless ``timeout=`` says otherwise.
CONTROL_TIMEOUT = 5.0
#: swtpm's --key modes and formats (a value is put into its option string).
KEY_MODES = ("aes-128-cbc", "aes-256-cbc")
KEY_FORMATS = ("binary", "hex")
#: The facts a source adds for the target (in the description only).
FACT = Where.DESCRIPTION


@dataclass(frozen=True)
class VTPMParams(DeviceParams):
    """
    ``vtpm:NAME:ctrl=PATH[,key=FILE][,qemu=1][,timeout=S]`` and either
    ``target-ctrl=PATH`` (a fresh swtpm the target's toolstack started) or
    ``target-statedir=DIR[,target-key=FILE][,target-migration-key=FILE]``, and
    what the source adds at Prepare.
    """

    KIND = "vtpm"

    ctrl: str = key(
        "ctrl", text, "", required=True, usage="ctrl=PATH, the swtpm's control socket"
    )
    #: The source swtpm's state key: it must run with --key.
    sourceKey: str = key("key", text, "")
    #: The vTPM is QEMU's (QEMU's own stream carries it): refuse it here.
    qemu: bool = key("qemu", flag, False)
    timeout: float = key("timeout", seconds(3600), CONTROL_TIMEOUT)
    targetCtrl: str = key("target-ctrl", text, "")
    targetStatedir: str = key("target-statedir", text, "")
    targetKey: str = key("target-key", text, "")
    targetMigrationKey: str = key("target-migration-key", text, "")
    targetKeyMode: str = key("target-key-mode", choice(*KEY_MODES), "aes-256-cbc")
    targetKeyFormat: str = key("target-key-format", choice(*KEY_FORMATS), "binary")
    targetAllowUnencrypted: bool = key("target-allow-unencrypted", flag, False)
    targetOverwrite: bool = key("target-overwrite", flag, False)
    targetTimeout: float = key("target-timeout", seconds(3600), CONTROL_TIMEOUT)
    format: int = key("format", whole, 1, where=FACT)
    #: The source swtpm keeps its state encrypted (--key).
    fileKey: bool = key("file_key", flag, False, where=FACT)
    #: The source swtpm encrypts its state blobs for migration (--migration-key).
    migrationKey: bool = key("migration_key", flag, False, where=FACT)

    def check(self, what: str, where: Where) -> None:
        if bool(self.targetCtrl) == bool(self.targetStatedir):
            raise BadSpec(
                f"{what}: give exactly one of target-ctrl=PATH (a fresh swtpm the "
                f"target toolstack started) or target-statedir=DIR"
            )
        if self.targetCtrl and (self.targetKey or self.targetMigrationKey):
            raise BadSpec(
                f"{what}: target-key and target-migration-key apply to "
                f"target-statedir; with target-ctrl, start that swtpm with --key "
                f"and --migration-key yourself"
            )
