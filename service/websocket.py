"""WebSocket sessions: the handshake forwarded with the HTTP header rules, then messages
relayed both ways until either side closes (README, *WebSocket*).

A message relay, not a byte tunnel: each hop is a WebSocket connection of its own (uvicorn's
towards the client, ``websockets``' towards the upstream), so the proxy sees whole messages.
That is what lets it enforce ``websocket.max_message_bytes``, count messages and bytes, pass
close codes on and tell who closed, which a tunnel of opaque bytes cannot.

Ending rule: the first side to end (a close frame, a connection lost, the idle timeout, a
message too large, the drain) decides the session's result; the other side is then closed
at once, with the code the first side sent or the proxy's own (1001 going away, 1011 when
the upstream vanished, 1009 too large).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from opentelemetry import propagate, trace
from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .config import RouteConfig, WebSocketConfig
from .errors import Reason
from .exchange import Exchange, Phase, Side
from .forwarding import CLIENT_CLOSED_REQUEST, ProxyHop
from .headers import downstream_response_headers
from .route_policy import RoutePolicy
from .session import Closer, Direction, Session, SessionResult
from .upstreams.pools import Upstream
from .websocket_ends import (
    ABNORMAL,
    GOING_AWAY,
    INTERNAL_ERROR,
    NO_STATUS,
    End,
    client_end,
    close_upstream,
    first_end,
    upstream_end,
)
from .websocket_upstream import (
    HANDSHAKE_FIELDS,
    HandshakeFailed,
    Refused,
    handshake_headers,
    open_upstream,
    response_fields,
    websocket_target,
)

log = logging.getLogger("relay.proxy")

_SCHEMES = {"ws": "http", "wss": "https"}


class MessageMeter(Protocol):
    """Told of each relayed message (the metrics' live counters)."""

    def message(self, upstream: str, direction: Direction, size: int) -> None:
        """One message of ``size`` bytes relayed in ``direction``."""


class NoMeter:
    def message(self, upstream: str, direction: Direction, size: int) -> None:
        pass


class SessionGate:
    """Open sessions per upstream, at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def enter(self, upstream: str) -> bool:
        count = self.open.get(upstream, 0)
        if count >= self.limit:
            return False
        self.open[upstream] = count + 1
        return True

    def leave(self, upstream: str) -> None:
        self.open[upstream] -= 1


def http_messages(send: Send) -> Send:
    """``send`` for answers written as HTTP responses (the proxy's errors): as the ASGI
    WebSocket ``websocket.http.response`` extension's messages."""

    async def translated(message: Message) -> None:
        await send({**message, "type": "websocket." + message["type"]})

    return translated


def _text_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


class WebSocketRelay:
    """One WebSocket request: refused, answered with the upstream's refusal, or relayed."""

    def __init__(
        self,
        hop: ProxyHop,
        config: WebSocketConfig,
        gate: SessionGate,
        meter: MessageMeter,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
    ) -> None:
        self.hop = hop
        self.config = config
        self.gate = gate
        self.meter = meter
        self.scope = scope
        self.receive = receive
        self.send = send
        self.exchange = exchange
        self.session = exchange.websocket = Session()
        self.request_id = hop.request_id_field(exchange)
        self._last_message = 0.0
        self._policy: RoutePolicy | None = None  # the route's, once routed

    async def refuse(self, reason: Reason, upstream: str | None) -> None:
        """Answer the handshake with the proxy's own error for ``reason``."""
        edits = self._policy.response_headers if self._policy is not None else None
        await self.hop.send_error(
            http_messages(self.send), self.exchange, reason, upstream, edits=edits
        )

    async def run(self, route: RouteConfig, upstream: Upstream, policy: RoutePolicy | None) -> None:
        """``policy``: the route's, whose header policies apply to the handshake both ways."""
        self._policy = policy
        connect = await self.receive()
        if connect["type"] != "websocket.connect":
            return  # the client went before its handshake was read
        if not route.websocket:
            await self.refuse(Reason.WEBSOCKET_DISABLED, upstream.name)
            return
        if not self.gate.enter(upstream.name):
            await self.refuse(Reason.POOL_TIMEOUT, upstream.name)
            return
        try:
            await self._proxy(route, upstream)
        finally:
            self.gate.leave(upstream.name)

    async def _proxy(self, route: RouteConfig, upstream: Upstream) -> None:
        session, exchange = self.session, self.exchange
        try:
            connection = await open_upstream(
                upstream,
                websocket_target(upstream, route, self.scope),
                handshake_headers(self._forwarded(upstream)),
                list(self.scope.get("subprotocols") or ()),
                self.config.max_message_bytes,
            )
        except Refused as refused:
            session.end(SessionResult.UPSTREAM_REFUSED, None, None)
            await self._pass_refusal(refused)
            return
        except HandshakeFailed as failed:
            session.end(SessionResult.ERROR, None, None)
            exchange.reason = failed.reason
            await self.hop.send_error(
                http_messages(self.send), exchange, failed.reason, upstream.name, failed.error
            )
            return
        try:
            try:
                await self._accept(connection)
            except OSError:
                # uvicorn's ClientDisconnected: the client went before its 101.
                session.end(SessionResult.CLIENT_CLOSED, Closer.CLIENT, ABNORMAL)
                exchange.status = CLIENT_CLOSED_REQUEST
                exchange.disconnected(Side.CLIENT)
                await close_upstream(connection, GOING_AWAY, "client connection lost")
                return
            await self._relay(connection)
        finally:
            # Whatever ended the session (the drain's cancellation included), the upstream
            # connection is gone when this returns.
            if not connection.transport.is_closing():
                connection.transport.abort()

    def _forwarded(self, upstream: Upstream) -> list[tuple[bytes, bytes]]:
        scope = self.scope
        headers = self.hop.upstream_headers(
            scope,
            self.exchange,
            upstream,
            scheme=_SCHEMES.get(scope.get("scheme", "ws"), "http"),
            request_id=self.request_id,
            edits=self._policy.request_headers if self._policy is not None else None,
        )
        if trace.get_current_span().is_recording():
            # Traced: the upstream continues the session's trace, as HTTP requests continue
            # their client span's (untraced, an inbound traceparent goes on as sent).
            context: dict[str, str] = {}
            propagate.inject(context)
            names = {name.encode() for name in context}
            headers = [(n, v) for n, v in headers if n not in names]
            headers += [(n.encode(), v.encode()) for n, v in context.items()]
        return headers

    def _response_headers(self, raw: list[tuple[bytes, bytes]], status: int) -> list[Any]:
        return downstream_response_headers(
            raw,
            http_version=self.exchange.http_version or "1.1",
            via_name=self.hop.via,
            status=status,
            request_id=self.request_id,
            edits=self._policy.response_headers if self._policy is not None else None,
        )

    async def _pass_refusal(self, refused: Refused) -> None:
        """The upstream's answer to the handshake, status, fields and body, as sent."""
        response, exchange = refused.response, self.exchange
        body = response.body or b""
        exchange.upstream_status = exchange.status = response.status_code
        exchange.mark_headers()
        self.hop.observer.headers(exchange)
        headers = self._response_headers(response_fields(response), response.status_code)
        headers = [(n, v) for n, v in headers if n != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send(
            {
                "type": "websocket.http.response.start",
                "status": response.status_code,
                "headers": headers,
            }
        )
        exchange.response_started = True
        exchange.response_bytes = len(body)
        exchange.response_complete = True
        await self.send({"type": "websocket.http.response.body", "body": body})

    async def _accept(self, connection: ClientConnection) -> None:
        exchange = self.exchange
        response = connection.response
        assert response is not None
        exchange.upstream_status = exchange.status = 101
        exchange.mark_headers()
        self.hop.observer.headers(exchange)
        fields = [
            (n, v)
            for n, v in self._response_headers(response_fields(response), 101)
            if n not in HANDSHAKE_FIELDS
        ]
        message: dict[str, Any] = {"type": "websocket.accept", "headers": fields}
        if connection.subprotocol is not None:
            message["subprotocol"] = connection.subprotocol
        await self.send(message)
        exchange.response_started = True
        self.session.open()
        self.hop.observer.upgraded(exchange)

    async def _relay(self, connection: ClientConnection) -> None:
        """Both directions (and the idle timer) until one ends; then the other side is
        closed. The drain's cancellation ends it too, with 1001 both ways."""
        loop = asyncio.get_running_loop()
        self._last_message = loop.time()
        tasks = [
            asyncio.create_task(self._to_upstream(connection)),
            asyncio.create_task(self._to_client(connection)),
        ]
        if self.config.idle_timeout_seconds is not None:
            tasks.append(asyncio.create_task(self._idle(self.config.idle_timeout_seconds)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            end = first_end(tasks, done)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            end = End(SessionResult.DRAIN, Closer.PROXY, GOING_AWAY, "proxy shutting down")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._record(end)
        await self._close_both(connection, end)

    def _record(self, end: End) -> None:
        self.session.end(end.result, end.closed_by, ABNORMAL if end.vanished else end.code)
        self.session.close_reason = end.reason
        exchange = self.exchange
        exchange.response_complete = True
        if end.vanished:
            side = Side.CLIENT if end.closed_by is Closer.CLIENT else Side.UPSTREAM
            exchange.disconnect_side, exchange.disconnect_phase = side, Phase.SESSION
            if side is Side.UPSTREAM:
                exchange.reason = Reason.RESET

    async def _close_both(self, connection: ClientConnection, end: End) -> None:
        """Close whichever side did not end the session (both, when the proxy did)."""
        if end.closed_by is not Closer.CLIENT:
            code, reason = end.code, end.reason
            if end.vanished:
                code, reason = INTERNAL_ERROR, "upstream connection lost"
            message: dict[str, Any] = {"type": "websocket.close", "reason": reason}
            # Received without a code, passed on without one.
            message["code"] = None if code == NO_STATUS else code
            with contextlib.suppress(OSError, RuntimeError):
                await self.send(message)
        if end.closed_by is not Closer.UPSTREAM:
            code, reason = end.code, end.reason
            if end.vanished:
                code, reason = GOING_AWAY, "client connection lost"
            await close_upstream(connection, code, reason)

    async def _to_upstream(self, connection: ClientConnection) -> End:
        meter, name, session = self.meter, self.exchange.upstream or "", self.session
        loop = asyncio.get_running_loop()
        while True:
            message = await self.receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data: str | bytes = text if text is not None else message.get("bytes") or b""
                size = _text_size(data) if isinstance(data, str) else len(data)
                self._last_message = loop.time()
                session.messages_to_upstream += 1
                session.bytes_to_upstream += size
                meter.message(name, Direction.TO_UPSTREAM, size)
                try:
                    await connection.send(data)
                except ConnectionClosed as closed:
                    return upstream_end(closed)
            elif kind == "websocket.disconnect":
                return client_end(message)

    async def _to_client(self, connection: ClientConnection) -> End:
        meter, name, session = self.meter, self.exchange.upstream or "", self.session
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await connection.recv()
            except ConnectionClosed as closed:
                return upstream_end(closed)
            size = _text_size(data) if isinstance(data, str) else len(data)
            self._last_message = loop.time()
            session.messages_to_client += 1
            session.bytes_to_client += size
            meter.message(name, Direction.TO_CLIENT, size)
            key = "text" if isinstance(data, str) else "bytes"
            try:
                await self.send({"type": "websocket.send", key: data})
            except OSError:
                # uvicorn's ClientDisconnected: the client's connection is gone (the other
                # task reads its disconnect message; one reader at a time).
                return End(SessionResult.CLIENT_CLOSED, Closer.CLIENT, GOING_AWAY, vanished=True)

    async def _idle(self, limit: float) -> End:
        """Ends once no message went either way for ``limit`` seconds: one timer per
        session, re-armed from the last message's time rather than at every message."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = self._last_message + limit - loop.time()
            if remaining <= 0:
                return End(SessionResult.IDLE, Closer.PROXY, GOING_AWAY, "idle timeout")
            await asyncio.sleep(remaining)
