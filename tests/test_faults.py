"""Fault injection, both transports: every upstream fault (tests/support/chaos.py) ends in
the right status or a truncated response, is counted under the right reason and disconnect
phase, logs no error, returns every pool slot, and leaves well-behaved requests running at
the same time (to another upstream and to the faulty one) byte-exact."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.errors import FAILURES, Reason
from tests.support.chaos import SMUGGLED, ChaosUpstream, payload
from tests.support.http import http_client
from tests.support.metrics import metric
from tests.support.net import closed_port, eventually
from tests.support.relays import RunningRelay, pool_settled, run_relay
from tests.support.wire import connect

pytestmark = pytest.mark.usefixtures("no_error_logs")

UPSTREAMS = ("chaos", "healthy", "dead")
READ_TIMEOUT = 0.5
BODILESS = ("GET", "HEAD", "OPTIONS", "DELETE")
WITH_BODY = ("POST", "PATCH", "PUT")


def config(
    transport: str,
    chaos: ChaosUpstream,
    healthy: ChaosUpstream,
    *,
    pool: int = 8,
    timeouts: dict[str, float] | None = None,
) -> dict[str, Any]:
    def upstream(url: str) -> dict[str, Any]:
        return {
            "url": url,
            "transport": transport,
            "pool": {"max_connections": pool, "max_keepalive_connections": pool},
            "timeouts": {"read": 5, "pool": 5, **(timeouts or {})},
        }

    return {
        "upstreams": {
            "chaos": upstream(chaos.url),
            "healthy": upstream(healthy.url),
            "dead": upstream(f"http://127.0.0.1:{closed_port()}"),
        },
        "routes": [
            {"prefix": "/h", "upstream": "healthy", "strip_prefix": True},
            {"prefix": "/dead", "upstream": "dead", "strip_prefix": True},
            {"prefix": "/", "upstream": "chaos"},
        ],
    }


@dataclass
class World:
    relay: RunningRelay
    chaos: ChaosUpstream
    healthy: ChaosUpstream

    def settled(self) -> bool:
        return all(pool_settled(self.relay, name) for name in UPSTREAMS)

    def no_stray_connections(self) -> bool:
        """Every connection the chaos upstream still has open is an idle pooled one: the
        proxy closed each connection a fault left in an unknown state."""
        idle = self.relay.relay.upstreams()["chaos"].snapshot().idle
        return self.chaos.open_connections == idle

    async def errors(self) -> dict[str, float]:
        return {r.value: await self.count(Reason(r)) for r in Reason if r in FAILURES}

    async def count(self, reason: Reason) -> float:
        return await metric(self.relay, "relay_upstream_errors_total", reason=reason.value)

    async def disconnects(self, side: str, phase: str) -> float:
        return await metric(self.relay, "relay_disconnects_total", side=side, phase=phase)


@asynccontextmanager
async def world(transport: str, *, seed: int = 0, **options: Any) -> AsyncIterator[World]:
    chaos_options = {k: options.pop(k) for k in ("stale_ratio", "idle_close_ratio") if k in options}
    chaos = ChaosUpstream(seed=seed, **chaos_options)
    healthy = ChaosUpstream(seed=seed + 1)
    async with (
        chaos.running(),
        healthy.running(),
        run_relay(config(transport, chaos, healthy, **options)) as relay,
    ):
        yield World(relay, chaos, healthy)


class Traffic:
    """Well-behaved requests, four at a time, to the healthy upstream and to the chaos
    upstream's healthy paths, until stopped; every answer is checked byte for byte."""

    def __init__(self, url: str, *, seed: int, chaos_too: bool = True) -> None:
        self._url = url
        self._rng = random.Random(seed)
        self._prefixes = ["/h", ""] if chaos_too else ["/h"]
        self._stop = asyncio.Event()
        self.done = 0
        self.wrong: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        self._client = http_client(timeout=10)
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(4)]
        await eventually(lambda: self.done >= 4)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await eventually(lambda: self.done >= 12)
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()

    async def _worker(self, worker: int) -> None:
        for i in range(400):  # bounded even if never stopped
            if self._stop.is_set():
                return
            prefix = self._rng.choice(self._prefixes)
            kind = self._rng.choice(["ok", "chunked"])
            size = self._rng.choice([0, 1, 100, 5000, 40_000])
            tag = f"w{worker}-{i}"
            url = f"{self._url}{prefix}/{kind}/{size}/{tag}"
            try:
                response = await self._client.get(url)
            except httpx.HTTPError as exc:
                self.wrong.append(f"{url}: {exc!r}")
            else:
                if response.status_code != 200 or response.content != payload(tag, size):
                    self.wrong.append(f"{url}: {response.status_code} {response.content[:40]!r}")
            self.done += 1
            await asyncio.sleep(0.005)  # steady traffic, not a load test


@dataclass(frozen=True)
class Outcome:
    status: int
    complete: bool
    body: bytes
    headers: httpx.Headers


async def fetch(
    url: str,
    method: str = "GET",
    content: bytes | None = None,
    client: httpx.AsyncClient | None = None,
) -> Outcome:
    """The response as far as it came: a cut after the headers is ``complete=False``."""
    if client is None:
        async with http_client(timeout=10) as own:
            return await fetch(url, method, content, own)
    async with client.stream(method, url, content=content) as response:
        body = b""
        try:
            async for chunk in response.aiter_raw():
                body += chunk
        except httpx.RemoteProtocolError:
            return Outcome(response.status_code, False, body, response.headers)
        return Outcome(response.status_code, True, body, response.headers)


def proxy_status(reason: Reason, upstream: str = "chaos") -> str:
    return f'relay; error={FAILURES[reason].proxy_status_error}; next-hop="{upstream}"'


@dataclass(frozen=True)
class Fault:
    path: str
    reason: Reason | None  # None: the exchange is not a failure
    phase: str | None = None  # the phase of the upstream disconnect it counts, if any
    # After the headers: what the client gets before the cut (or in full when reason is
    # None). Before the headers: None, and the proxy answers with its error status.
    received: bytes | None = None
    # Short only where the fault is about it: elsewhere a loaded machine must not turn a
    # slow healthy answer into a timeout.
    read_timeout: float = 5.0


FAULTS = {
    "refused": Fault("/dead/x", Reason.CONNECT),
    "silent": Fault("/silent", Reason.READ_TIMEOUT, read_timeout=READ_TIMEOUT),
    "closed-before-headers": Fault("/close", Reason.RESET, "before_headers"),
    "garbage": Fault("/garbage", Reason.PROTOCOL),
    "reset-mid-body": Fault("/reset/5000", Reason.RESET, "body", payload("reset", 5000)),
    # Slower than the read timeout in total, never between two chunks.
    "drip-below-read-timeout": Fault(
        "/drip/7/100", None, None, payload("drip", 7 * 1024), READ_TIMEOUT
    ),
    "drip-above-read-timeout": Fault(
        "/drip/4/1500", Reason.READ_TIMEOUT, None, payload("drip", 4 * 1024)[:1024], READ_TIMEOUT
    ),
    "body-shorter-than-declared": Fault(
        "/short/10000/4000", Reason.RESET, "body", payload("short", 10000)[:4000]
    ),
    "body-longer-than-declared": Fault("/long/1000/0", None, None, payload("long", 1000)),
}


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault(transport: str, name: str) -> None:
    fault = FAULTS[name]
    upstream = "dead" if fault.path.startswith("/dead") else "chaos"
    async with world(transport, timeouts={"read": fault.read_timeout}) as w:
        async with Traffic(w.relay.url, seed=len(name)) as traffic:
            # Three at once: the same fault on several connections of one pool.
            outcomes = await asyncio.gather(
                *(fetch(f"{w.relay.url}{fault.path}") for _ in range(3))
            )
        assert traffic.wrong == []
        for outcome in outcomes:
            if fault.received is None:
                assert fault.reason is not None
                assert outcome.status == FAILURES[fault.reason].status
                assert outcome.headers["proxy-status"] == proxy_status(fault.reason, upstream)
                assert outcome.complete
            else:
                assert outcome.status == 200
                assert outcome.body == fault.received
                assert outcome.complete is (fault.reason is None)
        errors = await w.errors()
        expected = {r: 0.0 for r in errors}
        if fault.reason is not None:
            expected[fault.reason.value] = 3.0
        assert errors == expected
        for phase in ("before_headers", "body"):
            assert await w.disconnects("upstream", phase) == (3 if phase == fault.phase else 0)
            assert await w.disconnects("client", phase) == 0
        # The availability SLI: each failed exchange once; cut bodies also as truncations.
        cut = fault.reason is not None and fault.received is not None
        for name, value in (("upstream", upstream), ("route", upstream)):
            failed = await metric(w.relay, "relay_requests_failed_total", **{name: value})
            truncated = await metric(w.relay, "relay_responses_truncated_total", **{name: value})
            assert (failed, truncated) == (3 if fault.reason else 0, 3 if cut else 0)
        assert await metric(w.relay, "relay_requests_failed_total") == (3 if fault.reason else 0)
        await eventually(w.settled)
        await eventually(w.no_stray_connections)


async def test_bytes_past_the_body_never_reach_the_next_request(transport: str) -> None:
    """An upstream that sends more than its Content-Length, a moment later, while the
    connection is idle in the pool: the excess (a complete response) must not be taken as
    the answer to the next request on that connection."""
    async with world(transport, pool=1) as w, http_client(timeout=10) as client:
        for i in range(2):
            outcome = await fetch(f"{w.relay.url}/long/1000/50", client=client)
            assert (outcome.status, outcome.body) == (200, payload("long", 1000))
            # The excess arrives while the connection is idle in the pool.
            await eventually(lambda: w.chaos.smuggled == i + 1)  # noqa: B023
            for j in range(3):
                tag = f"after-{i}-{j}"
                answer = await fetch(f"{w.relay.url}/ok/100/{tag}", client=client)
                assert answer.body != SMUGGLED[-8:]
                assert (answer.status, answer.body) == (200, payload(tag, 100))
        assert await w.errors() == {r: 0.0 for r in await w.errors()}
        await eventually(w.settled)
        await eventually(w.no_stray_connections)


async def test_pool_exhausted_is_503_with_retry_after(transport: str) -> None:
    async with world(transport, pool=2, timeouts={"pool": 0.3, "read": 10}) as w:
        up = w.relay.relay.upstreams()["chaos"]
        release = asyncio.Event()

        async def hold() -> None:
            _, writer = await connect(w.relay.url)
            writer.write(b"GET /silent HTTP/1.1\r\nhost: holder\r\n\r\n")
            await release.wait()
            writer.transport.abort()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await eventually(lambda: up.snapshot().in_use == 2 and len(w.chaos.paths()) == 2)
        async with Traffic(w.relay.url, seed=503, chaos_too=False) as traffic:
            refused = await asyncio.gather(*(fetch(f"{w.relay.url}/ok/10/x") for _ in range(3)))
        assert traffic.wrong == []
        for outcome in refused:
            assert outcome.status == 503
            assert outcome.headers["retry-after"] == "1"
            assert outcome.headers["proxy-status"] == proxy_status(Reason.POOL_TIMEOUT)
        assert w.chaos.paths("/ok") == []  # refused requests never reached the upstream
        assert await w.count(Reason.POOL_TIMEOUT) == 3
        assert await metric(w.relay, "relay_pool_timeouts_total", upstream="chaos") == 3
        assert await metric(w.relay, "relay_requests_total", upstream="chaos", code="503") == 3
        release.set()
        await asyncio.gather(*holders)
        await eventually(w.settled)
        outcome = await fetch(f"{w.relay.url}/ok/10/after")
        assert (outcome.status, outcome.body) == (200, payload("after", 10))
        # The two holders hung up before any response header: counted as such, not errors.
        assert await w.disconnects("client", "before_headers") == 2
        assert sum((await w.errors()).values()) == 3


async def test_stale_keepalive_race(transport: str) -> None:
    """Keep-alive connections closed by the upstream at random: idle in the pool (FIN a
    moment after a response) or as a request arrives on them (FIN or RST, no response
    byte). Idempotent bodiless requests are retried once and never fail; a request with a
    body is never sent twice."""
    rng = random.Random(1109)
    async with world(transport, seed=1109, pool=1, stale_ratio=0.25, idle_close_ratio=0.1) as w:
        results: list[tuple[str, str, bytes, Outcome]] = []
        async with (
            Traffic(w.relay.url, seed=1109, chaos_too=False) as traffic,
            http_client(timeout=10) as client,
        ):
            for i in range(100):
                method = rng.choice(BODILESS + WITH_BODY)
                if method in WITH_BODY:
                    path, body = f"/upload/r{i}", payload(f"body{i}", rng.randint(1, 3000))
                    outcome = await fetch(f"{w.relay.url}{path}", method, body, client)
                else:
                    path, body = f"/ok/300/r{i}", b""
                    outcome = await fetch(f"{w.relay.url}{path}", method, client=client)
                results.append((method, path, body, outcome))
        assert traffic.wrong == []
        seen = {path: w.chaos.times_seen(path) for _, path, _, _ in results}
        retried = failed = 0
        for method, path, body, outcome in results:
            if method in BODILESS:
                expected = b"" if method == "HEAD" else payload(path.rsplit("/", 1)[1], 300)
                assert (outcome.status, outcome.body) == (200, expected), (method, path)
                assert 1 <= seen[path] <= 2
                retried += seen[path] - 1
            elif outcome.status == 200:
                assert outcome.body == str(len(body)).encode()
                assert seen[path] == 1
            else:
                assert outcome.status == 502
                assert outcome.headers["proxy-status"] == proxy_status(Reason.RESET)
                assert seen[path] <= 1  # never replayed
                failed += 1
        # Every request that found its connection closed under it was retried (or, with a
        # body, failed); a FIN crossing the request is retried too, unseen by the upstream.
        assert retried > 5 and failed > 0, "the race must actually happen"
        retries = await metric(w.relay, "relay_upstream_retries_total", upstream="chaos")
        assert retried <= retries <= retried + w.chaos.idle_closes
        assert await w.count(Reason.RESET) == failed
        assert sum((await w.errors()).values()) == failed
        await eventually(w.settled)


async def test_stale_retry_never_lands_on_another_stale_connection(transport: str) -> None:
    """With several pooled connections, each may be as stale as the one that failed: the
    retry goes out on a new connection, so an idempotent bodiless request never fails."""
    async with (
        world(transport, seed=3, pool=4, stale_ratio=0.3) as w,
        http_client(timeout=10) as client,
    ):

        async def sequence(worker: int) -> list[str]:
            wrong = []
            for i in range(40):
                tag = f"s{worker}-{i}"
                outcome = await fetch(f"{w.relay.url}/ok/300/{tag}", client=client)
                if (outcome.status, outcome.body) != (200, payload(tag, 300)):
                    wrong.append(f"{tag}: {outcome.status} {outcome.headers}")
            return wrong

        results = await asyncio.gather(*(sequence(k) for k in range(4)))
        assert [line for wrong in results for line in wrong] == []
        assert w.chaos.stale_closes > 10, "the race must actually happen"
        retries = await metric(w.relay, "relay_upstream_retries_total", upstream="chaos")
        assert retries == w.chaos.stale_closes
        await eventually(w.settled)
