"""What went wrong, in the operator's words: one line and a code for every failure."""

from __future__ import annotations

import re
import ssl
from typing import Any

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net
from twisted.python.filepath import FilePath

from xenmig.errors import WIRE_ERRORS, PhaseTimeout, XenmigError
from xenmig.model import splitHostPort
from xenmig.tls import (
    ALTERED,
    ALTERED_IN_TRANSIT,
    NameMismatch,
    describeTLSError,
    recentRefusals,
)
from xenmig.toolstack.outcome import Reach


@attrs.frozen
class Explained:
    """A failure as the operator is told it: a code (for ``--json``) and one line."""

    code: str
    message: str
    #: Whether the message is only the error's own text (nothing was added).
    verbatim: bool = False

    def asJSON(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def errorCode(error: BaseException) -> str:
    """
    The code of an error: its wire code if it has one (``DEVICE_REFUSED``: the
    target said it), else its class's name (``CommitInDoubt``:
    ``COMMIT_IN_DOUBT``) for xenmig's own errors, else ``ERROR``.
    """
    for klass in type(error).__mro__:
        if klass in WIRE_ERRORS:
            return WIRE_ERRORS[klass].decode()
    if isinstance(error, XenmigError):
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).upper()
    return "ERROR"


def describeError(error: BaseException, reach: Reach | None = None) -> str:
    """A one-line description of a failure, whatever its type."""
    return explain(error, reach).message


async def diagnose(
    reactor: Any, error: BaseException, reach: Reach, answered: bool = False
) -> Explained:
    """
    L{explain}, after asking the target what it speaks when a plaintext
    client was hung up on before any answer (a daemon that speaks TLS does
    that without a word).
    """
    spokeTLS = None
    if reach.remote and reach.plaintext and not answered and _isLost(error):
        from xenmig.toolstack.probe import speaksTLS

        host, port = _hostPort(reach)
        spokeTLS = await speaksTLS(reactor, host, int(port))
    return explain(error, reach, answered, spokeTLS)


def explain(
    error: BaseException,
    reach: Reach | None = None,
    answered: bool = False,
    spokeTLS: bool | None = None,
) -> Explained:
    """
    Say what failed and what to do about it.

    @param reach: how the daemon was reached (names in the message come from it).
    @param answered: whether the daemon had answered anything before.
    @param spokeTLS: whether the daemon answered a TLS handshake (L{diagnose}).
    """
    reach = reach or Reach("the daemon")
    found = (
        _connectFailure(error, reach)
        or _lostConnection(error, reach, answered, spokeTLS)
        or _nameMismatch(error, reach)
        or _tlsFailure(error, reach, answered)
    )
    if found is not None:
        return found
    return Explained(errorCode(error), _oneLine(error), verbatim=True)


def _oneLine(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


def _hostPort(reach: Reach) -> tuple[str, str]:
    """The host (an IPv6 address without its brackets) and port of ``--target``."""
    try:
        return splitHostPort(reach.where)
    except ValueError:
        host, _, port = reach.where.rpartition(":")
        return host, port


# -- reaching the port -----------------------------------------------------------------


def _connectFailure(error: BaseException, reach: Reach) -> Explained | None:
    where = reach.where
    host, port = _hostPort(reach)
    if isinstance(error, net.ConnectionRefusedError | ConnectionRefusedError):
        return Explained(
            "CONNECTION_REFUSED",
            f"nothing accepts connections on {where} (connection refused): is the "
            f"xenmig daemon running on {host}, listening on port {port} (twistd "
            f"xenmig --port) and on that address (--interface)? is a firewall "
            f"rejecting the port?",
        )
    if isinstance(error, net.DNSLookupError):
        return Explained(
            "HOST_NOT_FOUND",
            f"cannot find the address of {host} (--target {where}): check the name, "
            f"or give the address",
        )
    timedOut = isinstance(error, net.TCPTimedOutError | net.TimeoutError)
    if timedOut or (
        isinstance(error, PhaseTimeout) and str(error).startswith("connecting ")
    ):
        return Explained(
            "CONNECTION_TIMEOUT",
            f"no answer from {where} ({_oneLine(error)}): is {host} up, and port "
            f"{port} the daemon's? a firewall may drop the packets",
        )
    if isinstance(error, net.ConnectError):
        return Explained(
            "CONNECTION_FAILED", f"cannot connect to {where}: {_oneLine(error)}"
        )
    return None


def _isLost(error: BaseException) -> bool:
    return isinstance(error, net.ConnectionClosed | ConnectionResetError)


def _lostConnection(
    error: BaseException, reach: Reach, answered: bool, spokeTLS: bool | None
) -> Explained | None:
    if not (_isLost(error) or isinstance(error, BrokenPipeError)):
        return None
    where = reach.where
    if answered or not reach.remote:
        return Explained(
            "CONNECTION_LOST", f"the connection to {where} was lost: {_oneLine(error)}"
        )
    if reach.plaintext and spokeTLS:
        return Explained(
            "PLAINTEXT_MISMATCH",
            f"{where} speaks TLS, and this side was given --insecure-plaintext: "
            f"give --ca, --cert and --key instead (--insecure-plaintext works only "
            f"with a daemon started with it too, on loopback)",
        )
    if reach.plaintext:
        return Explained(
            "CONNECTION_LOST",
            f"{where} hung up without answering: it does not seem to be a daemon "
            f"started with --insecure-plaintext (the daemon's log says why it hung "
            f"up)",
        )
    return Explained(
        "CONNECTION_LOST",
        f"{where} hung up during the TLS handshake, before answering: is its "
        f"daemon started with --insecure-plaintext (then this side needs it too), "
        f"or another program listening there? (the daemon's log says why it hung "
        f"up)",
    )


# -- TLS -------------------------------------------------------------------------------


def _nameMismatch(error: BaseException, reach: Reach) -> Explained | None:
    if not isinstance(error, VerificationError):
        return None
    if reach.serverName:
        hint = (
            f"--server-name {reach.serverName} is not among them: give one of "
            f"them, or issue the target a certificate with that name (xenmig pki "
            f"issue --host NAME --ip ADDRESS)"
        )
    else:
        hint = (
            "give --server-name with one of them, or issue the target a "
            "certificate with the name or address of --target (xenmig pki issue "
            "--host NAME --ip ADDRESS)"
        )
    if not isinstance(error, NameMismatch):
        return Explained(
            "TLS_NAME_MISMATCH",
            f"the target's certificate does not name the host asked for; {hint}",
        )
    return Explained("TLS_NAME_MISMATCH", f"{error}: {hint}")


#: What OpenSSL's reasons mean when the bytes themselves were wrong.
_TLS_DETECTED = [
    (ALTERED_IN_TRANSIT, ALTERED),
    (
        ("wrong version number", "packet length too long", "unknown protocol"),
        "what answers at {where} does not speak TLS: is it a xenmig daemon, and "
        "not one started with --insecure-plaintext?",
    ),
    (
        ("unexpected eof",),
        "{where} hung up in the middle of it (the daemon's log says why)",
    ),
    (
        ("unsupported protocol", "no shared cipher", "protocol version"),
        "the two sides share no TLS version or cipher suite (the target's "
        "--tls-minimum?)",
    ),
]


def _tlsFailure(error: BaseException, reach: Reach, answered: bool) -> Explained | None:
    if not isinstance(error, SSL.Error | ssl.SSLError):
        return None
    reasons = describeTLSError(error)
    if "certificate verify failed" in reasons:
        return _targetRefused(reasons, reach, list(recentRefusals)[-1:])
    if "alert" in reasons:
        return _refusedByTarget(reasons, reach)
    step = "connection" if answered else "handshake"
    message = f"the TLS {step} with {reach.where} failed: OpenSSL detected {reasons}"
    for clues, meaning in _TLS_DETECTED:
        if any(clue in reasons for clue in clues):
            message += ": " + meaning.format(where=reach.where)
            break
    return Explained("TLS_FAILED", message)


def _targetRefused(reasons: str, reach: Reach, refusals: list[str]) -> Explained:
    """This host refused the target's certificate (the refusal says why)."""
    if not refusals:
        message = f"this host refused the target's certificate ({reasons})"
    elif refusals[0].startswith("this host"):
        message = refusals[0]
    else:
        message = f"this host refused {refusals[0]}"
    if "does not trust" in message or not refusals:
        ca = f"--ca {reach.ca}" if reach.ca else "--ca"
        message += (
            f": check {ca} here: it must hold the CA that issued the target's "
            f"certificate (the target's --ca, in turn, must hold the CA of this "
            f"host's --cert)"
        )
    return Explained("TARGET_CERTIFICATE_REFUSED", message)


def _refusedByTarget(reasons: str, reach: Reach) -> Explained:
    """The target answered the handshake with an alert: it refused this host."""
    where = reach.where
    mine = f"this host's certificate{_describeCertificate(reach.cert)}"
    if "unknown ca" in reasons:
        why = (
            f"the target {where} refused {mine}: it does not chain to a CA of the "
            f"target's --ca; give --cert a certificate issued by the CA the target "
            f"trusts (xenmig pki issue --dir THAT_CA), or add this host's CA to the "
            f"target's --ca"
        )
    elif "certificate expired" in reasons:
        why = (
            f"the target {where} refused {mine} as expired: issue a new one "
            f"(xenmig pki issue)"
        )
    elif "certificate required" in reasons:
        why = f"the target {where} requires this host's certificate: give --cert"
    elif "bad certificate" in reasons or "unsupported certificate" in reasons:
        why = (
            f"the target {where} refused {mine} ({reasons}): is it valid yet? check "
            f"the clocks of both hosts (the target's log says why)"
        )
    else:
        return Explained(
            "TLS_FAILED",
            f"the TLS handshake with {where} failed: the target answered "
            f"'{reasons}' (the target's log says why)",
        )
    return Explained("CERTIFICATE_REFUSED_BY_TARGET", why)


def _describeCertificate(path: str | None) -> str:
    """`` CN=..., issued by CN=... (--cert PATH)``, or as much of it as is known."""
    if not path:
        return ""
    from xenmig.certificates import parseCertificates, readFile

    try:
        file = FilePath(path)
        certificate = parseCertificates(readFile(file, "certificate"), file)[0]
    except Exception:
        return f" (--cert {path})"
    return (
        f" {certificate.subject.rfc4514_string()}, issued by "
        f"{certificate.issuer.rfc4514_string()} (--cert {path})"
    )
