"""What a route's retry policy costs a request before anything is sent, measured with timeit.

    python bench/retry_overhead.py [--number 20000] [--rounds 15]

In one process, no network: ``Forwarding`` builds the upstream request of a bodiless GET
(headers, target, ``httpx.Request``) for three routes, in alternating rounds so that drift
on a shared machine hits all alike; the minimum and median per request are printed.

  * ``no policy``: a route whose upstream no route retries on: one dict lookup more than
    before retries existed (the route has no plan);
  * ``budget only``: a route without retries on an upstream another route retries on: its
    request counts in the upstream's budget;
  * ``retrying``: a route with ``retry.attempts: 2``: the budget, the policy's method check
    and the request built through the retry path.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import Settings
from service.exchange import Exchange, ExchangeObserver
from service.forwarding import Forwarding, ProxyHop
from service.retries import Retrying
from service.upstreams.pools import UpstreamSet

SCOPE = {
    "type": "http",
    "method": "GET",
    "path": "/a/b",
    "raw_path": b"/a/b",
    "query_string": b"x=1",
    "headers": [(b"host", b"example.com"), (b"user-agent", b"curl/8"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 5000),
    "scheme": "http",
    "http_version": "1.1",
}


async def receive() -> dict[str, object]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: object) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    settings = Settings(
        upstreams={"plain": {"url": "http://127.0.0.1:9"}, "api": {"url": "http://127.0.0.1:9"}},
        routes=[
            {"name": "no-policy", "prefix": "/", "upstream": "plain"},
            {"name": "budget-only", "prefix": "/b", "upstream": "api"},
            {"name": "retrying", "prefix": "/r", "upstream": "api", "retry": {"attempts": 2}},
        ],
    )
    upstreams = UpstreamSet(settings.upstreams)
    hop = ProxyHop.of(settings, ExchangeObserver())

    def forwarding(index: int) -> Forwarding:
        route = settings.routes[index]
        exchange = Exchange(method="GET", route=route.label, upstream=route.upstream)
        upstream = upstreams[route.upstream]
        return Forwarding(hop, SCOPE, receive, send, exchange, route, upstream)

    def prepare(fw: Forwarding) -> None:
        # What send_upstream does up to the upstream's send, for either path.
        plan = fw.hop.retry_plans.get(id(fw.route))
        if plan is None:
            fw._request()
            return
        method, target, headers, _ = fw._parts()
        Retrying(plan, fw.upstream, fw.exchange, fw.hop.observer)
        plan.budget.request()
        if plan.policy is not None:
            assert method in plan.policy.methods
        functools.partial(fw._build, method, target, headers)(None)

    cases = {name: forwarding(i) for i, name in enumerate(("no policy", "budget only", "retrying"))}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fw in cases.items():
            seconds = timeit.timeit(functools.partial(prepare, fw), number=args.number)
            times[name].append(seconds / args.number * 1e6)
    for name, runs in times.items():
        print(f"{name:12} min {min(runs):6.2f} us   median {statistics.median(runs):6.2f} us")
    asyncio.run(upstreams.close())


if __name__ == "__main__":
    main()
