"""Endpoint balancing on loopback: three endpoints, one of them 10x slower, in one run.

Three upstreams (bench/upstream.py, each its own process) on 127.0.0.2, .3 and .4, one port
each; the last answers after ``--slow-ms``, the others after a tenth of it. Rows, each
``wrk -t2 -c<connections> -d<duration>s --latency`` through Relay (1 worker, access log off):

  (a) ``balance: least_request`` over the three (``endpoints:``);
  (b) ``balance: round_robin`` over the three;
  (c) today's single URL in front of a Kubernetes ClusterIP: one address, HAProxy in TCP
      mode picking an endpoint per connection (``balance roundrobin``), as kube-proxy does;
      Relay's keep-alive pool stays on the connections it opened.

For each: requests/s, p99, and the share of requests each endpoint answered (the slow one
last). Then the cost of the change with one endpoint: Relay with a single URL (one fast
upstream), this checkout against ``--baseline`` (default: main), both in this run; the
ratio must stay >= 0.95.

    python bench/endpoints.py [--duration 10] [--connections 32] [--slow-ms 20]
                              [--baseline main] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from common import (
    BENCH,
    WrkResult,
    baseline_source,
    environment,
    free_port,
    handle_signals,
    load,
    markdown_table,
    need,
    process,
    relay,
    wait_ready,
    wrk,
)

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
HAPROXY = """global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend clusterip
    bind 127.0.0.1:{port}
    default_backend pods
backend pods
    balance roundrobin
{servers}
"""


@contextmanager
def endpoint(host: str, every: float) -> Iterator[str]:
    """One upstream process on ``host``; its base URL."""
    port = free_port()
    args = [sys.executable, str(BENCH / "upstream.py"), "--host", host, "--port", str(port)]
    with process([*args, "--every", str(every)]) as proc:
        url = f"http://{host}:{port}"
        wait_ready(f"{url}/stats", proc)
        yield url


def answered(urls: list[str]) -> list[int]:
    return [httpx.get(f"{url}/stats", trust_env=False).json()["answered"] for url in urls]


@contextmanager
def clusterip(urls: list[str]) -> Iterator[str]:
    """HAProxy in TCP mode over ``urls``: one address, an endpoint per connection."""
    binary = need("haproxy")
    port = free_port()
    servers = "\n".join(
        f"    server pod{i} {url.removeprefix('http://')}" for i, url in enumerate(urls)
    )
    with tempfile.TemporaryDirectory(prefix="relay-bench-haproxy-") as tmp:
        conf = Path(tmp, "haproxy.cfg")
        conf.write_text(HAPROXY.format(port=port, servers=servers))
        with process([binary, "-db", "-f", str(conf)]):
            url = f"http://127.0.0.1:{port}"
            wait_ready(f"{url}/stats")
            yield url


def measured(
    name: str, url: str, urls: list[str], args: argparse.Namespace
) -> tuple[WrkResult, list[int]]:
    if args.warmup:
        wrk(name, url, args.warmup, args.connections)
    before = answered(urls)
    result = wrk(name, url, args.duration, args.connections)
    after = answered(urls)
    return result, [b - a for a, b in zip(before, after, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--slow-ms", type=float, default=20.0)
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    args = parser.parse_args()
    handle_signals()
    slow = args.slow_ms / 1000
    rows = []
    with ExitStack() as stack:
        urls = [
            stack.enter_context(endpoint(host, slow if i == 2 else slow / 10))
            for i, host in enumerate(HOSTS)
        ]
        path = "/x"
        for balance in ("least_request", "round_robin"):
            options = {"endpoints": urls, "balance": balance}
            with relay("http://backend.bench:8080", "aiohttp", upstream=options) as served:
                result, shares = measured(balance, served.url(path), urls, args)
            rows.append((f"Relay, balance: {balance}", result, shares))
        with clusterip(urls) as address, relay(address, "aiohttp") as served:
            result, shares = measured("clusterip", served.url(path), urls, args)
        rows.append(("Relay, single URL through a ClusterIP (L4 per connection)", result, shares))
        fast = urls[0]
        single = []
        with relay(fast, "aiohttp") as served:
            single.append(measured("this", served.url(path), urls, args)[0])
        with baseline_source(args.baseline) as source, relay(fast, "aiohttp", source=source) as b:
            single.append(measured("baseline", b.url(path), urls, args)[0])

    def share(counts: list[int]) -> str:
        total = sum(counts) or 1
        return " / ".join(f"{100 * c / total:.0f}%" for c in counts)

    print(environment())
    print(
        f"load: {load()}; endpoints {', '.join(HOSTS)} (the last {args.slow_ms:g} ms, "
        f"the others {args.slow_ms / 10:g} ms); wrk -c{args.connections} -d{args.duration}s"
    )
    print()
    print(markdown_table(
        ["setup", "req/s", "p99 ms", "share per endpoint (slow last)"],
        [(n, f"{r.rps:.0f}", f"{r.p99_ms:.1f}", share(s)) for n, r, s in rows],
    ))  # fmt: skip
    this, base = single
    ratio = this.rps / base.rps if base.rps else 0.0
    print()
    print(markdown_table(
        ["one endpoint (single URL)", "req/s", "p99 ms"],
        [("this checkout", f"{this.rps:.0f}", f"{this.p99_ms:.1f}"),
         (f"baseline {args.baseline}", f"{base.rps:.0f}", f"{base.p99_ms:.1f}"),
         ("ratio (must stay >= 0.95)", f"{ratio:.3f}", "")],
    ))  # fmt: skip
    print(json.dumps({"ratio_single_endpoint": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
