"""A WebSocket session's upstream side: where it connects (the seam endpoint selection
plugs into), the handshake request's headers, and the opening handshake itself with its
failures reduced to the proxy's reasons.

The client is the ``websockets`` package's asyncio connection (a dependency of uvicorn's
standard extra, whose server side the proxy listener already runs): it reads a refused
handshake's body, which the client has to get as sent, and lets the proxy hand it a
connected socket, so connect and handshake time out and fail separately.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

from starlette.types import Scope
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidMessage, InvalidStatus
from websockets.http11 import Response

from .config import RouteConfig
from .errors import Reason, ssl_error_of, tls_error_type
from .headers import RawHeaders
from .routing import rewrite_path
from .upstreams.pools import Upstream
from .upstreams.tls import server_name

# Fields of the handshake each hop negotiates for itself: the client library writes its own
# key, version, extensions and subprotocol offer (from the client's) upstream, and uvicorn
# writes its own accept, extensions and chosen subprotocol (the upstream's) downstream.
HANDSHAKE_FIELDS: frozenset[bytes] = frozenset(
    {
        b"host",
        b"content-length",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
# Sent by the proxy when it closes the upstream side: the close handshake's wait.
CLOSE_TIMEOUT_SECONDS = 5.0
# Keepalive pings to the upstream (answered pongs prove it is there): as uvicorn's own
# towards clients.
PING_INTERVAL_SECONDS = 20.0


@dataclass(frozen=True)
class Target:
    """Where a session's upstream connection goes: ``url`` gives the Host field, the path
    and the TLS name; ``host`` and ``port`` the TCP destination."""

    url: str
    host: str
    port: int


def websocket_target(upstream: Upstream, route: RouteConfig, scope: Scope) -> Target:
    """The upstream URL of a WebSocket request: the upstream's scheme (http -> ws,
    https -> wss) and authority (or the client's Host with ``preserve_host``), its base
    path and the route's rewrite, as for HTTP. One function, so that endpoint selection
    chooses ``host`` and ``port`` here. Raises ``HandshakeFailed`` when the upstream has
    endpoints and none is healthy."""
    url = upstream.base_url
    scheme = "wss" if url.scheme == "https" else "ws"
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    target = upstream.base_path + rewrite_path(route, raw_path.split(b"?", 1)[0])
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    authority = upstream.authority
    if upstream.config.preserve_host:
        host = dict(scope["headers"]).get(b"host")
        authority = host or authority
    host, port = url.host, url.port or (443 if url.scheme == "https" else 80)
    if upstream.balancer is not None:
        # An upstream of many endpoints: the session goes where a request would.
        endpoint = upstream.balancer.choose()
        if endpoint is None:
            raise HandshakeFailed(Reason.NO_HEALTHY_ENDPOINT)
        host, port = endpoint.host, endpoint.port
    return Target(f"{scheme}://{authority.decode('latin-1')}{target.decode('latin-1')}", host, port)


def handshake_headers(headers: RawHeaders) -> list[tuple[str, str]]:
    """The forwarded request fields (``headers.upstream_request_headers``'s result) minus the
    ones the client library writes itself."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name not in HANDSHAKE_FIELDS
    ]


def response_fields(response: Response) -> RawHeaders:
    return [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers.raw_items()
    ]


class Refused(Exception):
    """The upstream answered the handshake with a status other than 101."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"upstream refused the WebSocket handshake: {response.status_code}")
        self.response = response


class HandshakeFailed(Exception):
    """The upstream could not be reached or did not complete the handshake."""

    def __init__(self, reason: Reason, error: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.error = error  # the Proxy-Status error type, if not the reason's


async def _connected_socket(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


async def open_upstream(
    upstream: Upstream,
    target: Target,
    headers: list[tuple[str, str]],
    subprotocols: list[str],
    max_message_bytes: int,
) -> ClientConnection:
    """The upstream's accepted connection. Raises ``Refused`` with the upstream's answer, or
    ``HandshakeFailed`` with the reason: connect and connect_timeout (TCP, with
    ``timeouts.connect``), then tls, read_timeout (the rest of the handshake, with
    ``timeouts.read``), reset or protocol."""
    timeouts = upstream.config.timeouts
    try:
        sock = await asyncio.wait_for(_connected_socket(target.host, target.port), timeouts.connect)
    except TimeoutError:
        raise HandshakeFailed(Reason.CONNECT_TIMEOUT) from None
    except OSError:
        raise HandshakeFailed(Reason.CONNECT) from None
    secure = target.url.startswith("wss:")
    tls: dict[str, object] = {}
    if secure:
        tls = {
            "ssl": upstream.tls.context,
            # The URL's name, whichever endpoint address the session connects to.
            "server_hostname": server_name(upstream.config) or upstream.base_url.host,
        }
    try:
        return await connect(
            target.url,
            sock=sock,
            additional_headers=headers,
            user_agent_header=None,
            subprotocols=subprotocols or None,  # type: ignore[arg-type]
            compression=None,
            proxy=None,
            open_timeout=timeouts.read,
            ping_interval=PING_INTERVAL_SECONDS,
            close_timeout=CLOSE_TIMEOUT_SECONDS,
            max_size=max_message_bytes,
            **tls,  # type: ignore[arg-type]
        )
    except InvalidStatus as exc:
        raise Refused(exc.response) from None
    except TimeoutError:
        sock.close()
        raise HandshakeFailed(Reason.READ_TIMEOUT) from None
    except asyncio.CancelledError:
        sock.close()  # the drain cut the handshake short
        raise
    except (ssl.SSLError, OSError, InvalidHandshake) as exc:
        sock.close()
        if ssl_error_of(exc) is not None:
            raise HandshakeFailed(Reason.TLS, tls_error_type(exc)) from None
        if isinstance(exc, InvalidMessage | OSError):
            # The upstream closed or reset the connection before a complete answer.
            raise HandshakeFailed(Reason.RESET) from None
        raise HandshakeFailed(Reason.PROTOCOL) from None
