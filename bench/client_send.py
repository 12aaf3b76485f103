"""What ``httpx.AsyncClient.send`` costs on top of the transport chain it calls.

    python bench/client_send.py --upstream http://127.0.0.1:PORT/1k [--requests 3000]

Relay sends every proxied request with its upstream's ``client.send(request, stream=True)``;
before, it called the client's transport chain directly. This measures, in one process
against a real upstream, one request at a time, the CPU time per request of:

  * the transport chain called directly (gate, retry policy, aiohttp pool);
  * ``UpstreamClient.send``, Relay's client (its cookie store does nothing);
  * ``httpx.AsyncClient.send`` with httpx's default cookie jar, same transport chain.

Each includes building the request and reading and closing the response. Rounds of the
three alternate, and the median of the rounds is printed (JSON with ``--json``), so drift
on a shared machine hits all three alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config_upstreams import UpstreamConfig
from service.upstreams.pools import Upstream, UpstreamSet

Send = Callable[[httpx.Request], Awaitable[httpx.Response]]


async def one(upstream: Upstream, send: Send, path: bytes) -> None:
    request = upstream.request("GET", path, [(b"host", upstream.authority)], None)
    response = await send(request)
    try:
        async for _ in response.stream:  # type: ignore[union-attr]
            pass
    finally:
        await response.aclose()


async def measure(url: str, requests: int, rounds: int) -> dict[str, float]:
    target = httpx.URL(url)
    base = str(target.copy_with(raw_path=b"/"))
    upstreams = UpstreamSet({"up": UpstreamConfig.model_validate({"url": base})})
    await upstreams.open()
    upstream = upstreams["up"]
    stock = httpx.AsyncClient(transport=upstream.transport, follow_redirects=False)
    stock.headers.clear()
    ways: dict[str, Send] = {
        "transport chain, called directly": upstream.transport.handle_async_request,
        "UpstreamClient.send (Relay)": lambda r: upstream.client.send(r, stream=True),
        "httpx.AsyncClient.send, default cookie jar": lambda r: stock.send(r, stream=True),
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    path = target.raw_path
    try:
        for send in ways.values():  # warm-up: connections, caches
            for _ in range(200):
                await one(upstream, send, path)
        for _ in range(rounds):
            for name, send in ways.items():
                started = time.process_time()
                for _ in range(requests):
                    await one(upstream, send, path)
                samples[name].append((time.process_time() - started) / requests * 1e6)
    finally:
        await upstreams.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="URL of a small response")
    parser.add_argument("--requests", type=int, default=3000, help="per round and way")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(measure(args.upstream, args.requests, args.rounds))
    if args.json:
        print(json.dumps(result))
        return
    direct = next(iter(result.values()))
    for name, micros in result.items():
        print(f"{name:45s} {micros:7.1f} µs CPU per request  (+{micros - direct:.1f})")


if __name__ == "__main__":
    main()
