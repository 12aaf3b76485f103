"""One proxied request on its way: sent upstream, its response streamed back, or its failure
answered with the proxy's own error.

Disconnect safety rests on one rule: the upstream response is closed in a ``finally`` of
the task that opened it, whatever ends the exchange (completion, a client that hangs up, an
upstream that fails, cancellation at shutdown), and that close runs to its end even when a
cancellation arrives during it (see ``upstreams.pools._GatedStream``). Nothing depends on
Starlette background tasks, which are skipped on some paths.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from starlette.types import Receive, Scope, Send

from .config import RouteConfig, Settings
from .errors import BodyTooLarge, Reason, classify, error_response, tls_error_type
from .exchange import Exchange, ExchangeObserver, Side
from .headers import (
    RequestContext,
    TrustedNetworks,
    downstream_response_headers,
    first_value,
    has_body,
    upstream_request_headers,
)
from .request_ids import RequestIds
from .routing import rewrite_path
from .upstreams.pools import Body, Upstream

log = logging.getLogger("relay.proxy")

# httpcore lets a TLS alert received after the handshake (say, the upstream refusing our
# client certificate under TLS 1.3) through as the ssl module's own error.
UPSTREAM_ERRORS = (httpx.HTTPError, ssl.SSLError)

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


@dataclass(frozen=True)
class ProxyHop:
    """What every request through this proxy shares: its name, trust and body limit, its
    observer, and its own error answer."""

    server_name: str
    via: bytes  # the server name, as Via names this hop
    trusted: TrustedNetworks
    max_body: int  # 0: unlimited
    retry_after_seconds: int
    observer: ExchangeObserver
    request_ids: RequestIds

    @classmethod
    def of(cls, settings: Settings, observer: ExchangeObserver) -> ProxyHop:
        server = settings.server
        return cls(
            server_name=server.name,
            via=server.name.encode(),
            trusted=server.trusted_proxies,
            max_body=settings.limits.max_body_bytes,
            retry_after_seconds=server.retry_after_seconds,
            observer=observer,
            request_ids=RequestIds.of(settings.request_id),
        )

    def request_id_field(self, exchange: Exchange) -> tuple[bytes, bytes] | None:
        if exchange.request_id is None:
            return None
        return self.request_ids.field(exchange.request_id)

    async def send_error(
        self,
        send: Send,
        exchange: Exchange,
        reason: Reason,
        upstream: str | None,
        error: str | None = None,
    ) -> None:
        """Answer with the proxy's own error for ``reason`` (nothing sent yet); ``error``:
        the Proxy-Status error type when not the reason's own."""
        response = error_response(
            reason,
            server_name=self.server_name,
            upstream=upstream,
            retry_after_seconds=self.retry_after_seconds,
            request_id=self.request_id_field(exchange),
            error=error,
        )
        exchange.fail(reason)
        self.observer.failing(exchange)
        await send(
            {"type": "http.response.start", "status": response.status, "headers": response.headers}
        )
        exchange.response_started = True
        exchange.response_complete = True
        await send({"type": "http.response.body", "body": response.body, "more_body": False})


class Forwarding:
    """One request forwarded to its route's upstream, and the response streamed back."""

    def __init__(
        self,
        hop: ProxyHop,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        route: RouteConfig,
        upstream: Upstream,
    ) -> None:
        self.hop = hop
        self.scope = scope
        self.send = send
        self.exchange = exchange
        self.route = route
        self.upstream = upstream
        self.channel = ClientChannel(receive, exchange, hop.max_body)
        self.request_id = hop.request_id_field(exchange)  # the field, both ways

    async def run(self) -> None:
        """Forward while a watcher task waits for the client to hang up.

        When it does, the watcher cancels this task; that cancellation ends the exchange
        here and goes no further. The watcher can only fire while this task is suspended
        inside ``send_upstream`` or ``stream_back`` (there is no await between the end of
        the second and the watcher's).
        """
        task = asyncio.current_task()
        assert task is not None
        cancelled_by_watcher = False

        def client_gone() -> None:
            nonlocal cancelled_by_watcher
            cancelled_by_watcher = True
            task.cancel()

        watcher = asyncio.create_task(self.channel.watch(client_gone))
        try:
            response = await self.send_upstream()
            if response is not None:
                await self.stream_back(response)
        except asyncio.CancelledError:
            if not cancelled_by_watcher or task.uncancel() > 0:
                raise
        finally:
            watcher.cancel()
        exchange = self.exchange
        if exchange.disconnect_side is Side.CLIENT and exchange.status is None:
            exchange.status = CLIENT_CLOSED_REQUEST

    def _request(self) -> httpx.Request:
        scope, upstream, exchange = self.scope, self.upstream, self.exchange
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        ctx = RequestContext(
            peer=exchange.peer_addr,
            scheme=scope.get("scheme", "http"),
            http_version=exchange.http_version or "1.1",
            host=first_value(raw_headers, b"host"),
            trusted=exchange.peer_trusted,
        )
        out_headers = upstream_request_headers(
            raw_headers,
            ctx,
            upstream_authority=upstream.authority,
            preserve_host=upstream.config.preserve_host,
            via_name=self.hop.via,
            trusted=self.hop.trusted,
            request_id=self.request_id,
        )
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw_path.split(b"?", 1)[0]
        target = upstream.base_path + rewrite_path(self.route, raw_path)
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        body: Body | None = None
        if has_body(raw_headers):
            body = Body(self.channel.body())
        else:
            self.channel.no_body()
        return upstream.request(scope["method"], target, out_headers, body)

    async def send_upstream(self) -> httpx.Response | None:
        """The upstream's response, or None when the exchange ended before it: the client
        went, or the proxy answered with its own error."""
        request: httpx.Request | None = None
        try:
            request = self._request()
            response = await self.upstream.send(request)
            self.exchange.upstream_addr = self.upstream.address_of(request)
            self.exchange.upstream_status = response.status_code
            if not 200 <= response.status_code <= 599:
                # Not a final status the proxy can forward (e.g. 101 to a request whose
                # Upgrade was stripped, or 600+): the ASGI server would fail on it.
                await response.aclose()
                raise httpx.RemoteProtocolError(f"invalid final status {response.status_code}")
            return response
        except ClientDisconnected:
            return None
        except BodyTooLarge:
            # Raised by the body reader inside the upstream request, which it aborts.
            await self.fail(Reason.BODY_TOO_LARGE)
        except UPSTREAM_ERRORS as exc:
            if request is not None:
                self.exchange.upstream_addr = self.upstream.address_of(request)
            reason = self._failed(exc)
            log.debug("upstream %s failed before headers: %s (%r)", self.upstream.name, reason, exc)
            await self.fail(reason, tls_error_type(exc) if reason is Reason.TLS else None)
        except Exception:
            log.exception("unexpected failure forwarding to %s", self.upstream.name)
            await self.fail(Reason.INTERNAL)
        return None

    async def stream_back(self, response: httpx.Response) -> None:
        """Send the response's head and body to the client; close it whatever happens."""
        exchange = self.exchange
        try:
            exchange.status = response.status_code
            exchange.mark_headers()
            self.hop.observer.headers(exchange)
            headers = downstream_response_headers(
                response.headers.raw,
                http_version=exchange.http_version or "1.1",
                via_name=self.hop.via,
                status=response.status_code,
                request_id=self.request_id,
            )
            await self.send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            exchange.response_started = True
            async for chunk in response.stream:  # type: ignore[union-attr]
                exchange.response_bytes += len(chunk)
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            exchange.response_complete = True
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        except UPSTREAM_ERRORS as exc:
            # Headers are gone already: returning without the final body message makes the
            # server drop the connection, so the client sees a truncated response, never a
            # complete-looking one.
            self._failed(exc)
        except ClientDisconnected:
            return
        except Exception:
            exchange.reason = Reason.INTERNAL
            log.exception("unexpected failure streaming from %s", self.upstream.name)
        finally:
            await response.aclose()

    async def fail(self, reason: Reason, error: str | None = None) -> None:
        """Answer with the proxy's own error for ``reason``, naming the upstream."""
        await self.hop.send_error(self.send, self.exchange, reason, self.upstream.name, error)

    def _failed(self, exc: BaseException) -> Reason:
        reason = classify(exc)
        self.exchange.reason = reason
        if reason is Reason.RESET:
            self.exchange.disconnected(Side.UPSTREAM)
        return reason
