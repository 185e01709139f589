"""The ``twistd xenmig`` plugin: it only names the service (see xenmig.tap)."""

from twisted.application.service import ServiceMaker

xenmig = ServiceMaker(
    "xenmig",
    "xenmig.tap",
    "Receive migrations of VM device state over mutual TLS",
    "xenmig",
)
