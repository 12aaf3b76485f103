"""Throughput and latency of the transports behind Relay, against references, in one run.

1 KiB GET, ``wrk -t2 -c64``, loopback only. Rows: straight to the nginx upstream; nginx as
a reverse proxy (1 worker); Relay (1 worker) with each transport, and
the default transport with 2 workers. Compare the ratios: the
machine is shared by wrk, the proxy and the upstream, so absolute figures are noisy.

    python bench/transports.py [--duration 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import NGINX_PROXY, NGINX_UPSTREAM, nginx, relay, table, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    d, c = args.duration, args.connections
    stock = [sys.executable, str(Path(__file__).with_name("stock_httpx_aiohttp.py"))]
    results = []
    with nginx(NGINX_UPSTREAM) as upstream:
        direct = wrk("straight to nginx upstream", f"http://127.0.0.1:{upstream}/1k", d, c)
        results.append(direct)
        with nginx(NGINX_PROXY, upstream=upstream) as proxy:
            nginx_proxy = wrk("nginx reverse proxy, 1 worker", f"http://127.0.0.1:{proxy}/1k", d, c)
        results.append(nginx_proxy)
        for name, transport, launcher, workers in (
            ("Relay, aiohttp transport (default)", "aiohttp", [], 1),
            ("Relay, httpcore transport", "httpcore", [], 1),
            ("Relay, stock httpx-aiohttp transport", "aiohttp", stock, 1),
            ("Relay, aiohttp transport, 2 workers", "aiohttp", [], 2),
        ):
            with relay(upstream, transport, launcher=launcher, workers=workers) as port:
                wrk(name, f"http://127.0.0.1:{port}/1k", 2, c)  # warm-up
                time.sleep(0.5)
                results.append(wrk(name, f"http://127.0.0.1:{port}/1k", d, c))
    print(f"1 KiB GET, wrk -t2 -c{c} -d{d}s, loopback\n")
    print(table(results, direct, nginx_proxy))


if __name__ == "__main__":
    main()
