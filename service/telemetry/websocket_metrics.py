"""WebSocket session metrics: open sessions, sessions by result, messages and bytes by
direction, and session durations. Part of ``metrics.Metrics``, which owns the registry; the
labels come from the config and from closed sets (``session.SessionResult``,
``session.Direction``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from ..exchange import Exchange
from ..session import Direction, SessionResult
from .names import UPSTREAM, UPSTREAM_ROUTE
from .zeros import ZeroSeries

DIRECTION_LABELS = ["upstream", "direction"]
SESSION_LABELS = ["upstream", "route", "result"]
# 100 ms to a day: a session lives from a single exchange to a long-lived subscription.
SESSION_BUCKETS = (
    0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
)  # fmt: skip

CounterMaker = Callable[[str, str, list[str]], Counter]
GaugeMaker = Callable[[str, str, list[str]], Gauge]
HistogramMaker = Callable[[str, str, list[str], Sequence[float]], Histogram]


class SessionMetrics:
    """The ``relay_websocket_*`` families, and the events that move them."""

    def __init__(self, counter: CounterMaker, gauge: GaugeMaker, histogram: HistogramMaker) -> None:
        # Not relay_websocket_sessions: that is the family of the counter below (its
        # samples are relay_websocket_sessions_total), and a family has one type.
        self.sessions = gauge("websocket_sessions_active", "WebSocket sessions open now.", UPSTREAM)
        self.sessions_total = counter(
            "websocket_sessions",
            "WebSocket handshakes that reached the upstream, by how the session ended: "
            "client_closed, upstream_closed, idle, too_large, drain, upstream_refused, error.",
            SESSION_LABELS,
        )
        self.messages = counter(
            "websocket_messages",
            "WebSocket messages relayed, by direction (to_upstream, to_client).",
            DIRECTION_LABELS,
        )
        self.bytes = counter(
            "websocket_bytes",
            "WebSocket message payload bytes relayed, by direction (to_upstream, to_client).",
            DIRECTION_LABELS,
        )
        self.duration = histogram(
            "websocket_session_duration_seconds",
            "Time from the client's 101 to the end of the session.",
            UPSTREAM_ROUTE,
            SESSION_BUCKETS,
        )
        self._children: dict[tuple[str, Direction], tuple[Counter, Counter]] = {}

    def start_at_zero(
        self, zeros: ZeroSeries, upstreams: Sequence[str], routes: Iterable[tuple[str, str]]
    ) -> None:
        """Per upstream: open sessions, messages and bytes each way; per route that proxies
        WebSockets: sessions by result."""
        zeros.add(self.sessions, UPSTREAM, [(u,) for u in upstreams])
        pairs = [(u, d.value) for u in upstreams for d in Direction]
        zeros.add(self.messages, DIRECTION_LABELS, pairs)
        zeros.add(self.bytes, DIRECTION_LABELS, pairs)
        results = [(u, r, result.value) for u, r in routes for result in SessionResult]
        zeros.add(self.sessions_total, SESSION_LABELS, results)

    def message(self, upstream: str, direction: Direction, size: int) -> None:
        children = self._children.get((upstream, direction))
        if children is None:
            children = self._children[(upstream, direction)] = (
                self.messages.labels(upstream, direction.value),
                self.bytes.labels(upstream, direction.value),
            )
        children[0].inc()
        children[1].inc(size)

    def upgraded(self, exchange: Exchange) -> None:
        if exchange.upstream is not None:
            self.sessions.labels(exchange.upstream).inc()

    def finished(self, exchange: Exchange, route: str) -> None:
        session = exchange.websocket
        upstream = exchange.upstream
        if session is None or upstream is None:
            return
        if session.opened:
            self.sessions.labels(upstream).dec()
            if session.seconds is not None:
                self.duration.labels(upstream, route).observe(session.seconds)
        if session.result is not None:
            self.sessions_total.labels(upstream, route, session.result.value).inc()
