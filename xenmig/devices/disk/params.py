"""The ``disk`` kind's parameters, one record for its source and its target."""

from __future__ import annotations

from dataclasses import dataclass

from xenmig.devices.disk.blockmap import BLOCK_SIZE
from xenmig.devices.staging import checkInstallKeys
from xenmig.errors import BadSpec
from xenmig.params import DeviceParams, Where, choice, flag, key, text, whole

KIND = "disk"
FORMATS = ("raw", "qcow2")
#: The largest block a source may choose (the target hashes and keeps one at once).
MAX_BLOCK_SIZE = 64 * 1024 * 1024
#: The facts a source adds for the target (in the description only).
FACT = Where.DESCRIPTION


@dataclass(frozen=True)
class DiskParams(DeviceParams):
    """
    ``disk:NAME:path=SRC,target=DST[,format=raw|qcow2][,qmp=SOCKET[,qmp-node=N]]
    [,reflink=1][,target-overwrite=yes][,target-qmp=SOCKET,target-node=NODE]
    [,target-owner=USER:GROUP][,target-mode=0640]``, and what the source adds at
    Prepare.
    """

    KIND = KIND

    path: str = key("path", text, "", required=True, usage="path=SOURCE_IMAGE")
    target: str = key("target", text, "", required=True, usage="target=DESTINATION")
    #: Given: the format the image must have; sent: the format it has.
    format: str = key("format", choice(*FORMATS), "", where=Where.BOTH)
    qmp: str = key("qmp", text, "")
    qmpNode: str = key("qmp-node", text, "")
    reflink: bool = key("reflink", flag, False)
    targetOverwrite: bool = key("target-overwrite", flag, False)
    #: The incoming QEMU that takes the installed image at its block node.
    targetQmp: str = key("target-qmp", text, "")
    targetNode: str = key("target-node", text, "")
    targetOwner: str = key("target-owner", text, "")
    targetMode: str = key("target-mode", text, "")
    allocated: int | None = key("allocated", whole, where=FACT)
    maxSize: int | None = key("max_size", whole, where=FACT)
    blockSize: int = key("block_size", whole, BLOCK_SIZE, where=FACT)
    backing: str = key("backing", text, "", where=FACT)

    def check(self, what: str, where: Where) -> None:
        checkInstallKeys(what, self.targetOwner, self.targetMode)
        if bool(self.targetQmp) != bool(self.targetNode):
            raise BadSpec(
                f"{what}: target-qmp= and target-node= go together (the incoming "
                f"QEMU's QMP socket, and the block node that takes the image)"
            )
        if self.qmp and self.reflink:
            raise BadSpec(
                f"{what}: give qmp= or reflink= (one source of changed blocks), "
                f"not both"
            )
        if where is Where.DESCRIPTION:
            if not 0 < self.blockSize <= MAX_BLOCK_SIZE or self.blockSize % 4096:
                raise BadSpec(
                    f"{what}: block_size must be a multiple of 4096 bytes, at most "
                    f"{MAX_BLOCK_SIZE}"
                )
