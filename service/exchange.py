"""The record of one proxied exchange, filled in by the proxy and read by observers.

Metrics, logs and spans all read the same record, so the status, reason, disconnect side
and phase, durations and byte counts they report are the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import FAILURES, Reason
from .session import Session

# Of a client's User-Agent, in logs: enough for any real one, bounded for a hostile one.
USER_AGENT_CHARS = 256


class Side(StrEnum):
    CLIENT = "client"
    UPSTREAM = "upstream"


class Phase(StrEnum):
    BEFORE_HEADERS = "before_headers"
    BODY = "body"
    SESSION = "session"  # a WebSocket session, after its 101


@dataclass
class Exchange:
    method: str
    route: str | None
    upstream: str | None
    path: str = ""
    route_prefix: str | None = None
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    reason: Reason | None = None
    disconnect_side: Side | None = None
    disconnect_phase: Phase | None = None
    headers_seconds: float | None = None
    total_seconds: float | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    response_started: bool = False
    response_complete: bool = False
    traced: bool = False  # its outcome is on the server span already
    request_id: str | None = None
    peer_addr: str | None = None  # the connection's peer
    peer_trusted: bool = False  # in server.trusted_proxies
    client_addr: str | None = None  # the peer, or the client a trusted peer forwarded for
    user_agent: str | None = None  # at most USER_AGENT_CHARS
    http_version: str | None = None  # "1.1", "1.0"
    upstream_status: int | None = None  # the status the upstream answered with, if it did
    retries: int = 0  # attempts sent again under the route's retry policy
    retry_reason: str | None = None  # why the latest was (a reason of relay_upstream_retries)
    upstream_addr: str | None = None  # the endpoint (host:port) the request went to
    websocket: Session | None = None  # a WebSocket handshake, and its session if one opened

    def mark_headers(self) -> None:
        self.headers_seconds = time.perf_counter() - self.started

    def mark_done(self) -> None:
        self.total_seconds = time.perf_counter() - self.started

    def fail(self, reason: Reason) -> None:
        """The proxy answers with its own error for ``reason``; a cause found earlier (a
        reset, say) stays the exchange's reason."""
        self.reason = self.reason or reason
        self.status = FAILURES[reason].status

    def disconnected(self, side: Side) -> None:
        # Once the last body message is handed to the server, ASGI servers answer
        # ``receive`` with ``http.disconnect``: that is the end of the exchange, not a
        # client hanging up.
        if self.disconnect_side is None and not self.response_complete:
            self.disconnect_side = side
            self.disconnect_phase = Phase.BODY if self.response_started else Phase.BEFORE_HEADERS

    @property
    def truncated(self) -> bool:
        """The status line went out but the body was cut short, not by the client."""
        return (
            self.response_started
            and not self.response_complete
            and self.disconnect_side is not Side.CLIENT
        )

    @property
    def failed(self) -> bool:
        """A failure for the availability SLI: a 5xx the client did not walk away from, or a
        truncated response. Counted once, whichever both are."""
        if self.truncated:
            return True
        return (
            self.status is not None
            and self.status >= 500
            and self.disconnect_side is not Side.CLIENT
        )

    @property
    def upstream_status_if_changed(self) -> int | None:
        """The upstream's status when the client did not get that response as sent: Relay
        answered another status (an invalid upstream status), or cut its body short."""
        upstream = self.upstream_status
        if upstream is not None and (upstream != self.status or self.truncated):
            return upstream
        return None

    @property
    def outcome(self) -> str:
        """One word for logs: ok, the failure reason, or who hung up. ``ok`` only for an
        exchange whose response was sent in full; one that ended otherwise without a known
        cause is ``incomplete``."""
        if self.disconnect_side is Side.CLIENT:
            return "client_disconnect"
        if self.reason is not None:
            return self.reason.value
        return "ok" if self.response_complete else "incomplete"


# Shared by routing and the server span: one reading of the request's host.
def bare_host(host: str | None) -> str | None:
    """A Host value without its port, lowercased (IPv6 literals keep their brackets)."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class ExchangeObserver:
    """Told of each exchange's events; each does nothing unless a subclass overrides it."""

    def started(self, exchange: Exchange) -> None:
        """The exchange began (its route and upstream are known)."""

    def headers(self, exchange: Exchange) -> None:
        """The upstream's response headers arrived."""

    def failing(self, exchange: Exchange) -> None:
        """The proxy is about to answer with an error of its own (status and reason set)."""

    def retrying(self, exchange: Exchange) -> None:
        """An attempt failed and is sent again (``retries`` and ``retry_reason`` set)."""

    def retry_denied(self, exchange: Exchange) -> None:
        """An attempt failed and would be sent again, but the retry budget is spent."""

    def upgraded(self, exchange: Exchange) -> None:
        """A WebSocket session opened: the client got the upstream's 101."""

    def finished(self, exchange: Exchange) -> None:
        """The exchange ended, whichever way."""


_EVENTS = ("started", "headers", "failing", "retrying", "retry_denied", "upgraded", "finished")


def _each(hooks: tuple[Callable[[Exchange], None], ...]) -> Callable[[Exchange], None]:
    def fan_out(exchange: Exchange) -> None:
        for hook in hooks:
            hook(exchange)

    return fan_out


class Observers(ExchangeObserver):
    """Fans each event out to every observer (access log, metrics, spans) in order, calling
    only the observers that override it."""

    def __init__(self, observers: Sequence[ExchangeObserver]) -> None:
        self.observers = tuple(observers)
        for event in _EVENTS:
            default = getattr(ExchangeObserver, event)
            hooks = tuple(
                getattr(o, event) for o in self.observers if getattr(type(o), event) is not default
            )
            setattr(self, event, _each(hooks))


def report_refused(observer: ExchangeObserver, exchange: Exchange, reason: Reason) -> None:
    """The events of an exchange refused before any application saw it, in the order the
    proxy's own error answers produce them: started, failing, finished."""
    observer.started(exchange)
    exchange.fail(reason)
    observer.failing(exchange)
    exchange.response_started = exchange.response_complete = True
    exchange.mark_done()
    observer.finished(exchange)
