"""The one vocabulary of proxy failures, shared by responses, metrics, logs and spans.

Every upstream failure is reduced to a bounded ``reason`` string. The reason decides the
downstream status, the RFC 9209 ``Proxy-Status`` error type, the metric label and the span
status, so the four can never disagree.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from email.utils import formatdate
from enum import StrEnum
from http import HTTPStatus

import httpx


class Reason(StrEnum):
    CONNECT = "connect"
    CONNECT_TIMEOUT = "connect_timeout"
    READ_TIMEOUT = "read_timeout"
    WRITE_TIMEOUT = "write_timeout"
    TOTAL_TIMEOUT = "total_timeout"
    POOL_TIMEOUT = "pool_timeout"
    PROTOCOL = "protocol"
    TLS = "tls"
    RESET = "reset"
    NO_ROUTE = "no_route"
    BAD_REQUEST = "bad_request"
    URI_TOO_LONG = "uri_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    INTERNAL = "internal"
    SHUTDOWN = "shutdown"
    OVERLOADED = "overloaded"
    REQUEST_TIMEOUT = "request_timeout"
    NO_HEALTHY_ENDPOINT = "no_healthy_endpoint"
    WEBSOCKET_DISABLED = "websocket_disabled"


@dataclass(frozen=True)
class Failure:
    status: int
    proxy_status_error: str  # RFC 9209 section 2.3 error type
    text: str


FAILURES: dict[Reason, Failure] = {
    Reason.CONNECT: Failure(502, "connection_refused", "upstream connection failed"),
    Reason.CONNECT_TIMEOUT: Failure(504, "connection_timeout", "upstream connect timed out"),
    Reason.READ_TIMEOUT: Failure(504, "connection_read_timeout", "upstream response timed out"),
    Reason.WRITE_TIMEOUT: Failure(504, "connection_write_timeout", "upstream write timed out"),
    # The route's timeouts.total ran out (before the response headers: 504; after: cut).
    Reason.TOTAL_TIMEOUT: Failure(
        504, "http_response_timeout", "upstream exchange exceeded the route's total timeout"
    ),
    Reason.POOL_TIMEOUT: Failure(
        503, "connection_limit_reached", "no upstream connection available"
    ),
    Reason.PROTOCOL: Failure(502, "http_protocol_error", "invalid upstream response"),
    # Proxy-Status says which: tls_certificate_error (the certificate was not accepted, by
    # either side) or tls_protocol_error (tls_error_type).
    Reason.TLS: Failure(502, "tls_certificate_error", "upstream TLS handshake failed"),
    Reason.RESET: Failure(502, "connection_terminated", "upstream closed the connection"),
    Reason.NO_ROUTE: Failure(404, "destination_not_found", "no route for this request"),
    Reason.BAD_REQUEST: Failure(400, "http_request_error", "malformed request"),
    Reason.URI_TOO_LONG: Failure(
        414, "http_request_denied", "request target exceeds limits.max_request_target_bytes"
    ),
    Reason.HEADERS_TOO_LARGE: Failure(
        431, "http_request_denied", "request header fields exceed limits.max_header_bytes"
    ),
    Reason.BODY_TOO_LARGE: Failure(
        413, "http_request_denied", "request body exceeds limits.max_body_bytes"
    ),
    Reason.REQUEST_TIMEOUT: Failure(
        408, "http_request_error", "request head not received within the time allowed"
    ),
    Reason.INTERNAL: Failure(502, "proxy_internal_error", "proxy internal error"),
    # Still in flight when the drain's grace period ran out (or a second stop signal came).
    Reason.SHUTDOWN: Failure(
        503, "proxy_internal_error", "proxy shut down before the request completed"
    ),
    # Refused at once: the worker already holds server.limit_concurrency connections or
    # requests. Answered by the proxy itself, without contacting the upstream.
    Reason.OVERLOADED: Failure(
        503, "proxy_internal_response", "proxy at its limit of concurrent requests"
    ),
    # Every endpoint of the upstream is ejected, failing its health check or draining.
    Reason.NO_HEALTHY_ENDPOINT: Failure(
        503, "destination_unavailable", "no healthy upstream endpoint"
    ),
    # A WebSocket upgrade on a route with websocket: false.
    Reason.WEBSOCKET_DISABLED: Failure(
        403, "http_request_denied", "WebSocket upgrades are not proxied on this route"
    ),
}


# Refusals of the client's request: not upstream failures, whichever route they came by.
CLIENT_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.NO_ROUTE,
        Reason.BAD_REQUEST,
        Reason.URI_TOO_LONG,
        Reason.HEADERS_TOO_LARGE,
        Reason.BODY_TOO_LARGE,
        Reason.REQUEST_TIMEOUT,
        Reason.WEBSOCKET_DISABLED,
    }
)


# What sending a request upstream may raise: httpx's errors, and the ssl module's own for a
# TLS alert httpcore lets through after the handshake (the upstream refusing our client
# certificate under TLS 1.3, say).
UPSTREAM_ERRORS = (httpx.HTTPError, ssl.SSLError)


class StaleConnectionError(httpx.RemoteProtocolError):
    """A reused keep-alive connection was closed by the upstream before any response byte.

    Raised by the transports so the retry policy can tell this race (safe to retry for an
    idempotent, bodiless request) from a fresh connection being reset (not retried).
    """


class NoHealthyEndpoint(httpx.TransportError):
    """The upstream has no endpoint a request may go to: answered 503 at once."""


class BodyTooLarge(Exception):
    """The request body grew past ``limits.max_body_bytes`` while it was being forwarded."""


def ssl_error_of(exc: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind ``exc``: both transports raise the httpx exception from the
    pool's, itself from the ``ssl`` module's (bounded: chains are a few links long). A
    connection that ended inside TLS (EOF, close_notify) is not one: that is a reset."""
    link: BaseException | None = exc
    for _ in range(8):
        if link is None:
            return None
        if isinstance(link, ssl.SSLError):
            ended = isinstance(link, ssl.SSLEOFError | ssl.SSLZeroReturnError)
            reason = getattr(link, "reason", None)  # set when OpenSSL raised it
            return None if ended or reason == "UNEXPECTED_EOF_WHILE_READING" else link
        link = link.__cause__ or link.__context__
    return None


# OpenSSL's reasons for a certificate refused by the peer (an alert) rather than by us.
_CERTIFICATE_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")


def tls_error_type(exc: BaseException) -> str:
    """The Proxy-Status error of a TLS failure: a certificate that was not accepted (ours by
    the upstream, or the upstream's by us: unknown CA, name mismatch, expired) or any other
    handshake or protocol failure."""
    error = ssl_error_of(exc)
    if isinstance(error, ssl.SSLCertVerificationError):
        return "tls_certificate_error"
    reason = str(getattr(error, "reason", None) or "")
    if any(word in reason for word in _CERTIFICATE_ALERTS):
        return "tls_certificate_error"
    return "tls_protocol_error"


def classify(exc: BaseException) -> Reason:
    """Map an httpx exception (from either transport) to its reason."""
    if (
        isinstance(exc, httpx.TransportError | ssl.SSLError)
        and not isinstance(exc, StaleConnectionError)
        and ssl_error_of(exc) is not None
    ):
        return Reason.TLS
    if isinstance(exc, ssl.SSLError):
        return Reason.RESET  # the connection ended inside TLS
    if isinstance(exc, httpx.PoolTimeout):
        return Reason.POOL_TIMEOUT
    if isinstance(exc, NoHealthyEndpoint):
        return Reason.NO_HEALTHY_ENDPOINT
    if isinstance(exc, httpx.ConnectTimeout):
        return Reason.CONNECT_TIMEOUT
    if isinstance(exc, httpx.ReadTimeout):
        return Reason.READ_TIMEOUT
    if isinstance(exc, httpx.WriteTimeout):
        return Reason.WRITE_TIMEOUT
    if isinstance(exc, httpx.ConnectError):
        return Reason.CONNECT
    if isinstance(
        exc, StaleConnectionError | httpx.ReadError | httpx.WriteError | httpx.CloseError
    ):
        return Reason.RESET
    if isinstance(exc, httpx.RemoteProtocolError):
        # httpcore reports an upstream that hung up between messages this way.
        text = str(exc).lower()
        return Reason.RESET if "disconnected" in text or "peer closed" in text else Reason.PROTOCOL
    if isinstance(exc, httpx.TransportError):
        return Reason.PROTOCOL
    return Reason.INTERNAL


def proxy_status(
    server_name: str, reason: Reason, upstream: str | None, error: str | None = None
) -> str:
    """An RFC 9209 ``Proxy-Status`` field value naming this proxy, the error and the hop;
    ``error`` replaces the reason's own error type (tls: which TLS failure)."""
    value = f"{server_name}; error={error or FAILURES[reason].proxy_status_error}"
    if upstream is not None:
        value += f'; next-hop="{upstream}"'
    return value


# Answers that tell the client to come back: the pool or the worker is full for now.
RETRY_LATER: frozenset[Reason] = frozenset(
    {Reason.POOL_TIMEOUT, Reason.OVERLOADED, Reason.NO_HEALTHY_ENDPOINT}
)
# Answers after which the connection closes. Too large: the rest of the body stays unread, so
# the connection cannot carry another request. Overloaded: a connection fewer is what the
# worker needs.
CLOSE_AFTER: frozenset[Reason] = frozenset({Reason.BODY_TOO_LARGE, Reason.OVERLOADED})


@dataclass(frozen=True)
class ErrorResponse:
    """The proxy's own answer to a failure: plain text naming it, ``Proxy-Status``, no-store."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def wire(self, *, head_only: bool = False) -> bytes:
        """As HTTP/1.1 bytes, for a connection no ASGI application is serving."""
        lines = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}".encode()]
        lines += [name + b": " + value for name, value in self.headers]
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        return head if head_only else head + self.body


def error_response(
    reason: Reason,
    *,
    server_name: str,
    upstream: str | None = None,
    text: str | None = None,
    retry_after_seconds: int | None = None,
    close: bool = False,
    request_id: tuple[bytes, bytes] | None = None,
    error: str | None = None,
) -> ErrorResponse:
    """The answer for ``reason``, served by the proxy (ASGI) and the parse-time guard (raw
    bytes) alike. ``text`` replaces the reason's own; ``close``: the connection closes after
    it whatever the reason; ``request_id``: the exchange's request id field; ``error``: the
    Proxy-Status error type, if not the reason's."""
    failure = FAILURES[reason]
    phrase = HTTPStatus(failure.status).phrase
    body = f"{failure.status} {phrase}: {text or failure.text}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"proxy-status", proxy_status(server_name, reason, upstream, error).encode()),
        (b"cache-control", b"no-store"),
        (b"date", formatdate(usegmt=True).encode()),
    ]
    if retry_after_seconds is not None and reason in RETRY_LATER:
        headers.append((b"retry-after", str(retry_after_seconds).encode()))
    if close or reason in CLOSE_AFTER:
        headers.append((b"connection", b"close"))
    if request_id is not None:
        headers.append(request_id)
    return ErrorResponse(failure.status, headers, body)
