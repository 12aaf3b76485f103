"""Disconnect storms, both transports: hundreds of raw-socket clients hang up at random
points (before the response headers, mid-body, partway through their request body) while
both pools are at their limit and requests queue. Each client's phase is unambiguous, so
the counters must equal exactly what the storm caused; no pool slot may leak, nothing may be
logged as an error, and the proxy must serve normally afterwards."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.support.chaos import ChaosUpstream, payload
from tests.support.metrics import metric
from tests.support.net import eventually
from tests.support.relays import RunningRelay, pool_settled, run_relay
from tests.support.wire import connect

pytestmark = pytest.mark.usefixtures("no_error_logs")

CLIENTS = 300
POOL = 4
SEED = 499
# before_headers: a request the slow upstream never answers, abandoned after it reached the
# proxy. upload: a request body abandoned partway. mid_body: an endless stream abandoned
# after its headers and some body. complete: an ordinary request queued among them.
PLAN_WEIGHTS = {"before_headers": 30, "upload": 20, "mid_body": 35, "complete": 15}
UPLOAD_LENGTH = 200_000


@dataclass
class Storm:
    relay: RunningRelay
    slow: ChaosUpstream
    stream: ChaosUpstream
    rng: random.Random
    slow_registered: asyncio.Event
    wrong: list[str]

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await connect(self.relay.url)

    async def before_headers(self, delay: float) -> None:
        _, writer = await self.open()
        writer.write(b"GET /slow/silent HTTP/1.1\r\nhost: storm\r\n\r\n")
        await writer.drain()
        await self.slow_registered.wait()
        await asyncio.sleep(delay)
        writer.transport.abort()

    async def upload(self, delay: float, sent: int) -> None:
        _, writer = await self.open()
        head = f"POST /slow/upload HTTP/1.1\r\nhost: storm\r\ncontent-length: {UPLOAD_LENGTH}\r\n"
        writer.write(head.encode() + b"\r\n" + b"u" * sent)
        await writer.drain()
        await self.slow_registered.wait()
        await asyncio.sleep(delay)
        writer.transport.abort()

    async def mid_body(self, body_bytes: int) -> None:
        reader, writer = await self.open()
        writer.write(b"GET /stream HTTP/1.1\r\nhost: storm\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if not head.startswith(b"HTTP/1.1 200 "):
            self.wrong.append(f"stream: {head[:40]!r}")
        await asyncio.wait_for(reader.readexactly(body_bytes), 30)
        writer.transport.abort()

    async def complete_upload(self, size: int) -> None:
        reader, writer = await self.open()
        head = f"POST /slow/upload HTTP/1.1\r\nhost: storm\r\ncontent-length: {size}\r\n"
        writer.write(head.encode() + b"connection: close\r\n\r\n" + b"u" * size)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head_bytes, _, body = response.partition(b"\r\n\r\n")
        if not head_bytes.startswith(b"HTTP/1.1 200 ") or body != str(size).encode():
            self.wrong.append(f"upload {size}: {response[:60]!r}")

    async def complete(self, tag: str, size: int) -> None:
        reader, writer = await self.open()
        request = f"GET /ok/{size}/{tag} HTTP/1.1\r\nhost: storm\r\nconnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 ") or body != payload(tag, size):
            self.wrong.append(f"{tag}: {head[:40]!r} {len(body)} bytes")


def storm_config(transport: str, slow: ChaosUpstream, stream: ChaosUpstream) -> dict[str, object]:
    def upstream(url: str) -> dict[str, object]:
        return {
            "url": url,
            "transport": transport,
            "pool": {"max_connections": POOL, "max_keepalive_connections": POOL},
            # Requests queue for the few connections rather than being refused.
            "timeouts": {"pool": 30, "read": 30},
        }

    return {
        "upstreams": {"slow": upstream(slow.url), "stream": upstream(stream.url)},
        "routes": [
            {"prefix": "/slow", "upstream": "slow", "strip_prefix": True},
            {"prefix": "/", "upstream": "stream"},
        ],
    }


async def test_disconnect_storm(transport: str) -> None:
    rng = random.Random(SEED)
    plan = rng.choices(list(PLAN_WEIGHTS), weights=list(PLAN_WEIGHTS.values()), k=CLIENTS)
    caused = Counter(plan)
    slow_clients = caused["before_headers"] + caused["upload"]
    slow, stream = ChaosUpstream(seed=SEED), ChaosUpstream(seed=SEED + 1)
    async with (
        slow.running(),
        stream.running(),
        run_relay(storm_config(transport, slow, stream)) as relay,
    ):
        storm = Storm(relay, slow, stream, rng, asyncio.Event(), [])
        gates = {name: relay.relay.upstreams()[name] for name in ("slow", "stream")}
        connecting = asyncio.Semaphore(64)  # the listener's accept queue is 128 deep

        async def client(index: int, phase: str) -> None:
            async with connecting:
                if phase == "before_headers":
                    task = storm.before_headers(rng.uniform(0, 0.3))
                elif phase == "upload":
                    task = storm.upload(rng.uniform(0, 0.3), rng.randint(1, UPLOAD_LENGTH - 1))
                elif phase == "mid_body":
                    task = storm.mid_body(rng.randint(1, 256 * 1024))
                else:
                    task = storm.complete(f"c{index}", rng.choice([0, 10, 5000, 100_000]))
            await task

        clients = [asyncio.create_task(client(i, phase)) for i, phase in enumerate(plan)]

        # Every slow client has reached the proxy and holds or waits for a connection (the
        # slow upstream never answers): from now on each hang-up is before the headers.
        def all_slow_registered() -> bool:
            snapshot = gates["slow"].snapshot()
            return snapshot.in_use + snapshot.waiting == slow_clients

        await eventually(all_slow_registered, within=30)
        assert gates["slow"].snapshot().in_use == POOL  # the pool is at its limit
        storm.slow_registered.set()
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        assert storm.wrong == []

        await eventually(lambda: all(pool_settled(relay, name) for name in gates), within=10)
        for name, upstream in (("slow", slow), ("stream", stream)):
            # Every abandoned upstream connection was closed, none left half-read.
            await eventually(lambda: upstream.open_connections == gates[name].snapshot().idle)  # noqa: B023
        assert slow.paths("/upload") == []  # no partial body was ever completed upstream

        async def disconnects(upstream: str, phase: str) -> float:
            labels = {"upstream": upstream, "side": "client", "phase": phase}
            return await metric(relay, "relay_disconnects_total", **labels)

        assert await disconnects("slow", "before_headers") == slow_clients
        assert await disconnects("slow", "body") == 0
        assert await disconnects("stream", "before_headers") == 0
        assert await disconnects("stream", "body") == caused["mid_body"]
        assert await metric(relay, "relay_disconnects_total", side="upstream") == 0
        assert await metric(relay, "relay_requests_total", code="499") == slow_clients
        stream_ok = caused["mid_body"] + caused["complete"]
        assert await metric(relay, "relay_requests_total", upstream="stream", code="200") == (
            stream_ok
        )
        assert await metric(relay, "relay_requests_total") == CLIENTS
        assert await metric(relay, "relay_upstream_errors_total") == 0
        assert await metric(relay, "relay_requests_in_flight") == 0

        # Then the proxy serves normally, on both upstreams, with all their connections.
        finals = [storm.complete(f"final{i}", 70_000) for i in range(2 * POOL)]
        finals += [storm.complete_upload(50_000 + i) for i in range(2 * POOL)]
        await asyncio.wait_for(asyncio.gather(*finals), 30)
        assert storm.wrong == []
        assert caused["before_headers"] > 50 and caused["upload"] > 30 and caused["mid_body"] > 50
