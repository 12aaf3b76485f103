"""A minimal OTLP/HTTP trace receiver: the real wire check for the proxy's exporter.

It accepts ``POST /v1/traces`` with an ``ExportTraceServiceRequest`` protobuf body (as sent
by opentelemetry-exporter-otlp-proto-http) and keeps the decoded spans.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    service_name: str
    attributes: dict[str, object]
    status_code: int
    scope: str  # the instrumentation scope's name
    events: tuple[str, ...]


class Receiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self._lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                service = ""
                for attr in resource_spans.resource.attributes:
                    if attr.key == "service.name":
                        service = attr.value.string_value
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes: dict[str, object] = {}
                        for attr in span.attributes:
                            value = attr.value
                            kind = value.WhichOneof("value")
                            attributes[attr.key] = getattr(value, kind) if kind else None
                        self.spans.append(
                            ReceivedSpan(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                service_name=service,
                                attributes=attributes,
                                status_code=span.status.code,
                                scope=scope_spans.scope.name,
                                events=tuple(event.name for event in span.events),
                            )
                        )

    def wait_for(self, predicate: object, timeout: float = 15.0) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` is true; return the spans."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"spans never satisfied the condition; got {self.spans!r}")


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            receiver.add(body)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", receiver
    finally:
        server.shutdown()
        server.server_close()
