"""The proxy itself: match a route, forward the request, stream the response back.

Disconnect safety rests on one rule: the upstream response is closed in a ``finally`` of
the task that opened it, whatever ends the exchange (completion, a client that hangs up, an
upstream that fails, cancellation at shutdown), and that close runs to its end even when a
cancellation arrives during it (see ``upstreams.pools._GatedStream``). Nothing depends on
Starlette background tasks, which are skipped on some paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from http import HTTPStatus

import httpx
from starlette.types import Message, Receive, Scope, Send

from .config import RouteConfig, Settings
from .errors import FAILURES, BodyTooLarge, Reason, classify, proxy_status
from .exchange import Exchange, ExchangeObserver, Side
from .headers import (
    RequestContext,
    downstream_response_headers,
    first_value,
    has_body,
    upstream_request_headers,
)
from .routing import Router, rewrite_path
from .upstreams.pools import Body, Upstream, UpstreamSet

log = logging.getLogger("relay.proxy")

CLIENT_CLOSED_REQUEST = 499  # nginx's convention for "client hung up before the response"


class ClientDisconnected(Exception):
    """The downstream client went away while its request body was being read."""


class ClientChannel:
    """Owns ``receive`` for one request: the body reader first, then a disconnect watcher.

    ASGI allows one reader at a time, so the watcher only starts reading once the body is
    finished; until then the body reader is the one that sees ``http.disconnect``.
    """

    def __init__(self, receive: Receive, exchange: Exchange, max_body: int = 0) -> None:
        self._receive = receive
        self._exchange = exchange
        self._max_body = max_body  # 0: unlimited
        self.gone = False
        self._body_done = asyncio.Event()

    def no_body(self) -> None:
        self._body_done.set()

    async def body(self) -> AsyncIterator[bytes]:
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self._lost()
                    raise ClientDisconnected("client disconnected during the request body")
                chunk: bytes = message.get("body", b"")
                if chunk:
                    size = self._exchange.request_bytes + len(chunk)
                    if self._max_body and size > self._max_body:
                        raise BodyTooLarge("request body exceeds limits.max_body_bytes")
                    self._exchange.request_bytes = size
                    yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            self._body_done.set()

    async def watch(self, on_gone: Callable[[], None]) -> None:
        await self._body_done.wait()
        if self.gone:
            # The body reader saw the client go and raised ClientDisconnected, which already
            # ends the exchange. Cancelling now would land in the transport's cleanup of that
            # error: httpcore's shielded close does not survive an asyncio cancellation and
            # its connection would stay checked out of its pool for good.
            return
        while not self.gone:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._lost()
        on_gone()

    def _lost(self) -> None:
        self.gone = True
        self._exchange.disconnected(Side.CLIENT)


class Proxy:
    """The ASGI application that serves every proxied path."""

    def __init__(
        self,
        settings: Settings,
        upstreams: Callable[[], UpstreamSet],
        observer: ExchangeObserver,
    ) -> None:
        self._settings = settings
        self._router = Router(settings.routes)
        self._upstreams = upstreams
        self._observer = observer
        self._via = settings.server.name.encode()
        self._trusted = settings.server.trusted_proxies
        self._max_body = settings.limits.max_body_bytes

    def _begin(self, scope: Scope) -> tuple[RouteConfig | None, Exchange]:
        """Route the request and open its exchange record."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        raw_host = first_value(headers, b"host")
        host = raw_host.decode("latin-1") if raw_host is not None else None
        # Paths with dot segments (raw or encoded) never get here: the parsing stage refuses
        # them (routing.path_problem), as the upstream could resolve them outside the route.
        route = self._router.match(host, scope["path"])
        exchange = Exchange(
            method=scope["method"],
            route=route.label if route else None,
            upstream=route.upstream if route else None,
            path=scope["path"],
            route_prefix=route.prefix if route else None,
        )
        self._observer.started(exchange)
        return route, exchange

    async def overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The answer to a request over ``server.limit_concurrency``: 503 with Retry-After,
        counted on its route like any other exchange, the upstream never contacted."""
        route, exchange = self._begin(scope)
        try:
            upstream = route.upstream if route is not None else None
            await self._send_error(send, exchange, Reason.OVERLOADED, upstream)
        finally:
            exchange.mark_done()
            self._observer.finished(exchange)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        route, exchange = self._begin(scope)
        try:
            if route is None:
                await self._send_error(send, exchange, Reason.NO_ROUTE, None)
                return
            upstream = self._upstreams()[route.upstream]
            channel = ClientChannel(receive, exchange, self._max_body)
            await self._exchange(scope, route, upstream, channel, send, exchange)
            if exchange.disconnect_side is Side.CLIENT and exchange.status is None:
                exchange.status = CLIENT_CLOSED_REQUEST
        except asyncio.CancelledError:
            # Only the server cancels an exchange from outside: at shutdown, once the grace
            # period is over. It ends here, answered and logged as cut short.
            await self._cut_short(send, exchange)
        finally:
            exchange.mark_done()
            self._observer.finished(exchange)

    async def _exchange(
        self,
        scope: Scope,
        route: RouteConfig,
        upstream: Upstream,
        channel: ClientChannel,
        send: Send,
        exchange: Exchange,
    ) -> None:
        """Forward while a watcher task waits for the client to hang up.

        When it does, the watcher cancels this task; that cancellation ends the exchange
        here and goes no further. The watcher can only fire while this task is suspended
        inside ``_forward`` (there is no await between its return and the watcher's end).
        """
        task = asyncio.current_task()
        assert task is not None
        cancelled_by_watcher = False

        def client_gone() -> None:
            nonlocal cancelled_by_watcher
            cancelled_by_watcher = True
            task.cancel()

        watcher = asyncio.create_task(channel.watch(client_gone))
        try:
            await self._forward(scope, route, upstream, channel, send, exchange)
        except asyncio.CancelledError:
            if not cancelled_by_watcher or task.uncancel() > 0:
                raise
        finally:
            watcher.cancel()

    def _build_request(
        self, scope: Scope, route: RouteConfig, upstream: Upstream, channel: ClientChannel
    ) -> httpx.Request:
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        client = scope.get("client")
        host = first_value(raw_headers, b"host")
        ctx = RequestContext(
            peer=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            http_version=scope.get("http_version", "1.1"),
            host=host,
        )
        out_headers = upstream_request_headers(
            raw_headers,
            ctx,
            upstream_authority=upstream.authority,
            preserve_host=upstream.config.preserve_host,
            via_name=self._via,
            trusted=self._trusted,
        )
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw_path.split(b"?", 1)[0]
        target = upstream.base_path + rewrite_path(route, raw_path)
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        body: Body | None = None
        if has_body(raw_headers):
            body = Body(channel.body())
        else:
            channel.no_body()
        return upstream.request(scope["method"], target, out_headers, body)

    async def _forward(
        self,
        scope: Scope,
        route: RouteConfig,
        upstream: Upstream,
        channel: ClientChannel,
        send: Send,
        exchange: Exchange,
    ) -> None:
        try:
            request = self._build_request(scope, route, upstream, channel)
            response = await upstream.send(request)
            if not 200 <= response.status_code <= 599:
                # Not a final status the proxy can forward (e.g. 101 to a request whose
                # Upgrade was stripped, or 600+): the ASGI server would fail on it.
                await response.aclose()
                raise httpx.RemoteProtocolError(f"invalid final status {response.status_code}")
        except ClientDisconnected:
            return
        except BodyTooLarge:
            # Raised by the body reader inside the upstream request, which it aborts.
            await self._send_error(send, exchange, Reason.BODY_TOO_LARGE, upstream.name)
            return
        except httpx.HTTPError as exc:
            await self._upstream_failed(send, exchange, exc, upstream.name)
            return
        except Exception:
            log.exception("unexpected failure forwarding to %s", upstream.name)
            await self._send_error(send, exchange, Reason.INTERNAL, upstream.name)
            return
        try:
            exchange.status = response.status_code
            exchange.mark_headers()
            self._observer.headers(exchange)
            version = scope.get("http_version", "1.1")
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": downstream_response_headers(
                        response.headers.raw,
                        http_version=version,
                        via_name=self._via,
                        status=response.status_code,
                    ),
                }
            )
            exchange.response_started = True
            async for chunk in response.stream:  # type: ignore[union-attr]
                exchange.response_bytes += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            exchange.response_complete = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            # Headers are gone already: returning without the final body message makes the
            # server drop the connection, so the client sees a truncated response, never a
            # complete-looking one.
            self._record_failure(exchange, exc)
        except ClientDisconnected:
            return
        except Exception:
            exchange.reason = Reason.INTERNAL
            log.exception("unexpected failure streaming from %s", upstream.name)
        finally:
            await response.aclose()

    async def _cut_short(self, send: Send, exchange: Exchange) -> None:
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
        await self._send_error(send, exchange, Reason.SHUTDOWN, exchange.upstream)

    def _record_failure(self, exchange: Exchange, exc: BaseException) -> Reason:
        reason = classify(exc)
        exchange.reason = reason
        if reason is Reason.RESET:
            exchange.disconnected(Side.UPSTREAM)
        return reason

    async def _upstream_failed(
        self, send: Send, exchange: Exchange, exc: BaseException, upstream: str
    ) -> None:
        reason = self._record_failure(exchange, exc)
        log.debug("upstream %s failed before headers: %s (%r)", upstream, reason, exc)
        await self._send_error(send, exchange, reason, upstream)

    async def _send_error(
        self, send: Send, exchange: Exchange, reason: Reason, upstream: str | None
    ) -> None:
        failure = FAILURES[reason]
        exchange.reason = exchange.reason or reason
        exchange.status = failure.status
        self._observer.failing(exchange)
        phrase = HTTPStatus(failure.status).phrase
        body = f"{failure.status} {phrase}: {failure.text}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"proxy-status", proxy_status(self._settings.server.name, reason, upstream).encode()),
            (b"cache-control", b"no-store"),
            (b"date", formatdate(usegmt=True).encode()),
        ]
        if reason in (Reason.POOL_TIMEOUT, Reason.OVERLOADED):
            retry_after = str(self._settings.server.retry_after_seconds).encode()
            headers.append((b"retry-after", retry_after))
        if reason in (Reason.BODY_TOO_LARGE, Reason.OVERLOADED):
            # Too large: the rest of the body stays unread, so this connection cannot carry
            # another request. Overloaded: a connection fewer is what the worker needs.
            headers.append((b"connection", b"close"))
        start: Message = {
            "type": "http.response.start",
            "status": failure.status,
            "headers": headers,
        }
        await send(start)
        exchange.response_started = True
        exchange.response_complete = True
        await send({"type": "http.response.body", "body": body, "more_body": False})
