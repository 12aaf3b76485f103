"""One proxied request on its way: sent upstream, its response streamed back, or its failure
answered with the proxy's own error.

Disconnect safety rests on one rule: the upstream response is closed in a ``finally`` of
the task that opened it, whatever ends the exchange (completion, a client that hangs up, an
upstream that fails, cancellation at shutdown), and that close runs to its end even when a
cancellation arrives during it (see ``upstreams.gated._GatedStream``). Nothing depends on
Starlette background tasks, which are skipped on some paths.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import Enum

import httpx
from starlette.types import Receive, Scope, Send

from .client_channel import ClientChannel, ClientDisconnected
from .config import RouteConfig, Settings
from .errors import (
    UPSTREAM_ERRORS,
    BodyTooLarge,
    Reason,
    classify,
    error_response,
    tls_error_type,
)
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
from .retries import Retrying, RoutePlan, route_plans
from .route_policy import HeaderEdits, RoutePolicy
from .routing import rewrite_path
from .upstreams.gated import Body
from .upstreams.pools import Upstream

log = logging.getLogger("relay.proxy")

CLIENT_CLOSED_REQUEST = 499  # nginx's convention for "client hung up before the response"


class _Cut(Enum):
    """What cancelled a forwarding task on purpose."""

    CLIENT_GONE = 1
    OUT_OF_TIME = 2  # the route's timeouts.total


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
    retry_plans: Mapping[int, RoutePlan]  # by id of the route (retries.route_plans)

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
            retry_plans=route_plans(settings.routes),
        )

    def upstream_headers(
        self,
        scope: Scope,
        exchange: Exchange,
        upstream: Upstream,
        *,
        scheme: str,
        request_id: tuple[bytes, bytes] | None,
        edits: HeaderEdits | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """The request's fields as they go to ``upstream`` (``headers.upstream_request_headers``
        with this hop's name and trust and the exchange's client); ``scheme``: the client's,
        as X-Forwarded-Proto names it."""
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        ctx = RequestContext(
            peer=exchange.peer_addr,
            scheme=scheme,
            http_version=exchange.http_version or "1.1",
            host=first_value(raw, b"host"),
            trusted=exchange.peer_trusted,
        )
        return upstream_request_headers(
            raw,
            ctx,
            upstream_authority=upstream.authority,
            preserve_host=upstream.config.preserve_host,
            via_name=self.via,
            trusted=self.trusted,
            request_id=request_id,
            edits=edits,
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
        edits: HeaderEdits | None = None,
    ) -> None:
        """Answer with the proxy's own error for ``reason`` (nothing sent yet); ``error``:
        the Proxy-Status error type when not the reason's own; ``edits``: the route's
        response header policy, which the proxy's own answers get too (as Envoy's local
        replies get response_headers_to_add)."""
        response = error_response(
            reason,
            server_name=self.server_name,
            upstream=upstream,
            retry_after_seconds=self.retry_after_seconds,
            request_id=self.request_id_field(exchange),
            error=error,
        )
        headers = response.headers if edits is None else edits.apply(response.headers)
        exchange.fail(reason)
        self.observer.failing(exchange)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
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
        policy: RoutePolicy | None = None,
    ) -> None:
        self.hop = hop
        self.scope = scope
        self.send = send
        self.exchange = exchange
        self.route = route
        self.upstream = upstream
        self.channel = ClientChannel(receive, exchange, hop.max_body)
        self.request_id = hop.request_id_field(exchange)  # the field, both ways
        self._sent: httpx.Request | None = None  # the latest attempt built
        self.policy = policy

    async def run(self) -> None:
        """Forward while a watcher task waits for the client to hang up and, when the
        route has ``timeouts.total``, a timer runs out.

        Whichever comes first cancels this task, and the other then does nothing
        (``uncancel`` below takes back exactly one cancellation); that cancellation ends
        the exchange here and goes no further. Either can only cancel while this task is
        suspended inside ``send_upstream`` or ``stream_back`` (there is no await between
        the end of the second and the ``finally`` that stops them). The upstream response
        is closed in ``stream_back``'s ``finally`` either way, and its gate slot returned.
        """
        task = asyncio.current_task()
        assert task is not None
        cut: _Cut | None = None

        def cancel(by: _Cut = _Cut.CLIENT_GONE) -> None:
            nonlocal cut
            if cut is None:
                cut = by
                task.cancel()

        watcher = asyncio.create_task(self.channel.watch(cancel))
        policy = self.policy
        # A timer rather than asyncio.timeout: about half its cost, and the cancellation
        # is this method's to take back already.
        deadline = (
            None
            if policy is None or policy.total is None
            else asyncio.get_running_loop().call_later(policy.total, cancel, _Cut.OUT_OF_TIME)
        )
        try:
            response = await self.send_upstream()
            if response is not None:
                await self.stream_back(response)
        except asyncio.CancelledError:
            if cut is None or task.uncancel() > 0:
                raise
            if cut is _Cut.OUT_OF_TIME:
                await self._out_of_time()
        finally:
            watcher.cancel()
            if deadline is not None:
                deadline.cancel()
        exchange = self.exchange
        if exchange.disconnect_side is Side.CLIENT and exchange.status is None:
            exchange.status = CLIENT_CLOSED_REQUEST

    async def _out_of_time(self) -> None:
        """The route's total timeout ran out: 504 if the response had not started, else it
        is cut (returning without the final body message drops the connection: a truncated
        response, never a complete-looking one)."""
        exchange = self.exchange
        if not exchange.response_started:
            await self.fail(Reason.TOTAL_TIMEOUT)
        elif not exchange.response_complete:
            exchange.reason = exchange.reason or Reason.TOTAL_TIMEOUT

    def _request(self) -> httpx.Request:
        method, target, headers, body = self._parts()
        return self._build(method, target, headers, Body(body) if body is not None else None)

    def _build(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: Body | None
    ) -> httpx.Request:
        """The upstream request of one attempt: every attempt of a retried request is built
        here too, so whatever a request gets, each attempt gets (the route's timeouts)."""
        timeouts = self.policy.timeouts if self.policy is not None else None
        request = self.upstream.request(method, target, headers, body, timeouts)
        self._sent = request  # the latest attempt: its endpoint is the log's upstream_addr
        return request

    def _parts(
        self,
    ) -> tuple[str, bytes, list[tuple[bytes, bytes]], AsyncIterator[bytes] | None]:
        """Method, target, headers and body (None: the request has none) to send upstream."""
        scope, upstream = self.scope, self.upstream
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        out_headers = self.hop.upstream_headers(
            scope,
            self.exchange,
            upstream,
            scheme=scope.get("scheme", "http"),
            request_id=self.request_id,
            edits=self.policy.request_headers if self.policy is not None else None,
        )
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw_path.split(b"?", 1)[0]
        target = upstream.base_path + rewrite_path(self.route, raw_path)
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        body: AsyncIterator[bytes] | None = None
        if has_body(raw_headers):
            body = self.channel.body()
        else:
            self.channel.no_body()
        return scope["method"], target, out_headers, body

    async def send_upstream(self) -> httpx.Response | None:
        """The upstream's response, or None when the exchange ended before it: the client
        went, or the proxy answered with its own error."""
        plan = self.hop.retry_plans.get(id(self.route))
        try:
            if plan is None:
                response = await self.upstream.send(self._request())
            else:
                method, target, headers, body = self._parts()
                build = functools.partial(self._build, method, target, headers)
                retrying = Retrying(plan, self.upstream, self.exchange, self.hop.observer)
                response = await retrying.send(method, body, build)
            self.exchange.upstream_addr = self.upstream.address_of(response.request)
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
            if self._sent is not None:
                self.exchange.upstream_addr = self.upstream.address_of(self._sent)
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
                edits=self.response_edits,
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

    @property
    def response_edits(self) -> HeaderEdits | None:
        return self.policy.response_headers if self.policy is not None else None

    async def fail(self, reason: Reason, error: str | None = None) -> None:
        """Answer with the proxy's own error for ``reason``, naming the upstream."""
        await self.hop.send_error(
            self.send, self.exchange, reason, self.upstream.name, error, self.response_edits
        )

    def _failed(self, exc: BaseException) -> Reason:
        reason = classify(exc)
        self.exchange.reason = reason
        if reason is Reason.RESET:
            self.exchange.disconnected(Side.UPSTREAM)
        return reason
