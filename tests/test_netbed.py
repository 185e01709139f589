"""
The multi-host test bed itself: namespaced hosts that reach each other by IPv4 and
IPv6 through a router, a link that goes down and comes back, a real daemon on a
host's address, and the fault proxy's faults, each seen from the other side.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import CLIENT, MiB, denseFile
from faultproxy import FaultProxy
from nethosts import HostPKI, NetDaemon, Network, hostPort

from xenmig.digest import hashFile


@pytest.fixture
def bed(network: Network, tmp_path: Path) -> Iterator[dict[str, object]]:
    """A source host, a target host running a daemon on 10.77.2.2:8002, a PKI."""
    source = network.addHost("source")
    target = network.addHost("target")
    certs = HostPKI(tmp_path / "pki")
    certs.forHost(source)
    daemon = NetDaemon(tmp_path / "target", certs, target).start()
    try:
        yield {"source": source, "target": target, "certs": certs, "daemon": daemon}
    finally:
        daemon.stop()


def migrateArgs(certs: HostPKI, target: str, *extra: str) -> list[str]:
    return ["migrate", "--target", target, *certs.tlsArgs("source.test"), *extra]


def test_hosts_reach_each_other_by_both_families(network: Network) -> None:
    """Two hosts reach each other by IPv4 and IPv6, through the router."""
    a, b = network.addHost("a"), network.addHost("b")
    listener = b.popen(
        [
            "python3",
            "-c",
            "import socket,time\n"
            "s=socket.socket(socket.AF_INET6);s.bind(('::',7000));s.listen()\n"
            "time.sleep(60)",
        ]
    )
    assert listener.poll() is None
    deadline = time.monotonic() + 5
    while not a.connects(b.ipv6, 7000) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.connects(b.ipv6, 7000)
    assert a.connects(b.ipv4, 7000)
    b.linkDown()
    assert not a.connects(b.ipv4, 7000, timeout=0.5)
    b.linkUp()
    assert a.connects(b.ipv6, 7000)
    assert a.address(6) != b.address(6)
    # nothing of this is visible in the namespace running the tests
    assert b.ipv4 not in os.popen("ip -4 addr show").read()


def test_migration_between_hosts_through_the_proxy(
    bed: dict[str, object], network: Network, tmp_path: Path
) -> None:
    """A file migrates from the source host through the proxy to the target daemon."""
    source, target, certs, daemon = (
        bed["source"], bed["target"], bed["certs"], bed["daemon"],
    )  # fmt: skip
    assert isinstance(daemon, NetDaemon) and isinstance(certs, HostPKI)
    proxy = FaultProxy.start(
        network,
        hostPort(source.routerIPv4, 9002),  # type: ignore[attr-defined]
        daemon.target(),
        str(tmp_path / "proxy.sock"),
    )
    try:
        state = denseFile(tmp_path / "state.img", 3 * MiB)
        destination = daemon.dest / "state.img"
        proxy.set(delay=0.002)
        result = source.xenmig(  # type: ignore[attr-defined]
            *migrateArgs(certs, proxy.listen, "--server-name", target.ipv4),  # type: ignore[attr-defined]
            "--domain",
            "vm1",
            "--device",
            f"file:blob:path={state},target={destination}",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["phase"] == "COMMITTED"
        assert hashFile(str(destination)) == hashFile(str(state))
        stats = proxy.stats()
        assert stats["connections"] >= 2  # control and the stream
        assert stats["bytes_up"] > 3 * MiB
        assert stats["open"] == 0
    finally:
        proxy.stop()
    assert CLIENT  # the daemons module's names stay importable


ECHO = (
    "import socket,threading\n"
    "s=socket.socket(socket.AF_INET6);s.bind(('::',7000));s.listen()\n"
    "def echo(c):\n"
    "    try:\n"
    "        while d:=c.recv(65536): c.sendall(d)\n"
    "    except OSError: pass\n"
    "    c.close()\n"
    "while True:\n"
    "    c,_=s.accept();threading.Thread(target=echo,args=(c,),daemon=True).start()\n"
)

#: Send SIZE bytes of b'x' through the proxy, read the echo for up to WAIT
#: seconds; print what came back (its length, the count of altered bytes) or why not.
PROBE = (
    "import socket,sys,time,json\n"
    "size,wait=int(sys.argv[3]),float(sys.argv[4])\n"
    "c=socket.create_connection((sys.argv[1],int(sys.argv[2])),5)\n"
    "c.settimeout(wait);got=b'';why='ok';start=time.monotonic()\n"
    "try:\n"
    "    c.sendall(b'x'*size)\n"
    "    while len(got)<size:\n"
    "        d=c.recv(65536)\n"
    "        if not d: why='closed';break\n"
    "        got+=d\n"
    "except socket.timeout: why='timeout'\n"
    "except ConnectionResetError: why='reset'\n"
    "print(json.dumps({'len':len(got),'altered':sum(b!=120 for b in got),"
    "'why':why,'seconds':time.monotonic()-start}))\n"
)


def test_fault_proxy_faults_are_seen_by_the_hosts(
    network: Network, tmp_path: Path
) -> None:
    """Each fault of the proxy shows at the far end: reset, stall, corruption, delay."""
    source, target = network.addHost("source"), network.addHost("target")
    target.popen(["python3", "-c", ECHO])
    proxy = FaultProxy.start(
        network,
        hostPort(source.routerIPv4, 9000),
        hostPort(target.ipv6, 7000),
        str(tmp_path / "proxy.sock"),
    )

    def probe(size: int, wait: float = 3.0) -> dict[str, object]:
        done = source.run(
            ["python3", "-c", PROBE, source.routerIPv4, "9000", str(size), str(wait)]
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    try:
        deadline = time.monotonic() + 5
        while probe(10)["why"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        clean = probe(100_000)
        assert (clean["why"], clean["len"], clean["altered"]) == ("ok", 100_000, 0)
        proxy.set(reset_after=50_000, directions=["up"])
        assert probe(100_000)["why"] == "reset"
        proxy.clear()
        proxy.set(corrupt_at=1000, directions=["down"])
        corrupted = probe(5000)
        assert corrupted["len"] == 5000 and corrupted["altered"] == 1
        proxy.clear()
        proxy.set(stall_after=20_000)
        stalled = probe(100_000, wait=1.0)
        assert stalled["why"] == "timeout" and stalled["len"] <= 20_000
        proxy.clear()
        proxy.set(delay=0.3)
        assert probe(10)["seconds"] >= 0.6  # 0.3 s each way
        proxy.clear()
        proxy.set(blackhole=True)
        holed = probe(10, wait=0.5)
        assert (holed["why"], holed["len"]) == ("timeout", 0)
        stats = proxy.clear()
        assert stats["resets"] == 1 and stats["corrupted"] == 1
        assert stats["dropped"] == 10 and stats["connections"] >= 7
        with pytest.raises(ValueError, match="unknown setting"):
            proxy.set(jitter=1)
    finally:
        proxy.stop()


def test_the_documented_example_runs(network: Network, tmp_path: Path) -> None:
    """The example of doc/testing.md runs as written (a stalled stream fails)."""
    text = (Path(__file__).parent.parent / "doc" / "testing.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {
        "network": network,
        "tmp_path": tmp_path,
        "HostPKI": HostPKI,
        "NetDaemon": NetDaemon,
        "FaultProxy": FaultProxy,
        "hostPort": hostPort,
        "denseFile": denseFile,
    }
    exec(compile(block, "doc/testing.md", "exec"), namespace)
