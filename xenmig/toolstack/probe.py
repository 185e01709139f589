"""Whether a port answers TLS: what a plaintext client that was hung up on asks."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IHandshakeListener)
class TLSProbe(Protocol):
    """Fires ``answer`` with whether the peer spoke TLS, once it is known."""

    def __init__(self) -> None:
        self.answer: Deferred[bool] = Deferred()
        self.gone = False

    def handshakeCompleted(self) -> None:
        self._answer(True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gone = True
        # A TLS alert (e.g. "certificate required") is an answer in TLS too.
        alert = reason is not None and reason.check(SSL.Error) is not None
        self._answer(alert and "alert" in str(getattr(reason, "value", "")))

    def _answer(self, spoke: bool) -> None:
        if not self.answer.called:
            self.answer.callback(spoke)


async def speaksTLS(reactor: Any, host: str, port: int, timeout: float = 5.0) -> bool:
    """
    Whether the program at ``host:port`` answers a TLS handshake (it completes,
    or the peer answers with a TLS alert).  Nothing is verified, presented or
    sent beyond the handshake, and the connection is dropped at once.
    """
    probe = TLSProbe()
    endpoint = wrapClientTLS(
        CertificateOptions(), HostnameEndpoint(reactor, host, port, timeout=timeout)
    )
    try:
        await endpoint.connect(Factory.forProtocol(lambda: probe))
        return await probe.answer.addTimeout(timeout, reactor)
    except Exception:
        return False
    finally:
        if probe.transport is not None and not probe.gone:
            probe.transport.abortConnection()  # type: ignore[attr-defined]
