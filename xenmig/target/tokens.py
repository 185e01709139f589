"""StreamTokens: the one-time tokens that let a connection become a device's stream."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xenmig.errors import BadToken

log = Logger()

#: Random bytes in a token.
TOKEN_BYTES = 32


@dataclass(frozen=True)
class StreamClaim:
    """What a stream token stands for: one device of one migration, for one peer."""

    migrationId: str
    device: str
    peer: str
    expires: float


class StreamTokens:
    """
    The stream tokens handed out by C{OpenStream} and taken by C{StartStream}.
    Each is random, bound to the peer it was issued to, used once, and valid for
    ``lifetime`` seconds on ``clock``; a new token for a device replaces the old.
    """

    def __init__(self, clock: IReactorTime, lifetime: float) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self._claims: dict[bytes, StreamClaim] = {}

    def issue(self, migrationId: str, device: str, peer: str) -> bytes:
        """A new token for the stream of ``device``, for ``peer`` only."""
        self._expire()
        for old in [
            token
            for token, claim in self._claims.items()
            if (claim.migrationId, claim.device) == (migrationId, device)
        ]:
            del self._claims[old]
        token = secrets.token_bytes(TOKEN_BYTES)
        expires = self.clock.seconds() + self.lifetime
        self._claims[token] = StreamClaim(migrationId, device, peer, expires)
        return token

    def claim(self, token: bytes, peer: str) -> StreamClaim:
        """
        Use ``token`` (once, whoever presents it).

        @raise BadToken: if it is unknown, used, expired, or another peer's.
        """
        self._expire()
        claim = self._claims.pop(token, None)
        if claim is None:
            raise BadToken("the stream token is unknown, used or expired")
        if claim.peer != peer:
            log.warn(
                "migration {migration_id}: {peer} presented a token issued to {owner}",
                migration_id=claim.migrationId,
                peer=peer,
                owner=claim.peer,
            )
            raise BadToken("the stream token was issued to another host")
        return claim

    def _expire(self) -> None:
        now = self.clock.seconds()
        for token in [t for t, c in self._claims.items() if c.expires < now]:
            del self._claims[token]
