"""Who sent a request, and its request id: one per exchange, sent upstream, returned to the
client, logged and put on the server span.

An id the client sent is kept only from a peer in ``server.trusted_proxies`` (or from any
peer under ``request_id.keep_untrusted``), and only when it is one short token: 1 to
``MAX_LENGTH`` characters of letters, digits and ``-._:+/=@`` (UUIDs, hex, base64 and the
ids of common load balancers fit). Anything else (empty, longer, spaces, quotes, control
characters, a field sent twice) is replaced by a new one, so an id never carries what
could break a log line or a header downstream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from .config import RequestIdConfig
from .exchange import USER_AGENT_CHARS, Exchange
from .headers import TrustedNetworks, first_value, forwarded_client, peer_is_trusted

MAX_LENGTH = 200
# Where the proxy leaves the exchange's id in its ASGI scope: the parse-time guard reads it
# when it refuses the rest of a request that the proxy has begun to serve.
REQUEST_ID_KEY = "relay.request_id"
_TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._:+/=@"


def new_request_id() -> str:
    """128 random bits as 32 hex digits: one system call, no UUID object to format."""
    return os.urandom(16).hex()


def acceptable(value: bytes) -> bool:
    """A short printable token (see the module's doc); checked without a regex."""
    # translate() deleting every allowed byte leaves nothing only if all bytes were allowed.
    return 0 < len(value) <= MAX_LENGTH and not value.translate(None, _TOKEN_CHARS)


@dataclass(frozen=True)
class RequestIds:
    """The configured header and trust rule, shared by the proxy and the parse-time guard."""

    header: bytes  # lowercased, as ASGI header names are
    keep_untrusted: bool = False

    @classmethod
    def of(cls, config: RequestIdConfig) -> RequestIds:
        return cls(config.header.lower().encode("ascii"), config.keep_untrusted)

    def choose(self, headers: Iterable[tuple[bytes, bytes]], trusted: bool) -> str:
        """The exchange's id: the client's own when it may be kept, else a new one."""
        if not (trusted or self.keep_untrusted):
            return new_request_id()  # the client's is never used: no need to look for it
        sent: bytes | None = None
        name = self.header
        for field, value in headers:
            if field == name:
                if sent is not None:
                    return new_request_id()  # two ids: neither is the request's
                sent = value
        if sent is not None and acceptable(sent):
            return sent.decode("ascii")
        return new_request_id()

    def field(self, request_id: str) -> tuple[bytes, bytes]:
        """The header field that carries ``request_id``."""
        return self.header, request_id.encode("ascii")


def identify(
    exchange: Exchange,
    headers: list[tuple[bytes, bytes]],
    peer: str | None,
    http_version: str | None,
    *,
    trusted: TrustedNetworks,
    ids: RequestIds,
    known_id: str | None = None,
) -> None:
    """Fill in ``exchange``'s client facts and request id (``known_id`` when one was chosen
    for this request already)."""
    trusted_peer = bool(trusted) and peer_is_trusted(peer, trusted)
    exchange.peer_addr = exchange.client_addr = peer
    exchange.peer_trusted = trusted_peer
    if trusted_peer and peer is not None:
        exchange.client_addr = forwarded_client(headers, peer, trusted)
    agent = first_value(headers, b"user-agent")
    if agent is not None:
        exchange.user_agent = agent[:USER_AGENT_CHARS].decode("latin-1")
    exchange.http_version = http_version
    exchange.request_id = known_id or ids.choose(headers, trusted_peer)
