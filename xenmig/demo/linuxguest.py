"""
A real Linux guest for whole-VM migrations: Debian's kernel, a busybox initramfs.

The guest mounts an ext4 disk (virtio-blk), extends PCR 16 of its TPM (QEMU's
``tpm-tis`` on a swtpm) with a raw TPM2_PCR_Extend, then appends numbered,
checksummed records to ``/log`` on the disk, each fsynced before the serial
console says ``XM SYNC n``, while a second job rewrites a tmpfs file of
``dirtyMiB`` MiB with random bytes, then sleeps (RAM the migration must carry).
A line on the console (``stop``) ends the workload; the guest unmounts the disk
and powers off.

Needs ``linux-image-amd64`` (the kernel under ``/boot``, its modules under
``/lib/modules``), ``busybox-static``, ``e2fsprogs`` (``mkfs.ext4``,
``debugfs``, ``e2fsck``) and ``swtpm``: see L{missing}.
"""

from __future__ import annotations

import glob
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import subprocess

#: What the guest needs on the host.
PROGRAMS = ("qemu-system-x86_64", "swtpm", "mkfs.ext4", "debugfs", "e2fsck")
BUSYBOX = "/bin/busybox"
#: The modules the guest needs (virtio-blk and ext4 are modules in Debian's
#: kernel, the TPM's tpm_tis is built in); with their dependencies, from
#: modules.dep (L{moduleOrder}).
MODULES = (
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/crypto/crc32c_generic.ko",
    "kernel/fs/ext4/ext4.ko",
)
#: TPM2_PCR_Extend of PCR 16 with a SHA-256 digest of 32 bytes 0x5a (password
#: session, empty auth): the bytes the guest writes to /dev/tpm0.
PCR_EXTEND = bytes.fromhex(
    "80020000004100000182" "00000010" "00000009" "400000090000000000"
    "00000001" "000b" + "5a" * 32
)  # fmt: skip
#: A record's checksum, as the guest's shell computes it.
CHECKSUM_FACTOR, CHECKSUM_ADD, CHECKSUM_MODULUS = 2654435761, 977, 4294967291

INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size={tmpfsMiB}m tmpfs /tmp
for m in {modules}; do insmod /lib/modules/$m.ko || echo "XM FAIL insmod $m"; done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 200 ] && {{ echo "XM FAIL no /dev/vda"; poweroff -f; }}
  sleep 0.05
done
mount -t ext4 /dev/vda /mnt || {{ echo "XM FAIL mount"; poweroff -f; }}
exec 3<>/dev/tpm0
printf '{extend}' >&3
echo "XM EXTEND $(dd bs=10 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \\n')"
exec 3>&-
echo "XM PCR16 $(cat /sys/class/tpm/tpm0/pcr-sha256/16)"
( read line; touch /tmp/stop ) </dev/console &
(
  dd if=/dev/urandom of=/tmp/r0 bs=1M count={dirtyMiB} 2>/dev/null
  dd if=/dev/urandom of=/tmp/r1 bs=1M count={dirtyMiB} 2>/dev/null
  i=0
  while [ ! -e /tmp/stop ]; do
    dd if=/tmp/r$((i % 2)) of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null
    echo "XM DIRTY {dirtyMiB}"
    i=$((i+1))
    sleep {dirtyPause}
  done
) &
n=0
echo "XM START"
while [ ! -e /tmp/stop ]; do
  n=$((n+1))
  echo "$n $(( (n * {factor} + {add}) % {modulus} ))" >> /mnt/log
  sync /mnt/log
  echo "XM SYNC $n"
  [ $((n % 20)) -eq 0 ] && echo "XM PCR16 $(cat /sys/class/tpm/tpm0/pcr-sha256/16)"
done
umount /mnt && echo "XM DONE $n"
sleep 0.5  # the console's last line out of the UART before the power goes
poweroff -f
"""


def kernel() -> tuple[str, str] | None:
    """The newest Debian kernel here and its modules directory, if any."""
    for path in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        version = os.path.basename(path)[len("vmlinuz-") :]
        modules = f"/lib/modules/{version}"
        if os.access(path, os.R_OK) and os.path.isdir(modules):
            return path, modules
    return None


def missing() -> list[str]:
    """What this host lacks for the guest, as package names to install."""
    lacking = []
    if kernel() is None:
        lacking.append("linux-image-amd64")
    if not _isStatic(BUSYBOX):
        lacking.append("busybox-static")
    for program, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("swtpm", "swtpm"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
    ):
        if shutil.which(program) is None and package not in lacking:
            lacking.append(package)
    return lacking


def _isStatic(path: str) -> bool:
    try:
        out = subprocess.run(
            ["busybox", "--list"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return False
    # busybox-static has the applets the guest uses; the dynamic one does too,
    # but cannot run without a libc: check for the interpreter.
    with open(path, "rb") as f:
        head = f.read(4096)
    return "insmod" in out.split() and b"ld-linux" not in head


def moduleOrder(modules: str, wanted: tuple[str, ...] = MODULES) -> list[str]:
    """Blocking: ``wanted`` and their dependencies, each after what it needs."""
    with open(os.path.join(modules, "modules.dep")) as f:
        needs = {
            name: deps.split()
            for name, _, deps in (line.strip().partition(":") for line in f)
        }
    order: list[str] = []

    def add(module: str) -> None:
        if module in order:
            return
        for dependency in reversed(needs.get(module, [])):
            add(dependency)
        order.append(module)

    for module in wanted:
        add(module)
    return order


def initScript(order: list[str], dirtyMiB: int = 8, dirtyPause: float = 0.2) -> str:
    """The guest's /init: ``dirtyMiB`` MiB of RAM rewritten, then a pause."""
    names = " ".join(os.path.basename(m).split(".")[0] for m in order)
    return INIT.format(
        tmpfsMiB=max(16, 4 * dirtyMiB),
        modules=names,
        extend="".join(f"\\{b:03o}" for b in PCR_EXTEND),
        dirtyMiB=dirtyMiB,
        dirtyPause=f"{dirtyPause:g}",
        factor=CHECKSUM_FACTOR,
        add=CHECKSUM_ADD,
        modulus=CHECKSUM_MODULUS,
    )


def buildInitramfs(
    path: str, modules: str, dirtyMiB: int = 8, dirtyPause: float = 0.2
) -> None:
    """Blocking: write the guest's initramfs (gzipped newc cpio) to ``path``."""
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "mnt", "lib", "lib/modules"):
        archive.directory(directory)
    with open(BUSYBOX, "rb") as f:
        archive.file("bin/busybox", f.read(), 0o755)
    for applet in ("sh", "mount", "insmod", "sleep", "dd", "od", "tr", "cat", "touch",
                   "sync", "umount", "poweroff", "echo", "printf"):  # fmt: skip
        archive.symlink(f"bin/{applet}", "busybox")
    order = moduleOrder(modules)
    for module in order:
        with open(os.path.join(modules, module), "rb") as f:
            data = f.read()
        if module.endswith(".xz"):
            data = lzma.decompress(data)
        name = os.path.basename(module).split(".")[0]
        archive.file(f"lib/modules/{name}.ko", data, 0o644)
    archive.file("init", initScript(order, dirtyMiB, dirtyPause).encode(), 0o755)
    with open(path, "wb") as f:
        f.write(gzip.compress(archive.finish(), compresslevel=1))


def makeDisk(path: str, sizeMiB: int = 64) -> None:
    """Blocking: an empty ext4 filesystem in a raw image at ``path``."""
    with open(path, "wb") as f:
        f.truncate(sizeMiB * 1024 * 1024)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", path],
        check=True,
        capture_output=True,
    )


def readRecords(image: str) -> list[int]:
    """
    Blocking: the record numbers in ``/log`` of the ext4 ``image`` (read with
    ``debugfs``, no mount), in order.

    @raise ValueError: naming a line that is not a record with its checksum.
    """
    out = subprocess.run(
        ["debugfs", "-R", "cat /log", image], capture_output=True, check=True
    ).stdout.decode(errors="replace")
    numbers = []
    for line in out.splitlines():
        match = re.fullmatch(r"(\d+) (\d+)", line)
        if not match or int(match[2]) != checksum(int(match[1])):
            raise ValueError(f"{image}: /log has a damaged record: {line!r}")
        numbers.append(int(match[1]))
    return numbers


def checksum(n: int) -> int:
    """The checksum the guest writes with record ``n``."""
    return (n * CHECKSUM_FACTOR + CHECKSUM_ADD) % CHECKSUM_MODULUS


def fsck(image: str) -> tuple[int, str]:
    """Blocking: ``e2fsck -fn`` of ``image``: its exit status and words."""
    result = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


class _Cpio:
    """A newc cpio archive built in memory (the initramfs is a few MiB)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        self.inode += 1
        self.out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded)
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.out.getvalue()
