"""Domain control: pausing, resuming and releasing a whole VM (``xl``, QMP, libvirt)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from xenmig.clients.processes import ChildProcess
from xenmig.clients.qmp import QMPConnectionError
from xenmig.clients.qmpclient import QMPClient, connectQMP, qmpSession
from xenmig.errors import BadSpec
from xenmig.interfaces import IDomainControl
from xenmig.model import checkName
from xenmig.toolstack.tools import DomainControlError, runTool
from xenmig.toolstack.virsh import LibvirtDomainControl

__all__ = [
    "FORMS",
    "DomainControlError",
    "LibvirtDomainControl",
    "QMPDomainControl",
    "XLDomainControl",
    "parseDomainControl",
    "runTool",
]

log = Logger()
T = TypeVar("T")

#: Seconds an ``xl`` command may take (``xl destroy`` of a large guest is slow).
XL_TIMEOUT = 120.0
#: Seconds a QMP connection and each command may take.
QMP_TIMEOUT = 10.0


@implementer(IDomainControl)
class XLDomainControl:
    """
    A Xen domain through ``xl``: ``xl pause``, ``xl unpause`` and, after the
    commit, ``xl destroy``.  ``xl``'s own message is the error's reason.
    """

    def __init__(
        self,
        reactor: Any,
        domain: str,
        executable: str = "xl",
        timeout: float = XL_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.domain = checkName("domain", domain)
        self.executable = executable
        self.timeout = timeout
        self.description = f"xl domain {domain}"

    def _xl(self, verb: str) -> Deferred[ChildProcess]:
        argv = [self.executable, verb, self.domain]
        return runTool(self.reactor, argv, self.timeout, self.description)

    async def _run(self, verb: str) -> None:
        child = await self._xl(verb)
        if child.status != 0:
            raise DomainControlError(
                f"{self.description}: 'xl {verb} {self.domain}' failed (exit "
                f"status {child.status}): {child.tail() or 'no output'}"
            )
        log.info("{control}: xl {verb} done", control=self.description, verb=verb)

    def pause(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run("pause"))

    def resume(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run("unpause"))

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._release())

    async def _release(self) -> None:
        try:
            await self._run("destroy")
        except DomainControlError:
            # A domain xl no longer lists is released already.
            listed = await self._xl("list")
            if listed.status == 0:
                raise
            log.info("{control}: already gone", control=self.description)


@implementer(IDomainControl)
class QMPDomainControl:
    """
    A VM that is one QEMU, through its QMP socket: ``stop``, ``cont`` and, after
    the commit, ``quit``.  It connects for each call and hangs up afterwards:
    QEMU serves one QMP client at a time, and the ``devmodel`` handler needs the
    same socket in between.
    """

    def __init__(self, reactor: Any, path: str, timeout: float = QMP_TIMEOUT) -> None:
        self.reactor = reactor
        self.path = path
        self.timeout = timeout
        self.description = f"QEMU at {path}"

    def _session(self, work: Callable[[QMPClient], Awaitable[T]]) -> Deferred[T]:
        return qmpSession(self.reactor, self.path, self.timeout, work, self.description)

    def pause(self) -> Deferred[None]:
        return self._session(self._pause)

    async def _pause(self, client: QMPClient) -> None:
        await client.stop()
        status = await client.queryStatus()
        if status == "running":
            raise DomainControlError(f"{self.description} still runs after 'stop'")
        log.info(
            "{control}: stopped ({status})", control=self.description, status=status
        )

    def resume(self) -> Deferred[None]:
        return self._session(self._resume)

    async def _resume(self, client: QMPClient) -> None:
        status = await client.queryStatus()
        if status == "inmigrate":
            # 'cont' would be accepted and start the VM whenever some state
            # arrives later: never do that.
            raise DomainControlError(
                f"{self.description} has not loaded the VM's state (it is "
                f"'inmigrate'): not resuming it"
            )
        await client.cont()
        log.info(
            "{control}: resumed from {status}", control=self.description, status=status
        )

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._release())

    async def _release(self) -> None:
        try:
            client = await connectQMP(self.reactor, self.path, self.timeout)
        except QMPConnectionError as e:
            log.info(
                "{control}: already gone ({why})", control=self.description, why=str(e)
            )
            return
        try:
            await client.quit().addTimeout(self.timeout, self.reactor)
            await client.protocol.whenClosed().addTimeout(self.timeout, self.reactor)
        finally:
            await client.close()
        log.info("{control}: QEMU quit", control=self.description)


#: The forms ``--domain-control`` takes.
FORMS = "xl, qmp:PATH, libvirt:URI or none"


def parseDomainControl(text: str, reactor: Any, domain: str) -> IDomainControl | None:
    """
    ``xl`` (the domain named ``domain``), ``qmp:PATH`` (one QEMU),
    ``libvirt:URI`` (the libvirt domain named ``domain``, through ``virsh``), or
    ``none`` (the caller pauses and resumes the VM itself): a control, or None.

    @raise BadSpec: for anything else.
    """
    if text == "none":
        return None
    if text == "xl":
        return XLDomainControl(reactor, domain)
    kind, sep, path = text.partition(":")
    if kind == "qmp" and sep and path:
        return QMPDomainControl(reactor, path)
    if kind == "libvirt" and sep and path:
        return LibvirtDomainControl(reactor, path, domain)
    raise BadSpec(f"domain control {text!r} is not one of {FORMS}")
