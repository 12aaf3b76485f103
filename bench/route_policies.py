"""What a route's policies add to a proxied request, per call of the functions they change.

    python bench/route_policies.py [--number 200000] [--json]

Each figure is the best of five timeit rounds, in nanoseconds per call, in one process and
without any socket: the two header builders with and without a header policy, the route's
policy lookup, the compiled edits applied to one of the proxy's own answers, the pool
gate's timeout read, and one event-loop turn with and without a total-timeout timer (the
timer the proxy uses, and asyncio.timeout for comparison). Routes without policies pay for
the lookup and for ``is None`` checks only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import Settings
from service.config_routes import HeaderPolicy
from service.headers import RequestContext, downstream_response_headers, upstream_request_headers
from service.route_policy import HeaderEdits, RoutePolicies

REQUEST = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"curl/8.5"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip"),
    (b"x-debug", b"1"),
    (b"cookie", b"a=b"),
    (b"authorization", b"Bearer x"),
    (b"content-type", b"application/json"),
    (b"content-length", b"12"),
    (b"x-env", b"dev"),
]
RESPONSE = [
    (b"content-type", b"application/json"),
    (b"content-length", b"1234"),
    (b"server", b"upstream"),
    (b"date", b"Thu, 03 Dec 2026 17:00:00 GMT"),
    (b"cache-control", b"no-cache"),
    (b"x-powered-by", b"a"),
    (b"etag", b'"x"'),
]
REQUEST_ID = (b"x-request-id", b"4bf92f3577b34da6a3ce929d0e0e4736")


def edits(policy: dict[str, Any]) -> HeaderEdits:
    compiled = HeaderEdits.of(HeaderPolicy.model_validate(policy))
    assert compiled is not None
    return compiled


def calls() -> dict[str, Callable[[], object]]:
    ctx = RequestContext("10.0.0.1", "http", "1.1", b"api.example.com", trusted=False)
    up = {
        "upstream_authority": b"up:8080",
        "preserve_host": False,
        "via_name": b"relay",
        "trusted": [],
        "request_id": REQUEST_ID,
    }
    down: dict[str, Any] = {"http_version": "1.1", "via_name": b"relay", "status": 200}
    to_upstream = edits({"set": {"X-Env": "prod"}, "remove": ["X-Debug"]})
    to_client = edits(
        {"set": {"Strict-Transport-Security": "max-age=63072000"}, "remove": ["Server"]}
    )
    settings = Settings(
        upstreams={"a": {"url": "http://127.0.0.1:9"}},  # type: ignore[dict-item]
        routes=[
            {"prefix": "/", "upstream": "a"},  # type: ignore[list-item]
            {"prefix": "/x", "upstream": "a", "timeouts": {"total": 3}},  # type: ignore[list-item]
        ],
    )
    bare, bounded = settings.routes
    nobody = RoutePolicies([bare], settings.upstreams)
    some = RoutePolicies(settings.routes, settings.upstreams)
    own_answer = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"40"),
        (b"proxy-status", b'relay; error=connection_refused; next-hop="a"'),
        (b"cache-control", b"no-store"),
        (b"date", b"Thu, 03 Dec 2026 17:00:00 GMT"),
        REQUEST_ID,
    ]
    extensions = {"timeout": {"connect": 5.0, "read": 30.0, "write": 30.0, "pool": 5.0}}

    def pool_timeout() -> float | None:
        timeouts = extensions.get("timeout")
        return timeouts["pool"] if timeouts else 5.0

    return {
        "upstream_request_headers, no policy": lambda: upstream_request_headers(REQUEST, ctx, **up),
        "upstream_request_headers, set 1 + remove 1": lambda: upstream_request_headers(
            REQUEST, ctx, **up, edits=to_upstream
        ),
        "downstream_response_headers, no policy": lambda: downstream_response_headers(
            RESPONSE, **down, request_id=REQUEST_ID
        ),
        "downstream_response_headers, set 1 + remove 1": lambda: downstream_response_headers(
            RESPONSE, **down, request_id=REQUEST_ID, edits=to_client
        ),
        "HeaderEdits.apply to the proxy's own answer": lambda: to_client.apply(own_answer),
        "RoutePolicies.get, no route has a policy": lambda: nobody.get(bare),
        "RoutePolicies.get, this route has none": lambda: some.get(bare),
        "RoutePolicies.get, this route has one": lambda: some.get(bounded),
        "pool gate: the timeout read from the request": pool_timeout,
    }


async def loop_turns(turns: int, kind: str) -> float:
    """Nanoseconds per event-loop turn of a task, with ``kind`` of total-timeout timer."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    started = loop.time()
    for _ in range(turns):
        if kind == "asyncio.timeout":
            async with asyncio.timeout(30):
                await asyncio.sleep(0)
        elif kind == "timer":
            handle = loop.call_later(30, task.cancel)
            try:
                await asyncio.sleep(0)
            finally:
                handle.cancel()
        else:
            await asyncio.sleep(0)
    return (loop.time() - started) / turns * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per timeit round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, float] = {}
    for label, call in calls().items():
        results[label] = min(timeit.repeat(call, number=args.number, repeat=5)) / args.number * 1e9
    turns = max(args.number // 4, 1)
    for kind, label in (
        ("none", "a loop turn, no total timeout"),
        ("timer", "a loop turn with the total-timeout timer"),
        ("asyncio.timeout", "a loop turn within asyncio.timeout"),
    ):
        results[label] = min(asyncio.run(loop_turns(turns, kind)) for _ in range(5))
    if args.json:
        print(json.dumps({k: round(v) for k, v in results.items()}, indent=2))
        return
    for label, ns in results.items():
        print(f"{label:55s} {ns:8.0f} ns")


if __name__ == "__main__":
    main()
