"""Logs: one JSON (or text) access line per exchange, level honoured, trace ids attached."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider

from service.config import LogConfig
from service.errors import Reason
from service.exchange import Exchange, Side
from service.telemetry.logs import AccessLogObserver, configure


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
    exchange.request_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    exchange.client_addr, exchange.peer_addr = "198.51.100.9", "10.0.0.2"
    exchange.user_agent = "curl/8.5.0 (x86_64-pc-linux-gnu) libcurl"
    exchange.http_version = "1.1"
    exchange.status = exchange.upstream_status = 200
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
    assert line["request_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert (line["client_addr"], line["peer_addr"]) == ("198.51.100.9", "10.0.0.2")
    assert line["user_agent"] == "curl/8.5.0 (x86_64-pc-linux-gnu) libcurl"
    assert line["http_version"] == "1.1"
    assert line["upstream_status"] is None  # the client got the upstream's 200 (then left)


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
    # The control: the same exchange, logged the same way, with the access log on.
    configure(LogConfig(access_log=True))
    AccessLogObserver().finished(finished_exchange())
    assert json.loads(capsys.readouterr().out.strip())["logger"] == "relay.access"
    configure(LogConfig(access_log=False))
    AccessLogObserver().finished(finished_exchange())
    logging.getLogger("relay.proxy").warning("other lines still go out")
    out = capsys.readouterr().out
    assert "relay.access" not in out
    assert json.loads(out.strip())["message"] == "other lines still go out"


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


RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_time_is_rfc3339_utc_with_milliseconds(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="json"))
    before = time.time()
    logging.getLogger("relay.server").warning("now")
    AccessLogObserver().finished(finished_exchange())
    after = time.time()
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    for line in lines:
        assert RFC3339_MS_UTC.match(line["time"]), line["time"]
        stamp = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before - 0.001 <= stamp.timestamp() <= after


def test_text_access_line_has_every_json_field(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="json"))
    exchange = finished_exchange()
    AccessLogObserver().finished(exchange)
    as_json = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    configure(LogConfig(format="text"))
    AccessLogObserver().finished(exchange)
    text = capsys.readouterr().out.strip().splitlines()[-1]
    stamp, level, logger, rest = text.split(" ", 3)
    assert RFC3339_MS_UTC.match(stamp)
    assert (level, logger) == ("INFO", "relay.access")
    assert rest.startswith(f"GET /users/7 200 {as_json['duration_ms']:.1f}ms ")
    pairs = text_pairs(rest)
    skipped = {"time", "level", "logger", "message", "method", "path", "status", "duration_ms"}
    expected = {k: v for k, v in as_json.items() if k not in skipped and v is not None}
    assert set(pairs) == set(expected)
    assert pairs["headers_ms"] == f"{as_json['headers_ms']:.1f}"
    for key in ("route", "upstream", "outcome", "disconnect_side", "disconnect_phase"):
        assert pairs[key] == as_json[key]
    for key in ("request_id", "client_addr", "peer_addr", "user_agent", "http_version"):
        assert pairs[key] == as_json[key]
    assert pairs["response_bytes"] == "1234"
    # A value with spaces is one JSON string, so the line still splits into its pairs.
    assert ' user_agent="curl/8.5.0 (x86_64-pc-linux-gnu) libcurl"' in rest


PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def text_pairs(text: str) -> dict[str, str]:
    return {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in PAIR.findall(text)
    }


def test_upstream_status_only_when_the_client_got_something_else(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(LogConfig(format="json"))
    cut = finished_exchange()
    cut.disconnect_side = cut.disconnect_phase = None
    cut.reason = Reason.RESET  # the upstream failed mid-body: the client got a cut 200
    replaced = Exchange(method="GET", route="api", upstream="api", path="/")
    replaced.upstream_status = 101
    replaced.fail(Reason.PROTOCOL)
    for exchange in (finished_exchange(), cut, replaced):
        AccessLogObserver().finished(exchange)
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(line["status"], line["upstream_status"]) for line in lines] == [
        (200, None),
        (200, 200),
        (502, 101),
    ]


def sampled(kind: str) -> Exchange:
    exchange = Exchange(method="GET", route="api", upstream="api", path=f"/{kind}")
    exchange.status = {"ok": 200, "redirect": 302, "not_found": 404, "failed": 503}.get(kind)
    exchange.response_started = exchange.response_complete = kind != "incomplete"
    if kind == "client_gone":
        exchange.status = 200
        exchange.response_complete = False
        exchange.disconnected(Side.CLIENT)
    if kind == "failed":
        exchange.reason = Reason.CONNECT
    if kind == "incomplete":
        exchange.status = 200
        exchange.response_started = True
    return exchange


def test_access_sample_keeps_every_error_and_one_in_n_successes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(LogConfig(format="json", access_sample=4))
    observer = AccessLogObserver(sample=4)
    kinds = ["ok", "redirect", "not_found", "ok", "client_gone", "ok", "failed", "ok"]
    kinds += ["incomplete", "ok", "ok", "ok", "ok"]
    for kind in kinds:
        observer.finished(sampled(kind))
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    # Successes (ok, redirect) are counted: the 1st, 5th and 9th are kept.
    assert [line["path"] for line in lines] == [
        "/ok",
        "/not_found",
        "/client_gone",
        "/failed",
        "/ok",
        "/incomplete",
        "/ok",
    ]
    assert [line["outcome"] for line in lines] == [
        "ok",
        "ok",
        "client_disconnect",
        "connect",
        "ok",
        "incomplete",
        "ok",
    ]


def test_text_quotes_values_that_would_break_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="text"))
    exchange = finished_exchange()
    exchange.path = '/a b\n"c"'
    AccessLogObserver().finished(exchange)
    logging.getLogger("relay.server").info("listening", extra={"address": "http://[::1]:80 x"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert ' GET "/a b\\n\\"c\\"" 200 ' in lines[0]
    assert lines[1].endswith(' listening address="http://[::1]:80 x"')


def test_text_trace_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure(LogConfig(format="text"))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        AccessLogObserver().finished(finished_exchange())
        context = span.get_span_context()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f" trace_id={context.trace_id:032x} span_id={context.span_id:016x}" in line


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_uvicorn_lines_do_not_say_error_unless_they_are(
    capsys: pytest.CaptureFixture[str], log_format: str
) -> None:
    configure(LogConfig(format=log_format))
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.info("something the server says")
    uvicorn_error.error("Exception in ASGI application")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2
    assert "error" not in out[0].lower()
    if log_format == "json":
        info, error = (json.loads(line) for line in out)
        assert (info["logger"], info["level"]) == ("uvicorn", "INFO")
        assert (error["logger"], error["level"]) == ("uvicorn", "ERROR")
    else:
        assert out[0].split(" ")[1:3] == ["INFO", "uvicorn"]
        assert out[1].split(" ")[1:3] == ["ERROR", "uvicorn"]


def test_uvicorn_lifecycle_lines_are_left_to_the_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(LogConfig(format="text"))
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.info("Started server process [%d]", 12)
    uvicorn_error.info("Waiting for application startup.")
    uvicorn_error.info("Application startup complete.")
    uvicorn_error.info("Uvicorn running on %s://%s:%d (Press CTRL+C to quit)", "http", "x", 1)
    uvicorn_error.info("Shutting down")
    uvicorn_error.info("Finished server process [%d]", 12)
    uvicorn_error.warning("Invalid HTTP request received.")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].endswith("WARNING uvicorn Invalid HTTP request received.")


def test_an_exchange_that_did_not_complete_is_never_ok(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(LogConfig(format="json"))
    exchange = Exchange(method="GET", route="api", upstream="api", path="/")
    exchange.mark_done()  # ended without a response and without a known cause
    AccessLogObserver().finished(exchange)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["status"], line["outcome"]) == (None, "incomplete")
