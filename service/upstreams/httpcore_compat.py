"""httpx's and httpcore's private names, used nowhere else (see ``service/compat.py``).

* ``AsyncHTTPTransport._pool``: httpx's transport over httpcore's pool, whose
  ``connections`` the pool snapshot counts idle ones of.
* The chain from an httpx response body to the HTTP/1.1 parser of its connection:
  httpx's stream ``_httpcore_stream`` -> httpcore's pool stream ``_stream`` -> the
  connection's stream ``_connection`` -> the connection's h11 state ``_h11_state``. Bytes
  past the end of a response are found there (httpcore_pool.py). Each link is followed with
  no default: a renamed one raises ``IncompatibleLibrary`` rather than switching that
  protection off.
* ``AsyncConnectionPool._ssl_context``: the context each new connection of the pool uses,
  swapped when an upstream's TLS files are rotated.
* ``URL._uri_reference``: the parsed components of an httpx URL (a named tuple). A request
  sent to one endpoint of many gets its URL with another host and port from it: parsing
  and validating a whole URL again costs about 15 times as much, per request.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpcore
import httpx

from ..compat import incompatible, require

CLASS_NAMES: dict[object, tuple[str, ...]] = {httpcore.AsyncConnectionPool: ("connections",)}
# The links of the chain above (tests/test_compat.py follows it on a real response).
RESPONSE_CHAIN = ("_httpcore_stream", "_stream", "_connection", "_h11_state")

require("httpcore", CLASS_NAMES)
if not hasattr(getattr(httpx.URL("http://relay/"), "_uri_reference", None), "_replace"):
    raise incompatible("httpx", "URL._uri_reference as a named tuple")


def url_at(url: httpx.URL, host: str, port: int) -> httpx.URL:
    """``url`` with ``host`` (an IP address or a name as httpx keeps it: lowercase, IPv6
    without brackets) and ``port``, not parsed again."""
    moved = httpx.URL.__new__(httpx.URL)
    moved._uri_reference = url._uri_reference._replace(host=host, port=port)
    return moved


def pool_connections(
    transport: httpx.AsyncHTTPTransport,
) -> list[httpcore.AsyncConnectionInterface]:
    pool = transport._pool
    if not isinstance(pool, httpcore.AsyncConnectionPool):
        raise incompatible("httpx", "AsyncHTTPTransport._pool as an httpcore.AsyncConnectionPool")
    return pool.connections


def set_pool_ssl_context(transport: httpx.AsyncHTTPTransport, context: ssl.SSLContext) -> None:
    """New connections of ``transport``'s pool use ``context``."""
    pool = transport._pool
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_ssl_context"):
        raise incompatible("httpcore", "AsyncConnectionPool._ssl_context")
    pool._ssl_context = context


def h11_state_of(stream: httpx.AsyncByteStream) -> Any:
    """The ``h11.Connection`` that parsed the response ``stream`` (from an HTTP/1.1
    connection of httpx's transport)."""
    link: Any = stream
    for name in RESPONSE_CHAIN:
        try:
            link = getattr(link, name)
        except AttributeError:
            owner = type(link).__qualname__
            raise incompatible("httpcore", f"{owner}.{name}") from None
    if not hasattr(link, "trailing_data") or not hasattr(link, "send_failed"):
        raise incompatible("h11", "Connection.trailing_data and send_failed")
    return link
