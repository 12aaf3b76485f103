"""Tracing for a relay in the test process: spans kept in memory, exported as each ends."""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.telemetry.tracing import Instrumentation, Tracing


def in_memory(mode: Instrumentation) -> tuple[Tracing, InMemorySpanExporter]:
    """A ``Tracing`` for ``run_relay(..., tracing=...)`` and the exporter holding its spans."""
    exporter = InMemorySpanExporter()
    return Tracing(SimpleSpanProcessor(exporter), mode), exporter
