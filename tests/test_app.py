"""The proxy listener is a FastAPI app: routes and middleware added through
``server.app_hook`` are served beside the proxy, over real sockets."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from fastapi import FastAPI

from service.app import Relay
from service.config import Settings
from tests.support.http import http_client
from tests.support.relays import one_upstream, run_relay
from tests.support.scripted import ScriptedUpstream, respond

pytestmark = pytest.mark.usefixtures("no_error_logs")
HOOK = "tests.support.app_hook_example:customize"


async def test_app_hook_routes_and_middleware_beside_the_proxy() -> None:
    upstream = ScriptedUpstream({"/x": respond(200, b"proxied"), "/_relay": respond(200, b"up")})
    config = {**one_upstream("http://placeholder"), "server": {"app_hook": HOOK}}
    async with upstream.running():
        config["upstreams"]["up"]["url"] = upstream.url
        async with run_relay(config) as relay, http_client() as client:
            assert isinstance(relay.relay.app, FastAPI)
            own = await client.get(f"{relay.url}/_relay/hello")
            proxied = await client.get(f"{relay.url}/x")
            # Not the hook's route: the proxy answers everything no app route matched.
            beside = await client.get(f"{relay.url}/_relay")
    assert own.json() == {"hello": "from the app hook"}
    assert own.headers["x-relay-hook"] == "1"
    assert proxied.content == b"proxied" and proxied.headers["x-relay-hook"] == "1"
    assert "via" in proxied.headers
    assert beside.content == b"up"
    assert [r.path for r in upstream.seen] == ["/x", "/_relay"]


async def test_a_relay_in_this_process_leaves_its_garbage_collector_alone() -> None:
    """GC tuning is process-wide: the serving process's entry point does it, a relay that a
    test (or any embedding program) starts does not."""
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    upstream = ScriptedUpstream({"/x": respond(200, b"ok")})
    async with upstream.running():
        config = one_upstream(upstream.url)
        async with run_relay(config) as relay, http_client() as client:
            assert (await client.get(f"{relay.url}/x")).content == b"ok"
            assert (gc.get_threshold(), gc.get_freeze_count()) == (thresholds, frozen)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (thresholds, frozen)


def test_relay_is_a_fastapi_app_whose_default_is_the_proxy() -> None:
    relay = Relay(Settings(**one_upstream("http://127.0.0.1:9")))
    assert isinstance(relay.app, FastAPI)
    assert relay.app.router.default is relay.proxy
    assert relay.app.openapi_url is None  # no schema or docs routes shadow upstream paths


@pytest.mark.live
@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("tests.no_such_module:customize", "No module named 'tests.no_such_module'"),
        ("tests.support.app_hook_example:missing", "has no attribute 'missing'"),
        ("tests.support.app_hook_example:not_callable", "is not callable"),
    ],
)
def test_broken_app_hook_stops_the_start_naming_the_field(hook: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--check-config"],
        env={"RELAY_SERVER__APP_HOOK": hook, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay: server.app_hook: "), result.stderr
    assert message in lines[0]
