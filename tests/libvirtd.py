"""
A private libvirtd for tests: a session daemon (``qemu:///session``) with its own
directories, no systemd, no D-Bus, and tiny TCG domains that boot nothing.

As root, libvirtd would run as the host's system daemon (``/run/libvirt``,
``/etc/libvirt``).  Run as an unprivileged user (``nobody`` when the tests run as
root) it is a session daemon whose every file lives under its ``XDG_*``
directories, here a temporary directory; root's ``virsh`` reaches it through
``qemu+unix:///session?socket=...``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

LIBVIRTD = "/usr/sbin/libvirtd"
#: The user a root test runs the daemon as (a session daemon must not be root).
UNPRIVILEGED = 65534

#: A domain that boots nothing: SeaBIOS finds no disk and waits, under TCG.
DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
"""


#: A raw image as the domain's virtio disk ``vda``.
DISK_XML = """  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{path}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
"""


class LibvirtdUnavailable(Exception):
    """libvirtd is not installed, or did not start: the reason and its log."""


class Libvirtd:
    """
    One private libvirtd, started by L{start} and ended by L{stop}.  Each has a
    host UUID of its own, so that two of them are two hosts to ``virsh migrate``;
    one made with ``seed`` starts from that one's cache of QEMU's capabilities
    (probing QEMU takes most of a start).
    """

    def __init__(self, seed: Libvirtd | None = None) -> None:
        # Short: QEMU's monitor sockets live below it (108 bytes at most).
        self.root = Path(tempfile.mkdtemp(prefix="xm-lv-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.user = UNPRIVILEGED if os.geteuid() == 0 else None
        self.seed = seed

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///session?socket={self.socket}"

    @property
    def logPath(self) -> Path:
        return self.root / "libvirtd.log"

    def _environment(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.root / "home"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "LC_ALL": "C",
        }

    def _layout(self) -> None:
        for name in ("home", "run", "config/libvirt"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        # QEMU's output to a file: no virtlogd to start (and to end) beside it.
        (self.root / "config" / "libvirt" / "qemu.conf").write_text(
            'stdio_handler = "file"\n'
        )
        (self.root / "config" / "libvirt" / "libvirtd.conf").write_text(
            f'host_uuid = "{uuid.uuid4()}"\n'
        )
        if self.seed is not None:
            shutil.copytree(self.seed.root / "cache", self.root / "cache", True)
        (self.root / "cache").mkdir(exist_ok=True)
        if self.user is not None:
            self.root.chmod(0o755)
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, self.user, self.user)

    def start(self, timeout: float = 30.0) -> Libvirtd:
        """Start the daemon; return once ``virsh`` gets an answer from it."""
        if not os.path.exists(LIBVIRTD) or shutil.which("virsh") is None:
            raise LibvirtdUnavailable(
                "needs libvirtd and virsh (libvirt-daemon, libvirt-daemon-driver-qemu, "
                "libvirt-clients: see scripts/bootstrap)"
            )
        self._layout()
        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(
                [LIBVIRTD, "--pid-file", str(self.root / "libvirtd.pid")],
                env=self._environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self.user,
                group=self.user,
                extra_groups=[] if self.user is not None else None,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LibvirtdUnavailable(
                    f"libvirtd exited with {self.process.returncode}: {self.log()}"
                )
            if self.socket.exists() and self.virsh("version").returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise LibvirtdUnavailable(
            f"libvirtd did not answer in {timeout:g} s: {self.log()}"
        )

    def own(self, path: Path) -> None:
        """Give ``path`` to the daemon's user: its QEMUs open it as that user."""
        if self.user is not None:
            os.chown(path, self.user, self.user)

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")[-2000:]

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``virsh --connect URI args...`` (blocking: for tests only)."""
        return subprocess.run(
            ["virsh", "--connect", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, LC_ALL="C"),
        )

    def check(self, *args: str) -> str:
        """``virsh`` that must succeed; its standard output, stripped."""
        result = self.virsh(*args)
        if result.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def state(self, domain: str) -> str:
        """``virsh domstate --reason``: ``paused (user)``, ``shut off (destroyed)``."""
        return self.check("domstate", "--reason", "--domain", domain)

    def defineDomain(self, name: str, start: bool = True, disk: str = "") -> str:
        """Define (and start) a tiny TCG domain, with a raw ``disk``; its name."""
        xml = self.root / f"{name}.xml"
        text = DOMAIN_XML.format(name=name)
        if disk:
            text = text.replace("</domain>", DISK_XML.format(path=disk) + "</domain>")
        xml.write_text(text)
        self.check("define", "--file", str(xml))
        if start:
            self.check("start", "--domain", name)
        return name

    def stop(self) -> None:
        """Destroy every domain, end the daemon, remove its directory."""
        if self.process is not None and self.process.poll() is None:
            listed = self.virsh("list", "--name")
            for name in listed.stdout.split():
                self.virsh("destroy", "--domain", name)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._killLeftQEMUs()
        shutil.rmtree(self.root, ignore_errors=True)

    def _killLeftQEMUs(self) -> None:
        """A QEMU that outlived its daemon (a daemon that died): end it by its pid."""
        for pidfile in (self.root / "run" / "libvirt" / "qemu" / "run").glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
