"""Logs: one JSON (or text) access line per exchange, level honoured, trace ids attached."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from service.config import LogConfig
from service.exchange import Exchange, Side
from service.logs import AccessLogObserver, configure


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("relay.access").disabled = False


def finished_exchange() -> Exchange:
    exchange = Exchange(method="GET", route="api", upstream="api", path="/users/7")
    exchange.status = 200
    exchange.mark_headers()
    exchange.response_started = True
    exchange.response_bytes = 1234
    exchange.disconnected(Side.CLIENT)
    exchange.mark_done()
    return exchange


def test_json_access_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="json", level="INFO"))
    AccessLogObserver().finished(finished_exchange())
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["logger"] == "relay.access"
    assert line["level"] == "INFO"
    assert (line["method"], line["path"], line["route"], line["upstream"]) == (
        "GET",
        "/users/7",
        "api",
        "api",
    )
    assert line["status"] == 200
    assert line["outcome"] == "client_disconnect"
    assert (line["disconnect_side"], line["disconnect_phase"]) == ("client", "body")
    assert line["response_bytes"] == 1234
    assert line["duration_ms"] >= line["headers_ms"] >= 0


def test_trace_ids_in_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="json"))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        logging.getLogger("relay.proxy").warning("something")
        context = span.get_span_context()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")


def test_text_format_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="text", level="WARNING"))
    AccessLogObserver().finished(finished_exchange())  # INFO: below the level
    logging.getLogger("relay.proxy").warning("upstream %s slow", "api")
    out = capsys.readouterr().out
    assert "relay.access" not in out
    assert "WARNING relay.proxy upstream api slow" in out
    assert not out.lstrip().startswith("{")


def test_access_log_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(access_log=False))
    AccessLogObserver().finished(finished_exchange())
    assert "relay.access" not in capsys.readouterr().out


def test_only_the_deliberate_abort_message_is_filtered(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="text"))
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.error("ASGI callable returned without completing response.")
    uvicorn_error.error("Exception in ASGI application")
    out = capsys.readouterr().out
    assert "without completing response" not in out
    assert "Exception in ASGI application" in out


def test_concurrency_refusals_are_summarised(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="text"))
    uvicorn_error = logging.getLogger("uvicorn.error")
    for _ in range(500):
        uvicorn_error.warning("Exceeded concurrency limit.")
    uvicorn_error.warning("something else")
    out = capsys.readouterr().out
    assert out.count("Exceeded concurrency limit.") == 1
    assert "something else" in out
