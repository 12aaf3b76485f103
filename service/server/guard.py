"""Hostile input, refused while it is parsed: sizes, request-target form, Host and framing.

uvicorn's httptools protocol with checks in its parser callbacks. llhttp (strict: no
leniencies besides data after ``Connection: close``) already refuses most smuggling shapes:
Content-Length together with Transfer-Encoding, repeated or malformed Content-Length, a
final coding other than chunked, obs-fold, whitespace before the colon, bare CR or LF,
bad chunk sizes and extensions. What it lets through is refused here: other codings before
chunked, Transfer-Encoding outside HTTP/1.1, HTTP/0.9 and 2.0 request lines, CONNECT,
targets not in origin form, missing, repeated or odd Host fields, paths the upstream could resolve
differently (see ``head_checks.path_problem``), and a body under an Upgrade the parser would
not read. The limits are counted as the bytes arrive, so an endless request line or header
section costs at most the limit plus one read, never unbounded memory.

A refused request never reaches the application, so nothing goes upstream: ASGI tasks for
requests parsed from one read start only once that whole read parsed cleanly. The answer
is the proxy's own error response (plain text naming the limit, ``Proxy-Status``), then
the connection closes; it is counted and logged like any other exchange with no route.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httptools
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from ..config import LimitsConfig, RequestIdConfig
from ..errors import Reason, error_response
from ..exchange import Exchange, ExchangeObserver, report_refused
from ..headers import TrustedNetworks
from ..request_ids import REQUEST_ID_KEY, RequestIds, identify
from .head_checks import Rejection, check_head, routing_path
from .uvicorn_compat import UvicornProtocol, service_unavailable

_LOGGED_PATH_BYTES = 256  # of a refused target, in the access log
_TOO_MANY_FIELDS = "request header fields exceed limits.max_header_count"
_LINGER_SECONDS = 2.0  # after a refusal, how long what the client still sends is discarded


def stall_budget_for(limits: LimitsConfig) -> int:
    return (
        limits.max_request_target_bytes
        + limits.max_header_bytes
        + 4 * limits.max_header_count  # ": " and CRLF per field
        + 4096  # request line, optional whitespace
    )


class _Refused(Exception):
    """Raised from a parser callback: stops llhttp at once."""


Task = tuple[RequestResponseCycle, Any]


class Guard(UvicornProtocol):
    """The checks, run in the parser's callbacks (a mixin of ``protocol.RelayProtocol``,
    which sets the class attributes below from the settings)."""

    limits: ClassVar[LimitsConfig] = LimitsConfig()
    server_name: ClassVar[str] = "relay"
    observer: ClassVar[ExchangeObserver | None] = None
    # Answers requests over server.limit_concurrency in place of uvicorn's bare 503.
    overloaded: ClassVar[ASGIApp | None] = None
    # Bytes a head (or a chunk line and trailer section) may take without the parser
    # moving on: beyond it no request could still be within the limits.
    stall_budget: ClassVar[int] = stall_budget_for(LimitsConfig())
    trusted: ClassVar[TrustedNetworks] = ()
    request_ids: ClassVar[RequestIds] = RequestIds.of(RequestIdConfig())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url = b""
        self._in_head = False
        self._message_open = False
        self._header_bytes = 0
        self._header_count = 0
        self._progress = False
        self._stalled = 0
        self._feeding = False
        self._deferred: list[Task] = []
        self._rejection: Rejection | None = None
        self._refused = False

    # -- reading -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the connection is closing; the parser has stopped
        self.unset_keepalive_if_required()
        self._progress = False
        self._feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._feeding = False
            self._start_deferred()
            if self.should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self.unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._feeding = False
            self._refuse(self._rejection or Rejection(Reason.BAD_REQUEST))
            return
        self._feeding = False
        self._start_deferred()
        if self._message_open and not self._progress:
            self._stalled += len(data)
            if self._stalled > self.stall_budget:
                if self._in_head:
                    self._refuse(Rejection(Reason.HEADERS_TOO_LARGE))
                else:
                    self._refuse(Rejection(Reason.BAD_REQUEST, "oversized chunk line or trailer"))
        else:
            self._stalled = 0

    def start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if app is service_unavailable:
            app = self._overload_answer(app)
        if self._feeding:
            self._deferred.append((cycle, app))
        else:
            self.run_asgi_task(cycle, app)

    def _overload_answer(self, default: Any) -> Any:
        # Read from the class: a function stored there must not be bound to the protocol.
        return type(self).overloaded or default

    def _start_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for cycle, app in deferred:
            self.run_asgi_task(cycle, app)

    # -- parser callbacks (the hot path: keep them to a few comparisons) -----------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._message_open = self._progress = True
        self._header_bytes = self._header_count = 0
        self._rejection = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_target_bytes:
            raise self._refusal(Rejection(Reason.URI_TOO_LONG))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.limits.max_header_bytes:
            raise self._refusal(Rejection(Reason.HEADERS_TOO_LARGE))
        if self._header_count > self.limits.max_header_count:
            raise self._refusal(Rejection(Reason.HEADERS_TOO_LARGE, instead=_TOO_MANY_FIELDS))
        # uvicorn's on_header, inlined: this runs once per field.
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._progress = True
        rejection = self._check_head()
        if rejection is not None:
            raise self._refusal(rejection)
        super().on_headers_complete()
        if self.pipeline and self.pipeline[0][1] is service_unavailable:
            cycle, app = self.pipeline[0]
            self.pipeline[0] = (cycle, self._overload_answer(app))
        raw_path: bytes | None = self.scope.get("raw_path")
        if raw_path is not None and self.limits.allow_encoded_slashes and b"%" in raw_path:
            # The ASGI task has not run yet (tasks start after this read is parsed), so
            # the path the router sees can still be set: encoded slashes stay data.
            self.scope["path"] = routing_path(raw_path)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._message_open = False
        self._progress = True
        super().on_message_complete()

    def _refusal(self, rejection: Rejection) -> _Refused:
        self._rejection = rejection
        return _Refused(rejection.reason)

    def _check_head(self) -> Rejection | None:
        upgrade: bool = self.parser.should_upgrade()
        return check_head(
            self.url,
            self.parser.get_method(),
            self.parser.get_http_version(),
            self.headers,
            self.limits,
            upgrade=upgrade,
            upgrade_accepted=upgrade and self.should_upgrade(),
        )

    # -- refusing ------------------------------------------------------------------------
    def _refuse(self, rejection: Rejection) -> None:
        """Answer (when the answer can be the next response on this connection) and close.

        ``own`` is the cycle of the message being parsed, if its head was complete.
        """
        self._refused = True
        deferred, self._deferred = self._deferred, []
        cycle: RequestResponseCycle | None = self.cycle
        own = cycle if cycle is not None and cycle.scope is self.scope else None
        own_deferred = own is not None and any(c is own for c, _ in deferred)
        earlier_pending = any(c is not own for c, _ in deferred) or (
            any(c is own for c, _ in self.pipeline)
            if own is not None
            else cycle is not None and not cycle.response_complete
        )
        running = None if own_deferred else (own or cycle)
        if running is not None and not running.response_complete:
            # Its task runs: it sees the client go, and ends (and counts) the exchange.
            running.disconnected = True
            running.message_event.set()
        if earlier_pending:
            # A response to an earlier request is still owed: any answer now would be
            # taken for that one. Drop the connection instead.
            self.transport.close()
            return
        if own is not None and not own_deferred:
            if own.response_started:
                self.transport.close()
            else:
                exchange = self._exchange(own.scope["method"], own.scope["path"], own.scope)
                self._write_error(rejection, exchange)
                self._close_lingering()
            return
        if own is not None:
            exchange = self._exchange(own.scope["method"], own.scope["path"], own.scope)
        else:
            path = self.url.split(b"?", 1)[0][:_LOGGED_PATH_BYTES].decode("latin-1")
            exchange = self._exchange(self._method(), path, None)
        self._write_error(rejection, exchange)
        self._close_lingering()
        if self.observer is not None:
            report_refused(self.observer, exchange, rejection.reason)

    def _close_lingering(self) -> None:
        """Half-close, then discard what the client still sends for a moment: closing with
        unread bytes makes the kernel reset the connection, and a reset can destroy the
        answer before the client has read it (nginx's lingering close)."""
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.flow.resume_reading()
        # The client's own close ends it sooner (eof_received closes the transport).
        self.loop.call_later(_LINGER_SECONDS, transport.close)

    def _method(self) -> str:
        # llhttp knows the method once the target has begun (its default would read as
        # DELETE before that).
        return str(self.parser.get_method().decode("ascii")) if self.url else "-"

    def _exchange(self, method: str, path: str, scope: Any) -> Exchange:
        """The refused exchange's record, with its client and request id (the one the proxy
        chose already when the request reached it)."""
        exchange = Exchange(method=method, route=None, upstream=None, path=path)
        headers = scope["headers"] if scope is not None else self.headers or []
        version = scope["http_version"] if scope is not None else self._http_version()
        identify(
            exchange,
            headers,
            self.client[0] if self.client else None,
            version,
            trusted=self.trusted,
            ids=self.request_ids,
            known_id=scope.get(REQUEST_ID_KEY) if scope is not None else None,
        )
        if scope is not None:
            scope[REQUEST_ID_KEY] = exchange.request_id
        return exchange

    def _http_version(self) -> str | None:
        # Known once the request line was parsed (llhttp says 0.0 before it).
        version = str(self.parser.get_http_version())
        return None if version == "0.0" else version

    def _write_error(self, rejection: Rejection, exchange: Exchange) -> None:
        assert exchange.request_id is not None
        response = error_response(
            rejection.reason,
            server_name=self.server_name,
            text=rejection.text,
            close=True,
            request_id=self.request_ids.field(exchange.request_id),
        )
        self.transport.write(response.wire(head_only=exchange.method == "HEAD"))
