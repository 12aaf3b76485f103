"""The proxy's ASGI application: match a route, open the exchange record, and hand the
request to a ``forwarding.Forwarding``; requests with no route, over the concurrency limit or
cut at shutdown are answered here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from .config import RouteConfig, Settings
from .errors import Reason
from .exchange import Exchange, ExchangeObserver, Side
from .forwarding import Forwarding, ProxyHop
from .headers import first_value
from .request_ids import REQUEST_ID_KEY, identify
from .route_policy import RoutePolicies, RoutePolicy
from .routing import Router
from .session import SessionResult
from .upstreams.pools import UpstreamSet
from .websocket import MessageMeter, NoMeter, SessionGate, WebSocketRelay, http_messages

log = logging.getLogger("relay.proxy")


class Proxy:
    """The ASGI application that serves every proxied path."""

    def __init__(
        self,
        settings: Settings,
        upstreams: Callable[[], UpstreamSet],
        observer: ExchangeObserver,
        meter: MessageMeter | None = None,
    ) -> None:
        """``meter``: told of every WebSocket message relayed."""
        self._router = Router(settings.routes)
        self._policies = RoutePolicies(settings.routes, settings.upstreams)
        self._upstreams = upstreams
        self._observer = observer
        self._hop = ProxyHop.of(settings, observer)
        self._websocket = settings.websocket
        self._sessions = SessionGate(settings.websocket.max_sessions_per_upstream)
        self._meter = meter or NoMeter()

    @property
    def open_sessions(self) -> int:
        """WebSocket sessions open (or opening) in this worker."""
        return sum(self._sessions.open.values())

    def _begin(self, scope: Scope) -> tuple[RouteConfig | None, Exchange]:
        """Route the request and open its exchange record."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw_host = first_value(headers, b"host")
        host = raw_host.decode("latin-1") if raw_host is not None else None
        # Paths with dot segments (raw or encoded) never get here: the parsing stage refuses
        # them (server.head_checks.path_problem), as the upstream could resolve them outside
        # the route.
        route = self._router.match(host, scope["path"])
        exchange = Exchange(
            method=scope.get("method", "GET"),  # a WebSocket scope has none: its GET
            route=route.label if route else None,
            upstream=route.upstream if route else None,
            path=scope["path"],
            route_prefix=route.prefix if route else None,
        )
        self._identify(scope, headers, exchange)
        self._observer.started(exchange)
        return route, exchange

    def _identify(
        self, scope: Scope, headers: list[tuple[bytes, bytes]], exchange: Exchange
    ) -> None:
        """Who sent the request, and its request id, which stays in the scope: the
        parse-time guard answers with it if it refuses the rest of this request."""
        client = scope.get("client")
        hop = self._hop
        identify(
            exchange,
            headers,
            client[0] if client else None,
            scope.get("http_version", "1.1"),
            trusted=hop.trusted,
            ids=hop.request_ids,
            known_id=scope.get(REQUEST_ID_KEY),
        )
        scope[REQUEST_ID_KEY] = exchange.request_id

    def _end(self, exchange: Exchange) -> None:
        exchange.mark_done()
        self._observer.finished(exchange)

    async def overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The answer to a request over ``server.limit_concurrency``: 503 with Retry-After,
        counted on its route like any other exchange, the upstream never contacted."""
        route, exchange = self._begin(scope)
        try:
            upstream = route.upstream if route is not None else None
            policy = self._policies.get(route) if route is not None else None
            edits = policy.response_headers if policy is not None else None
            await self._hop.send_error(send, exchange, Reason.OVERLOADED, upstream, None, edits)
        finally:
            self._end(exchange)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket_session(scope, receive, send)
            return
        route, exchange = self._begin(scope)
        policy: RoutePolicy | None = None
        try:
            if route is None:
                await self._hop.send_error(send, exchange, Reason.NO_ROUTE, None)
                return
            upstream = self._upstreams()[route.upstream]
            policy = self._policies.get(route)
            forwarding = Forwarding(
                self._hop, scope, receive, send, exchange, route, upstream, policy
            )
            await forwarding.run()
        except asyncio.CancelledError:
            # Only the server cancels an exchange from outside: at shutdown, once the grace
            # period is over. It ends here, answered and logged as cut short.
            await self._cut_short(send, exchange, policy)
        finally:
            self._end(exchange)

    async def _websocket_session(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, exchange = self._begin(scope)
        relay = WebSocketRelay(
            self._hop, self._websocket, self._sessions, self._meter, scope, receive, send, exchange
        )
        try:
            if route is None:
                await relay.refuse(Reason.NO_ROUTE, None)
            else:
                policy = self._policies.get(route)
                await relay.run(route, self._upstreams()[route.upstream], policy)
        except asyncio.CancelledError:
            # Cut by the drain before the session opened (an open one closes itself).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            relay.session.end(SessionResult.DRAIN, None, None)
            if not exchange.response_started:
                await self._hop.send_error(
                    http_messages(send), exchange, Reason.SHUTDOWN, exchange.upstream
                )
        except OSError:
            # uvicorn's ClientDisconnected: the client went before its answer was written.
            exchange.disconnected(Side.CLIENT)
        except Exception:
            log.exception("unexpected failure in a WebSocket session to %s", exchange.upstream)
            relay.session.end(SessionResult.ERROR, None, None)
            if not exchange.response_started:
                await self._hop.send_error(
                    http_messages(send), exchange, Reason.INTERNAL, exchange.upstream
                )
        finally:
            self._end(exchange)

    async def _cut_short(self, send: Send, exchange: Exchange, policy: RoutePolicy | None) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if exchange.response_complete:
            return
        if exchange.response_started:
            # Returning without the final body message drops the connection: a truncated
            # response, never a complete-looking one.
            exchange.reason = Reason.SHUTDOWN
            return
        edits = policy.response_headers if policy is not None else None
        await self._hop.send_error(send, exchange, Reason.SHUTDOWN, exchange.upstream, None, edits)
