"""Active health checks over real sockets: the state flips after exactly the thresholds, a
failing endpoint gets no requests, and when none passes the upstream answers 503
no_healthy_endpoint at once."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.endpoints import Pod, balanced_upstream, get_many, pods, states
from tests.support.http import http_client
from tests.support.metrics import metric
from tests.support.net import eventually
from tests.support.relays import RunningRelay, run_relay
from tests.support.scripted import Handler, Request, Writer, respond

pytestmark = pytest.mark.usefixtures("no_error_logs")

CHECK = {"interval_seconds": 0.05, "timeout_seconds": 1}


class Health:
    """A /healthz answering 200 or 503 as the test says, noting the state its endpoint had
    in the proxy when each check arrived."""

    def __init__(self) -> None:
        self.passing = True
        self.relay: RunningRelay | None = None
        self.address = ""
        self.seen: list[tuple[bool, str]] = []  # (passing, state at arrival)

    def handler(self) -> Handler:
        async def healthz(request: Request, writer: Writer) -> None:
            state = "?"
            if self.relay is not None:
                balancer = self.relay.relay.upstreams()["up"].balancer
                assert balancer is not None
                endpoint = balancer.endpoints.by_address.get(self.address)
                state = endpoint.state.value if endpoint is not None else "-"
            self.seen.append((self.passing, state))
            await respond(200 if self.passing else 503, b"")(request, writer)

        return healthz


def with_checks(pods_: list[Pod], **check: Any) -> dict[str, Any]:
    return balanced_upstream(
        "http://api.example:8080",
        endpoints=[f"http://{pod.address}" for pod in pods_],
        health_check={"path": "/healthz", **CHECK, **check},
    )


async def test_health_checks_flip_state_with_the_thresholds() -> None:
    health = Health()
    async with pods({"/ok": respond(200, b"ok")}, ("127.0.0.2", "127.0.0.3")) as (good, flaky):
        flaky.server.handlers["/healthz"] = health.handler()
        good.server.handlers["/healthz"] = respond(200, b"")
        config = with_checks([good, flaky], unhealthy_threshold=3, healthy_threshold=2)
        async with run_relay(config) as relay:
            health.relay, health.address = relay, flaky.address
            health.passing = False
            await eventually(lambda: len([s for s in health.seen if not s[0]]) >= 4)
            failing = [state for passing, state in health.seen if not passing]
            # Taken out after the third failure in a row, not before.
            assert failing[:4] == ["healthy", "healthy", "healthy", "unhealthy"], failing
            assert (await states(relay.admin_url))[flaky.address] == "unhealthy"
            assert await metric(relay, "relay_upstream_endpoints", state="unhealthy") == 1
            assert await get_many(relay.url, 10) == [200] * 10
            assert not any(r.path == "/ok" for r in flaky.server.seen)
            health.seen.clear()
            health.passing = True
            await eventually(lambda: len(health.seen) >= 3)
            passing = [state for _, state in health.seen]
            # Back after the second pass in a row.
            assert passing[:3] == ["unhealthy", "unhealthy", "healthy"], passing
            assert await metric(relay, "relay_upstream_health_checks_total", result="failure") >= 3
            assert await metric(relay, "relay_upstream_health_checks_total", result="success") > 0
            seen = flaky.server.seen[-1]
            assert (seen.path, seen.headers["host"]) == ("/healthz", "api.example:8080")


async def test_every_endpoint_failing_answers_503_at_once(transport: str) -> None:
    async with pods({"/ok": respond(200, b"ok")}, ("127.0.0.2",)) as (pod,):
        # No endpoints list: url's own host is the one endpoint, checked.
        config = balanced_upstream(
            f"http://{pod.address}",
            transport=transport,
            health_check={"path": "/healthz", **CHECK, "unhealthy_threshold": 1},
        )
        async with run_relay(config) as relay, http_client(timeout=5) as client:
            up = relay.relay.upstreams()["up"]
            assert up.balancer is not None
            # /healthz is not served: 404 fails the check.
            await eventually(lambda: not up.balancer.endpoints.eligible)
            response = await client.get(f"{relay.url}/ok")
            assert response.status_code == 503
            assert "error=destination_unavailable" in response.headers["proxy-status"]
            assert not any(r.path == "/ok" for r in pod.server.seen)
            assert (
                await metric(relay, "relay_upstream_errors_total", reason="no_healthy_endpoint")
                == 1
            )
