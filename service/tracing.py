"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` variables.

One server span per proxied request (covering the whole streamed response) and one client
span per upstream attempt (an httpx transport wrapper *inside* the retry policy, so a
retried request shows two attempts); see ``spans``. The client span's context is what goes
upstream in ``traceparent``.

Tracing is on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` names an exporter, and
off when ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Off means nothing is
instrumented at all (no per-request cost) and the proxy is not a hop in the trace: an
inbound ``traceparent`` then travels upstream as an ordinary end-to-end header.
Spans are exported by a background thread; a collector that is down costs dropped spans
and a log line, never a failed request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import httpx
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp

from .errors import FAILURES
from .exchange import Exchange, Side
from .spans import ClientSpans, ServerSpans

log = logging.getLogger("relay.tracing")

DEFAULT_SERVICE_NAME = "relay"
TransportWrapper = Callable[[str, httpx.AsyncBaseTransport], httpx.AsyncBaseTransport]


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
    """A per-process tracer provider and the instrumentation that uses it."""

    def __init__(self, processor: SpanProcessor) -> None:
        attributes = {} if _env("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
        # Sampler: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself.
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("relay")

    @classmethod
    def from_env(cls) -> Tracing | None:
        exporter = exporter_from_env()
        return cls(BatchSpanProcessor(exporter)) if exporter is not None else None

    def instrument_app(self, app: ASGIApp) -> ASGIApp:
        return ServerSpans(app, self._tracer)

    def wrap_transport(
        self, upstream: str, inner: httpx.AsyncBaseTransport
    ) -> httpx.AsyncBaseTransport:
        return ClientSpans(inner, self._tracer, upstream)

    def shutdown(self) -> None:
        self.provider.shutdown()


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


class TracingObserver:
    """Names the server span after the route and records the exchange's outcome on it."""

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
            span.set_attribute("relay.upstream", exchange.upstream)

    def headers(self, exchange: Exchange) -> None:
        pass

    def __init__(self) -> None:
        self._recorded: set[int] = set()

    def failing(self, exchange: Exchange) -> None:
        # The server span ends with the last body message, so a proxy error response is
        # recorded before it is sent.
        self._record(exchange)
        self._recorded.add(id(exchange))

    def finished(self, exchange: Exchange) -> None:
        if id(exchange) in self._recorded:
            self._recorded.discard(id(exchange))
            return
        self._record(exchange)

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
