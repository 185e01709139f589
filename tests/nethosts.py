"""
Test hosts in network namespaces: a router with one veth link per host.

A L{Network} makes, for one test, a ``router`` namespace and one namespace per
L{Host}, each joined to the router by a veth pair (``eth0`` in the host, ``to-NAME``
in the router) with an IPv4 and an IPv6 address on each end, the host's default
routes through the router, and forwarding on in the router: every host reaches
every other through the router, by IPv4 and by IPv6::

    source.address(6)        fd77:0:1::2      (eth0 in xmt-PID-N-source)
    router                   10.77.1.1, fd77:0:1::1 ... one per link
    target.address(4)        10.77.2.2        (eth0 in xmt-PID-N-target)

Programs run on a host with ``ip netns exec`` (L{Host.argv}, L{Host.run},
L{Host.popen}); a host's link goes down and up again with L{Host.linkDown} and
L{Host.linkUp}.  A L{NetDaemon} is a real ``twistd xenmig`` on a host's address.
A fault proxy (L{faultproxy.FaultProxy}) runs in the router, between hosts.

Namespace names are unique per test run (``xmt-PID-N-HOST``); L{Network.close}
stops every process started through it (by pid), then deletes the namespaces,
which deletes their veths.  The L{network} fixture does this whatever the test's
outcome.  Tests that use it need root and iproute2: without them they skip with
the reason, and fail under ``CI=true``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemons import Daemon

from xenmig.cli import pki

_counter = itertools.count(1)

#: The prefixes of the links' subnets: link N is 10.77.N.0/24 and fd77:0:N::/64.
IPV4_PREFIX = "10.77"
IPV6_PREFIX = "fd77:0"


def requireNamespaces() -> None:
    """
    In a test: skip unless network namespaces can be made here (root, iproute2);
    under ``CI=true`` fail instead, since CI runs as root with iproute2.
    """
    problem = _namespaceProblem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must be able to make network namespaces: {problem}")
    pytest.skip(f"needs network namespaces: {problem}")


def _namespaceProblem() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing (see scripts/bootstrap)"
    if os.geteuid() != 0:
        return "not root"
    probe = f"xmt-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raise with its error output if it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def hostPort(address: str, port: int) -> str:
    """``HOST:PORT``, the host bracketed when it is an IPv6 address."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class Host:
    """
    One test host: its namespace, its link to the router and its addresses.

    @ivar name: the host's short name (``source``).
    @ivar netns: its namespace's name.
    @ivar link: the link's number N (its subnets are 10.77.N.0/24, fd77:0:N::/64).
    @ivar routerLink: the router's end of the veth pair (in the router namespace).
    """

    def __init__(self, network: Network, name: str, link: int) -> None:
        self.network = network
        self.name = name
        self.link = link
        self.netns = f"{network.prefix}-{name}"
        self.routerLink = f"to-{name}"[:15]

    @property
    def ipv4(self) -> str:
        return f"{IPV4_PREFIX}.{self.link}.2"

    @property
    def ipv6(self) -> str:
        return f"{IPV6_PREFIX}:{self.link}::2"

    @property
    def routerIPv4(self) -> str:
        """The router's address on this host's link."""
        return f"{IPV4_PREFIX}.{self.link}.1"

    @property
    def routerIPv6(self) -> str:
        return f"{IPV6_PREFIX}:{self.link}::1"

    def address(self, family: int = 4) -> str:
        """This host's IPv4 (``family=4``) or IPv6 (``6``) address."""
        return self.ipv6 if family == 6 else self.ipv4

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host and wait; its output as text."""
        kw.setdefault("capture_output", True)
        return subprocess.run(self.argv(argv), text=True, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on this host; the network stops it at close."""
        process = subprocess.Popen(self.argv(argv), **kw)
        self.network.processes.append(process)
        return process

    def xenmig(
        self, *args: str, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``xenmig`` command line on this host; its output as text."""
        return self.run([sys.executable, "-m", "xenmig.cli.main", *args], timeout, **kw)

    def connects(self, address: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from this host to ``address:port`` opens."""
        probe = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({address!r}, {port}), {timeout}).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        return self.run([sys.executable, "-c", probe], timeout + 10).returncode == 0

    def setHosts(self, names: dict[str, Sequence[str]]) -> None:
        """
        Names this host resolves (its own ``/etc/hosts``: ``ip netns exec``
        mounts ``/etc/netns/NS/hosts`` over it): name -> addresses.
        """
        directory = Path("/etc/netns") / self.netns
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{a} {name}" for name, addresses in names.items() for a in addresses]
        (directory / "hosts").write_text("\n".join(lines) + "\n")

    def linkDown(self) -> None:
        """Take this host's link down (its ``eth0``): packets stop, no reset."""
        ip("-n", self.netns, "link", "set", "eth0", "down")

    def linkUp(self) -> None:
        """Bring the link back, with its addresses and default routes."""
        ip("-n", self.netns, "link", "set", "eth0", "up")
        self._routes()

    def _create(self) -> None:
        router = self.network.router
        ip("netns", "add", self.netns)
        # keep the IPv6 addresses while the link is down (as IPv4 does)
        for scope in ("all", "default"):
            _sysctl(self.netns, f"net.ipv6.conf.{scope}.keep_addr_on_down=1")
        ip(
            "-n", router, "link", "add", self.routerLink, "type", "veth",
            "peer", "name", "eth0", "netns", self.netns,
        )  # fmt: skip
        for netns, device, v4, v6 in (
            (router, self.routerLink, self.routerIPv4, self.routerIPv6),
            (self.netns, "eth0", self.ipv4, self.ipv6),
        ):
            ip("-n", netns, "addr", "add", f"{v4}/24", "dev", device)
            ip("-n", netns, "-6", "addr", "add", f"{v6}/64", "dev", device, "nodad")
            ip("-n", netns, "link", "set", device, "up")
        ip("-n", self.netns, "link", "set", "lo", "up")
        self._routes()

    def _routes(self) -> None:
        for family, via in (("-4", self.routerIPv4), ("-6", self.routerIPv6)):
            ip(
                "-n", self.netns, family, "route", "replace", "default",
                "via", via, "dev", "eth0", "onlink",
            )  # fmt: skip


class Network:
    """
    A router namespace and the hosts linked to it, for one test; L{close} removes
    them all.  Names: ``xmt-PID-N-router``, ``xmt-PID-N-HOST``.
    """

    def __init__(self) -> None:
        _forgetStaleNamespaces()
        self.prefix = f"xmt-{os.getpid()}-{next(_counter)}"
        self.router = f"{self.prefix}-router"
        self.hosts: dict[str, Host] = {}
        self.processes: list[subprocess.Popen[Any]] = []
        ip("netns", "add", self.router)
        ip("-n", self.router, "link", "set", "lo", "up")
        _sysctl(self.router, "net.ipv4.ip_forward=1")
        _sysctl(self.router, "net.ipv6.conf.all.forwarding=1")

    def routerArgv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the router's namespace."""
        return ["ip", "netns", "exec", self.router, *argv]

    def popenInRouter(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the router; stopped at close."""
        process = subprocess.Popen(self.routerArgv(argv), **kw)
        self.processes.append(process)
        return process

    def addHost(self, name: str) -> Host:
        """A new host linked to the router (link number: the order of creation)."""
        if name in self.hosts:
            raise ValueError(f"host {name} exists already")
        host = Host(self, name, len(self.hosts) + 1)
        self.hosts[name] = host
        host._create()
        return host

    def close(self) -> None:
        """Stop the processes started here (by pid), then delete the namespaces."""
        for process in self.processes:
            _stop(process)
        for netns in [h.netns for h in self.hosts.values()] + [self.router]:
            for pid in _pidsIn(netns):  # started here by a process of ours
                _kill(pid)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)


def _forgetStaleNamespaces() -> None:
    """
    Delete the names of namespaces left by a test run whose process is gone
    (``xmt-PID-...`` with no process PID), and their ``/etc/netns`` files.
    """
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "xmt" or not parts[1].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[1]}"):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def _sysctl(netns: str, setting: str) -> None:
    """Set ``net.x.y=v`` in ``netns`` (through /proc/sys: no procps needed)."""
    key, value = setting.split("=")
    path = "/proc/sys/" + key.replace(".", "/")
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "sh", "-c", f"echo {value} > {path}"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{setting} in {netns}: {done.stderr.strip()}")


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _pidsIn(netns: str) -> list[int]:
    done = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True
    )
    return [int(word) for word in done.stdout.split()]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def network() -> Iterator[Network]:
    """A L{Network} for one test (skips without namespaces), always removed."""
    requireNamespaces()
    net = Network()
    try:
        yield net
    finally:
        net.close()


# -- certificates and daemons on hosts -----------------------------------------------


class HostPKI:
    """
    A CA and host certificates naming each host's addresses (IPv4 and IPv6 SANs),
    as ``xenmig pki`` makes them.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        pki.initCA(directory)
        self.caPath = directory / "ca.pem"

    def issue(self, name: str, addresses: Sequence[str] = ()) -> tuple[Path, Path]:
        """The certificate and key of ``name`` (``name.pem``, ``name.key``)."""
        cert, key = pki.issueHost(self.directory, name, list(addresses))
        return Path(cert.path), Path(key.path)

    def forHost(self, host: Host, *extra: str) -> tuple[Path, Path]:
        """A certificate for ``host`` (``NAME.test``) with both its addresses."""
        return self.issue(f"{host.name}.test", [host.ipv4, host.ipv6, *extra])

    def tlsArgs(self, name: str) -> list[str]:
        """``--ca --cert --key`` for the holder of ``name``'s certificate."""
        return [
            "--ca",
            str(self.caPath),
            "--cert",
            str(self.directory / f"{name}.pem"),
            "--key",
            str(self.directory / f"{name}.key"),
        ]


class NetDaemon(Daemon):
    """
    A real ``twistd xenmig`` on ``host``, listening on ``interface`` (default: the
    host's IPv4 address; ``::`` for dual stack), port 8002, with the host's
    certificate from ``certs``.  Start it with L{start} (blocking, for fixtures).
    """

    def __init__(
        self,
        root: Path,
        certs: HostPKI,
        host: Host,
        *extra: str,
        interface: str | None = None,
        port: int = 8002,
    ) -> None:
        self.host = host
        self.certs = certs
        name = f"{host.name}.test"
        if not (certs.directory / f"{name}.pem").exists():
            certs.forHost(host)
        super().__init__(root, certs, *extra)  # type: ignore[arg-type]
        self.port = port
        self.interface = interface if interface is not None else host.ipv4
        self.name = name

    def argv(self) -> list[str]:
        options = [
            "--port",
            str(self.port),
            "--interface",
            self.interface,
            "--state-dir",
            str(self.stateDir),
            "--allow-root",
            str(self.dest),
            *self.certs.tlsArgs(self.name),
            *self.extra,
        ]
        from xenmig.clients.processes import daemonArgv

        return self.host.argv(daemonArgv(options, str(self.logPath)))

    def target(self, family: int = 4) -> str:
        """``HOST:PORT`` of this daemon on its host's address (IPv6 bracketed)."""
        return hostPort(self.host.address(family), self.port)
