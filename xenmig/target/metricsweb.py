"""The ``--metrics`` endpoint: Prometheus's exposition at /metrics, on the reactor."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from xenmig.errors import ConfigurationError

#: Where ``--metrics PORT`` listens: loopback, unless a host is given.
DEFAULT_HOST = "127.0.0.1"


class MetricsPage(Resource):
    """
    ``GET /metrics``: the registry in Prometheus's text format, rendered in
    the reactor's thread (the figures read live objects of the core).
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class MetricsSite(Site):
    """
    A web site with the metrics at ``/metrics`` (and nothing else), quiet: no
    access log (a scrape every few seconds says nothing), no factory lines.
    """

    noisy = False

    def __init__(self, registry: CollectorRegistry) -> None:
        root = Resource()
        root.putChild(b"metrics", MetricsPage(registry))
        super().__init__(root)

    def log(self, request: http.Request) -> None:
        pass


def parseAddress(text: str) -> tuple[str, int]:
    """
    ``--metrics``: ``PORT`` (on L{DEFAULT_HOST}), ``HOST:PORT`` or
    ``[IPv6]:PORT``; the host and the port.

    @raise ValueError: saying what is wrong.
    """
    host, _, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--metrics {text}: write an IPv6 address in brackets")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics {text}: the port must be from 1 to 65535")
    return host or DEFAULT_HOST, int(port)


class MetricsService(StreamServerEndpointService):
    """
    Serves L{MetricsSite} on ``host:port``; a port that cannot be bound
    stops the daemon's start with one line (L{ConfigurationError}).
    """

    def __init__(
        self, reactor: Any, host: str, port: int, registry: CollectorRegistry
    ) -> None:
        kind = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        super().__init__(kind(reactor, port, interface=host), MetricsSite(registry))
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError.strerror if e.socketError else str(e)
            raise ConfigurationError(
                f"cannot listen on {self.where} for --metrics: {reason}"
            )
