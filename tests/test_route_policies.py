"""Per-route policies over real sockets: a route's timeouts replace its upstream's, its total
timeout bounds the whole exchange (504 before the response headers, a cut response after),
and its header policies set and remove fields both ways; bad policies are refused at load."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.config import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("no_error_logs")

PROMPT = 5  # answered by the proxy, far below the client's own 10 s timeout


def policy_config(
    url: str, routes: list[dict[str, Any]], transport: str = "aiohttp", **upstream: Any
) -> dict[str, Any]:
    """One upstream ``up`` (slow timeouts unless given) behind ``routes``."""
    upstream.setdefault("timeouts", {"read": 5})
    return {
        "upstreams": {"up": {"url": url, "transport": transport, **upstream}},
        "routes": [{"upstream": "up", **route} for route in routes],
    }


Records = Callable[[], list[logging.LogRecord]]


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Records:
    """The access records logged so far in the test, in order."""
    monkeypatch.setattr(logging.getLogger("relay.access"), "disabled", False)
    caplog.set_level(logging.INFO, logger="relay.access")
    return lambda: [r for r in caplog.records if r.name == "relay.access"]


def total_timeouts(metrics: str) -> float:
    prefix = 'relay_upstream_errors_total{reason="total_timeout",upstream="up"} '
    (line,) = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


async def timed_get(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.get(url)
    return response, time.monotonic() - started


def assert_proxy_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["proxy-status"] == f'relay; error={error}; next-hop="up"'


# Config: refused at load, one line naming the field


def load(tmp_path: Path, route: dict[str, Any], **top: Any) -> Any:
    config = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "routes": [{"prefix": "/", "upstream": "api", **route}],
        **top,
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {"request_headers": {"set": {"Host": "x"}}},
            "routes.0.request_headers.set: 'Host' cannot be set by a header policy: "
            "the proxy writes Host and the message framing itself",
        ),
        (
            {"request_headers": {"set": {"transfer-encoding": "chunked"}}},
            "routes.0.request_headers.set: 'transfer-encoding' cannot be set",
        ),
        (
            {"response_headers": {"set": {"Content-Length": "1"}}},
            "routes.0.response_headers.set: 'Content-Length' cannot be set",
        ),
        (
            {"request_headers": {"set": {"X-Forwarded-For": "1.2.3.4"}}},
            "routes.0.request_headers.set: 'X-Forwarded-For' cannot be set by a header "
            "policy: a forwarding field, kept or dropped by server.trusted_proxies only",
        ),
        (
            {"request_headers": {"set": {"X-Forwarded-Ssl": "on"}}},
            "routes.0.request_headers.set: 'X-Forwarded-Ssl' cannot be set",
        ),
        (
            {"request_headers": {"remove": ["Forwarded"]}},
            "routes.0.request_headers.remove: 'Forwarded' cannot be removed",
        ),
        (
            {"response_headers": {"remove": ["Via"]}},
            "routes.0.response_headers.remove: 'Via' cannot be removed",
        ),
        (
            {"request_headers": {"remove": ["Keep-Alive"]}},
            "routes.0.request_headers.remove: 'Keep-Alive' cannot be removed by a header "
            "policy: a hop-by-hop field, never forwarded",
        ),
        (
            {"response_headers": {"set": {"proxy-status": "x"}}},
            "routes.0.response_headers.set: 'proxy-status' cannot be set",
        ),
        (
            {"response_headers": {"set": {"x-request-id": "x"}}},
            "routes.0.response_headers.set: 'x-request-id' cannot be set by a header policy: "
            "it is the request id field (request_id.header)",
        ),
        (
            {"request_headers": {"set": {"X-A": "a\r\nX-Injected: 1"}}},
            "routes.0.request_headers.set: 'X-A': a value holds visible ASCII, spaces and "
            "tabs only (no CR, LF, NUL or other controls)",
        ),
        ({"request_headers": {"set": {"X-A": "a\x00"}}}, "routes.0.request_headers.set: 'X-A'"),
        ({"request_headers": {"set": {"X-A": "café"}}}, "routes.0.request_headers.set: 'X-A'"),
        (
            {"response_headers": {"set": {"X-A": "a "}}},
            "routes.0.response_headers.set: 'X-A': a value must not start or end with a space",
        ),
        (
            {"response_headers": {"set": {"X-A": 5}}},
            "routes.0.response_headers.set.X-A: Input should be a valid string",
        ),
        (
            {"response_headers": {"set": {"Bad Name": "x"}}},
            "routes.0.response_headers.set: 'Bad Name' is not a valid header field name",
        ),
        (
            {"response_headers": {"set": {"X-A": "1", "x-a": "2"}}},
            "routes.0.response_headers.set: 'x-a' and 'X-A' are the same field",
        ),
        (
            {"response_headers": {"set": {"X-A": "1"}, "remove": ["X-a"]}},
            "routes.0.response_headers: 'x-a' is both set and removed",
        ),
        ({"response_headers": {"add": {"X-A": "1"}}}, "routes.0.response_headers.add: unknown"),
        ({"timeouts": {"total": 0}}, "routes.0.timeouts.total: Input should be greater than 0"),
        ({"timeouts": {"read": "soon"}}, "routes.0.timeouts.read: Input should be a valid number"),
        ({"timeouts": {"idle": 1}}, "routes.0.timeouts.idle: unknown field"),
    ],
)
def test_bad_policies_are_refused_in_one_line_naming_the_field(
    tmp_path: Path, route: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, route)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"invalid config: {message}"), text


def test_the_configured_request_id_field_is_the_one_refused(tmp_path: Path) -> None:
    policy = {"request_headers": {"remove": ["X-Trace-Id"]}}
    with pytest.raises(ConfigError, match=r"routes\.0\.request_headers\.remove: 'X-Trace-Id'"):
        load(tmp_path, policy, request_id={"header": "x-trace-id"})
    assert load(
        tmp_path,
        {"request_headers": {"remove": ["X-Request-Id"]}},
        request_id={"header": "x-trace-id"},
    )
