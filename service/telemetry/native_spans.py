"""``tracing.instrumentation: native``: the same two spans as the stock instrumentations,
made directly on the OpenTelemetry SDK, for deployments that trace at high rates.

OpenTelemetry's SDK (tracer provider, samplers, W3C propagator, batch export) does the
tracing; this module only decides where spans start and end. The stock FastAPI and httpx
instrumentations (the default) build every attribute and parse the URL again before the
sampler is asked, so a request they do not sample still costs several times what it costs
here: figures in the README (*Tracing*). Here an unsampled request costs a context extract,
a sampler call and an inject, and attributes are built only for spans that record. Span
names, kinds, parentage and attribute names (the stable HTTP semantic conventions) are the
stock ones; tests/test_tracing.py runs the same checks on both.
"""

from __future__ import annotations

from typing import Any

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..exchange import bare_host
from ..upstreams.attempt import resends_of

_PROPAGATOR = TraceContextTextMapPropagator()
# Set on the client span of an attempt that sends its request again (semantic conventions:
# the ordinal of the resend, so 1 on the first retry); absent on first attempts.
RESEND_COUNT_ATTRIBUTE = "http.request.resend_count"


class _ScopeHeaders(Getter[Scope]):
    """Reads ``traceparent``/``tracestate`` straight from the ASGI header list."""

    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.encode()
        values = [v.decode("latin-1") for n, v in carrier["headers"] if n == name]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        return [n.decode("latin-1") for n, _ in carrier["headers"]]


_SCOPE_HEADERS = _ScopeHeaders()


class ServerSpans:
    """ASGI middleware: one server span around each HTTP exchange, made current for it
    (added with ``app.add_middleware(ServerSpans, tracer=...)``).

    The span ends when the application returns, so it covers the streamed body too. The
    proxy names it after the route and records its outcome (``tracing.TracingObserver``).
    """

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _TRACED:
            await self.app(scope, receive, send)
            return
        parent = _PROPAGATOR.extract(scope, getter=_SCOPE_HEADERS)
        method = scope.get("method", "GET")  # a WebSocket handshake's scope has none
        span = self._tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        recording = span.is_recording()
        downstream = send
        if recording:
            span.set_attributes(_server_attributes(scope))

            async def downstream(message: Message) -> None:
                if message["type"] == "websocket.accept":
                    span.set_attribute("http.response.status_code", 101)
                elif message["type"] in _RESPONSE_STARTS:
                    status: int = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

        try:
            await self.app(scope, receive, downstream)
        except Exception as exc:
            if recording:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            span.end()
            otel_context.detach(token)


# One span per WebSocket session too, covering it whole (no span per message).
_TRACED = frozenset({"http", "websocket"})
_RESPONSE_STARTS = frozenset({"http.response.start", "websocket.http.response.start"})


def _server_attributes(scope: Scope) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": scope.get("method", "GET"),
        "url.scheme": scope.get("scheme", "http"),
        "url.path": scope["path"],
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if scope.get("query_string"):
        attributes["url.query"] = scope["query_string"].decode("latin-1")
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
        attributes["client.port"] = client[1]
    for name, value in scope["headers"]:
        if name == b"host":
            attributes["server.address"] = bare_host(value.decode("latin-1"))
        elif name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
    return attributes


class ClientSpans(httpx.AsyncBaseTransport):
    """An httpx transport wrapper: one client span per request sent, context sent along.

    The span ends with the response headers (the body belongs to the server span), as in
    the stock httpx instrumentation. ``traceparent`` is sent upstream whether or not the
    span is sampled, so the upstream continues the same trace and sampling decision.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, tracer: Tracer, upstream: str) -> None:
        self._inner = inner
        self._tracer = tracer
        self._upstream = upstream

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        parent = trace.get_current_span()
        if not parent.is_recording() and parent.get_span_context().is_valid:
            # Sampled out: a child would be dropped as well (every standard sampler decides
            # alike for one trace), so only the context goes upstream, with the same decision.
            _PROPAGATOR.inject(request.headers, context=trace.set_span_in_context(parent))
            return await self._inner.handle_async_request(request)
        span = self._tracer.start_span(request.method, kind=SpanKind.CLIENT)
        recording = span.is_recording()
        if recording:
            url = request.url
            span.set_attributes(
                {
                    "http.request.method": request.method,
                    "url.full": str(url),
                    "server.address": url.host,
                    "server.port": url.port or (443 if url.scheme == "https" else 80),
                    "relay.upstream": self._upstream,
                }
            )
            resends = resends_of(request.extensions)
            if resends:
                span.set_attribute(RESEND_COUNT_ATTRIBUTE, resends)
        _PROPAGATOR.inject(request.headers, context=trace.set_span_in_context(span))
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:
            if recording:
                span.set_attribute("error.type", type(exc).__qualname__)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            raise
        except BaseException:
            span.end()  # cancelled: the client went away, the server span says so
            raise
        if recording:
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_attribute("error.type", str(response.status_code))
                span.set_status(Status(StatusCode.ERROR))
        span.end()
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
