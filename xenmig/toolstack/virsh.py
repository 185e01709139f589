"""Domain control for a libvirt-managed VM, through ``virsh --connect URI``."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from xenmig.clients.processes import ChildProcess
from xenmig.errors import BadSpec
from xenmig.interfaces import IDomainControl
from xenmig.model import checkName
from xenmig.toolstack.tools import DomainControlError, runTool

log = Logger()

#: Seconds a ``virsh`` command may take (``virsh destroy`` of a large guest is slow).
VIRSH_TIMEOUT = 120.0

#: The words ``virsh domstate`` answers with.
STATES = frozenset(
    {
        "running",
        "idle",
        "paused",
        "in shutdown",
        "shut off",
        "crashed",
        "pmsuspended",
        "no state",
    }
)


def checkURI(uri: str) -> str:
    """
    Return ``uri`` if it can be a libvirt connection URI (``qemu:///system``,
    ``qemu+ssh://host/system``, or an alias of libvirt.conf).

    @raise BadSpec: if it is empty, starts with '-' or holds a space or a
        control character.
    """
    if not uri or uri.startswith("-") or any(c.isspace() or c < " " for c in uri):
        raise BadSpec(
            f"libvirt URI {uri!r} is invalid: give a connection URI such as "
            f"qemu:///system"
        )
    return uri


@implementer(IDomainControl)
class LibvirtDomainControl:
    """
    A libvirt domain through ``virsh``: ``virsh suspend``, ``virsh resume`` and,
    after the commit, ``virsh destroy``, each with ``--connect URI``.

    Release destroys the running domain and keeps its definition: a persistent
    domain stays defined, shut off, as after ``virsh migrate`` without
    ``--undefinesource``.  A domain that is shut off or that libvirt no longer
    knows counts as released.  ``virsh``'s own message is the error's reason.
    """

    def __init__(
        self,
        reactor: Any,
        uri: str,
        domain: str,
        executable: str = "virsh",
        timeout: float = VIRSH_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.uri = checkURI(uri)
        self.domain = checkName("domain", domain)
        self.executable = executable
        self.timeout = timeout
        self.description = f"libvirt domain {domain} at {uri}"

    def _argv(self, *words: str) -> list[str]:
        return [self.executable, "--connect", self.uri, *words]

    def _virsh(self, *words: str) -> Deferred[ChildProcess]:
        # virsh's words in English, whatever the locale: they are parsed and quoted.
        env = dict(os.environ, LC_ALL="C")
        return runTool(
            self.reactor, self._argv(*words), self.timeout, self.description, env
        )

    def _failed(self, child: ChildProcess, verb: str) -> DomainControlError:
        return DomainControlError(
            f"{self.description}: 'virsh {verb} {self.domain}' failed (exit "
            f"status {child.status}): {child.tail() or 'no output'}"
        )

    async def _run(self, verb: str) -> ChildProcess:
        return await self._virsh(verb, "--domain", self.domain)

    async def state(self) -> str | None:
        """
        The domain's state as ``virsh domstate`` words it (``running``,
        ``paused``, ``shut off``...), or None when virsh cannot tell.
        """
        child = await self._run("domstate")
        if child.status != 0:
            return None
        for line in child.output:
            word = line.decode("utf-8", "replace").strip()
            if word in STATES:
                return word
        return None

    async def _gone(self) -> bool:
        """Whether libvirt answers and lists no domain of this name."""
        child = await self._virsh("list", "--all", "--name")
        if child.status != 0:
            return False
        names = {line.decode("utf-8", "replace").strip() for line in child.output}
        return self.domain not in names

    def pause(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._pause())

    async def _pause(self) -> None:
        child = await self._run("suspend")
        if child.status != 0:
            raise self._failed(child, "suspend")
        state = await self.state()
        if state != "paused":
            raise DomainControlError(
                f"{self.description} is {state or 'in an unknown state'} after "
                f"'virsh suspend', not paused"
            )
        log.info("{control}: suspended", control=self.description)

    def resume(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._resume())

    async def _resume(self) -> None:
        child = await self._run("resume")
        if child.status != 0:
            # A pause that never happened leaves the domain running: resumed.
            if await self.state() != "running":
                raise self._failed(child, "resume")
            log.info("{control}: was running", control=self.description)
            return
        log.info("{control}: resumed", control=self.description)

    def release(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._release())

    async def _release(self) -> None:
        child = await self._run("destroy")
        if child.status == 0:
            log.info("{control}: destroyed", control=self.description)
            return
        state = await self.state()
        if state == "shut off" or (state is None and await self._gone()):
            log.info(
                "{control}: already released ({state})",
                control=self.description,
                state=state or "not defined",
            )
            return
        raise self._failed(child, "destroy")
