"""A sink for the benchmarks: reads and discards request bodies, and stands in for an OTLP
collector (loopback only).

    python bench/sink.py --port PORT

Any method on any path: the whole request body is read as it arrives (streamed, never held)
and thrown away, then the answer is 200 with ``{"bytes": N}``, the body length received, so
a caller can check that an upload arrived whole. ``POST /v1/traces`` is the OTLP/HTTP traces
endpoint: it answers 200 with an empty ``ExportTraceServiceResponse`` and counts the spans
(when opentelemetry-proto is installed) and bytes. ``GET /stats`` answers those counters as
JSON.

Standalone on purpose, like every server in ``bench/``: its own process with no import from
``service/`` or ``tests/``, so its CPU is never Relay's and it runs unchanged against a
baseline revision (``compare.py --baseline``). The test servers live in ``tests/support/``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvloop
from aiohttp import web

LOOPBACK = "127.0.0.1"

EXPORT_REQUEST: Any
try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest as EXPORT_REQUEST,
    )
except ImportError:  # spans are then not counted, only requests and bytes
    EXPORT_REQUEST = None


class Sink:
    def __init__(self) -> None:
        self.stats: dict[str, int] = {"exports": 0, "export_bytes": 0, "spans": 0, "uploads": 0}

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.stats["exports"] += 1
        self.stats["export_bytes"] += len(body)
        if EXPORT_REQUEST is not None and request.content_type.endswith("protobuf"):
            export = EXPORT_REQUEST.FromString(body)
            self.stats["spans"] += sum(
                len(scope.spans) for rs in export.resource_spans for scope in rs.scope_spans
            )
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def discard(self, request: web.Request) -> web.Response:
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
        if received:
            self.stats["uploads"] += 1
        return web.Response(text=json.dumps({"bytes": received}), content_type="application/json")


def app() -> web.Application:
    sink = Sink()
    application = web.Application()
    application.router.add_post("/v1/traces", sink.traces)
    application.router.add_get("/stats", sink.get_stats)
    application.router.add_route("*", "/{tail:.*}", sink.discard)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        app(),
        host=LOOPBACK,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
