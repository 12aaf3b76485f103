"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` variables.

Spans come from the two stock instrumentations: ``opentelemetry-instrumentation-fastapi``
puts one server span around each exchange on the proxy app (it ends with the last body
message, so it covers the streamed body), and ``opentelemetry-instrumentation-httpx``'s
transport wrapper sits *inside* each upstream's retry policy, so every attempt is one
client span (a retried request shows two). The client span's context is what goes upstream
in ``traceparent``. Relay adds its own facts (route, upstream, reason, disconnects) to the
current span (``TracingObserver``) and to the client span through the instrumentation's
request hook; there is no second span implementation.

``tracing.instrumentation: native`` swaps both for Relay's own spans of the same shape
(``native_spans``), for deployments that trace at rates where the stock instrumentations'
cost per request matters.

Tracing is on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` names an exporter, and
off when ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Off means neither
instrumentation is installed (no per-request cost) and the proxy is not a hop in the trace:
an inbound ``traceparent`` then travels upstream as an ordinary end-to-end header.
The instrumentations' own knobs apply (``OTEL_PYTHON_FASTAPI_EXCLUDED_URLS``,
``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*``, ``OTEL_SEMCONV_STABILITY_OPT_IN``; the
stable HTTP conventions unless the operator chose otherwise). Spans are exported by a
background thread; a collector that is down costs dropped spans and a log line, never a
failed request.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import httpx
from fastapi import FastAPI
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_http_instrumentation
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, Status, StatusCode

from ..config import TracingConfig
from ..errors import FAILURES
from ..exchange import Exchange, ExchangeObserver, Side
from ..session import Session
from ..upstreams.attempt import resends_of
from .native_spans import RESEND_COUNT_ATTRIBUTE, ClientSpans, ServerSpans

log = logging.getLogger("relay.tracing")

DEFAULT_SERVICE_NAME = "relay"
SEMCONV_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
UPSTREAM_ATTRIBUTE = "relay.upstream"
REQUEST_ID_ATTRIBUTE = "relay.request_id"
NATIVE_SCOPE = "relay"  # the instrumentation scope of tracing.instrumentation: native
Instrumentation = Literal["stock", "native"]


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def exporter_from_env() -> SpanExporter | None:
    """The exporter the ``OTEL_*`` variables ask for, or None when tracing is off."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return None
    names = [n.strip() for n in _env("OTEL_TRACES_EXPORTER").lower().split(",") if n.strip()]
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not names:
        names = ["otlp"] if endpoint else []
    if not names or names == ["none"]:
        return None
    if names[0] == "console":
        return ConsoleSpanExporter()
    if names[0] != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported; using otlp", names[0])
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %s is not supported; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class Tracing:
    """A per-process tracer provider and the instrumentation that uses it.

    The provider is Relay's own, passed to the instrumentations, rather than the global
    one: several Relays in one process (the tests) each keep their own exporter. Relay's
    metrics are prometheus-client's, so the instrumentations get a no-op meter provider.
    """

    def __init__(
        self, processor: SpanProcessor, instrumentation: Instrumentation = "stock"
    ) -> None:
        # The stock instrumentations read this once per process, when the first is set up.
        os.environ.setdefault(SEMCONV_ENV, "http")
        attributes = {} if _env("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
        # Sampler: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself.
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(processor)
        self.instrumentation = instrumentation
        self._meters = NoOpMeterProvider()

    @classmethod
    def from_env(cls, config: TracingConfig) -> Tracing | None:
        exporter = exporter_from_env()
        if exporter is None:
            return None
        return cls(BatchSpanProcessor(exporter), config.instrumentation)

    def instrument_app(self, app: FastAPI) -> None:
        """One server span per exchange on ``app`` (before its middleware stack is built)."""
        if self.instrumentation == "native":
            app.add_middleware(ServerSpans, tracer=self.provider.get_tracer(NATIVE_SCOPE))
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            meter_provider=self._meters,
            # A span per ASGI message would be a span per body chunk of a stream.
            exclude_spans=["receive", "send"],
        )

    def wrap_transport(
        self, upstream: str, inner: httpx.AsyncBaseTransport
    ) -> httpx.AsyncBaseTransport:
        """One client span per attempt sent through ``inner``."""
        if self.instrumentation == "native":
            return ClientSpans(inner, self.provider.get_tracer(NATIVE_SCOPE), upstream)
        from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport

        async def name_upstream(span: Span, request: Any) -> None:
            if span.is_recording():
                span.set_attribute(UPSTREAM_ATTRIBUTE, upstream)
                resends = resends_of(request.extensions)
                if resends:
                    span.set_attribute(RESEND_COUNT_ATTRIBUTE, resends)

        traced = AsyncOpenTelemetryTransport(
            inner,
            tracer_provider=self.provider,
            meter_provider=self._meters,
            request_hook=name_upstream,
        )
        return _SampledOnly(traced)

    def shutdown(self) -> None:
        self.provider.shutdown()


class _SampledOnly(httpx.AsyncBaseTransport):
    """The httpx instrumentation only for requests whose server span records.

    A child of a span that was not sampled is not sampled either (every standard sampler
    decides alike for one trace), yet the instrumentation builds its attributes, parses
    the URL again and copies the headers before the sampler is asked: about a third of
    what tracing costs a request at 10% sampling (README, *Tracing*). For those requests
    it is suppressed through OpenTelemetry's own switch and only the trace context goes
    upstream, with the same decision, as the instrumentation would have sent it.
    """

    def __init__(self, traced: httpx.AsyncBaseTransport) -> None:
        self._traced = traced

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if trace.get_current_span().is_recording():
            return await self._traced.handle_async_request(request)
        propagate.inject(request.headers)
        with suppress_http_instrumentation():
            return await self._traced.handle_async_request(request)

    async def aclose(self) -> None:
        await self._traced.aclose()


def current_exemplar() -> dict[str, str] | None:
    """``trace_id`` of the active sampled span, for histogram exemplars."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x")}


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the active span to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def session_attributes(session: Session) -> dict[str, str | int]:
    """A WebSocket session's outcome on its server span (one span per session)."""
    attributes: dict[str, str | int] = {
        "relay.websocket.messages_to_upstream": session.messages_to_upstream,
        "relay.websocket.messages_to_client": session.messages_to_client,
    }
    if session.result is not None:
        attributes["relay.websocket.result"] = session.result.value
    if session.close_code is not None:
        attributes["relay.websocket.close_code"] = session.close_code
    if session.closed_by is not None:
        attributes["relay.websocket.closed_by"] = session.closed_by.value
    return attributes


class TracingObserver(ExchangeObserver):
    """Names the server span after the route and records the exchange's outcome on it.

    The server span is the current span while the proxy handles the exchange. It ends when
    the last body message is sent, so a proxy error response is recorded before it is sent
    (``failing``) and anything else when the exchange ends (``finished``): only a response
    that never completed still has a live span then.
    """

    def started(self, exchange: Exchange) -> None:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        if exchange.route_prefix is not None:
            span.update_name(f"{exchange.method} {exchange.route_prefix}")
            span.set_attribute("http.route", exchange.route_prefix)
        if exchange.route is not None:
            span.set_attribute("relay.route", exchange.route)
        if exchange.upstream is not None:
            span.set_attribute(UPSTREAM_ATTRIBUTE, exchange.upstream)
        if exchange.request_id is not None:
            span.set_attribute(REQUEST_ID_ATTRIBUTE, exchange.request_id)

    def failing(self, exchange: Exchange) -> None:
        self._record(exchange)
        exchange.traced = True

    def finished(self, exchange: Exchange) -> None:
        if not exchange.traced:
            self._record(exchange)

    def retrying(self, exchange: Exchange) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "retry",
                {
                    "relay.retry.reason": exchange.retry_reason or "",
                    RESEND_COUNT_ATTRIBUTE: exchange.retries,
                },
            )

    def retry_denied(self, exchange: Exchange) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("retry_budget_exhausted", {RESEND_COUNT_ATTRIBUTE: exchange.retries})

    def _record(self, exchange: Exchange) -> None:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        if exchange.disconnect_side is not None:
            span.add_event(
                f"{exchange.disconnect_side.value}_disconnect",
                {"relay.disconnect.phase": str(exchange.disconnect_phase)},
            )
        if exchange.reason is not None:
            span.set_attribute("relay.reason", exchange.reason.value)
            span.set_attribute("error.type", exchange.reason.value)
            span.add_event("proxy_error", {"relay.reason": exchange.reason.value})
            span.set_status(Status(StatusCode.ERROR, FAILURES[exchange.reason].text))
        elif exchange.disconnect_side is Side.CLIENT:
            span.set_attribute("relay.reason", "client_disconnect")
        session = exchange.websocket
        if session is not None:
            span.set_attributes(session_attributes(session))
