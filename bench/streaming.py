"""Throughput of one large proxied download, and the proxy's peak memory, in one run.

nginx (1 worker) serves a sparse file (1 GiB by default; sparse, so no disk is used); curl
downloads it to /dev/null once per row, after one unreported warm-up download: straight
from nginx, through nginx as a reverse proxy (no temp-file buffering), and through Relay
with each transport. For Relay the peak resident set (VmHWM) is read from /proc before and
after the download: a streaming proxy's peak must not grow with the size of the body.

    python bench/streaming.py [--size-mib 1024] [--max-time 120]
"""

from __future__ import annotations

import argparse
import subprocess
import time

from common import (
    NGINX_PROXY,
    NGINX_UPSTREAM,
    TRANSPORT_LABELS,
    TRANSPORTS,
    environment,
    handle_signals,
    markdown_table,
    need,
    nginx,
    peak_rss_kib,
    relay,
)
from transports import session_cpu_seconds

# A streaming reverse proxy: without this nginx spools bodies beyond its buffers to disk.
NGINX_STREAMING_PROXY = NGINX_PROXY.replace(
    'proxy_set_header Connection "";',
    'proxy_set_header Connection ""; proxy_max_temp_file_size 0;',
)
NGINX_SENDFILE_UPSTREAM = NGINX_UPSTREAM.replace("access_log off;", "access_log off; sendfile on;")


def download(url: str, size: int, max_time: int, sid: int) -> tuple[float, float]:
    """(MB/s, server CPU s/s) of one download with curl."""
    curl = need("curl")
    before, started = session_cpu_seconds(sid), time.monotonic()
    done = subprocess.run(
        [curl, "-sS", "-o", "/dev/null", "--max-time", str(max_time), "-w", "%{size_download}",
         url],
        capture_output=True, text=True, timeout=max_time + 10, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    cpu = (session_cpu_seconds(sid) - before) / elapsed
    if done.returncode != 0 or int(done.stdout or 0) != size:
        raise RuntimeError(f"{url}: curl {done.returncode}, {done.stdout} bytes, {done.stderr}")
    return size / elapsed / 1e6, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--max-time", type=int, default=120, help="per download, seconds")
    args = parser.parse_args()
    size = args.size_mib << 20
    handle_signals()
    print(environment())
    print(f"one {args.size_mib} MiB GET per row with curl to /dev/null, loopback only\n")
    rows: list[list[object]] = []
    with nginx(NGINX_SENDFILE_UPSTREAM, files={"big": size}) as upstream:
        # Warm-up: the first read of the sparse file fills the page cache.
        download(upstream.url("/big"), size, args.max_time, upstream.pid)
        direct, cpu = download(upstream.url("/big"), size, args.max_time, upstream.pid)
        rows.append(["straight to nginx upstream", f"{direct:,.0f}", "1.000", f"{cpu:.2f}", "-"])
        print(f"  direct: {direct:,.0f} MB/s", flush=True)
        with nginx(NGINX_STREAMING_PROXY, upstream=upstream.port) as proxy:
            mbps, cpu = download(proxy.url("/big"), size, args.max_time, proxy.pid)
        rows.append(
            ["nginx reverse proxy, 1 worker", f"{mbps:,.0f}", f"{mbps / direct:.3f}",
             f"{cpu:.2f}", "-"]
        )  # fmt: skip
        print(f"  nginx proxy: {mbps:,.0f} MB/s", flush=True)
        for transport in TRANSPORTS:
            with relay(upstream.url(""), transport) as proc:
                rss_before = peak_rss_kib(proc.pid)
                mbps, cpu = download(proc.url("/big"), size, args.max_time, proc.pid)
                rss_after = peak_rss_kib(proc.pid)
            rows.append(
                [TRANSPORT_LABELS[transport], f"{mbps:,.0f}", f"{mbps / direct:.3f}",
                 f"{cpu:.2f}", f"{rss_before / 1024:.0f} -> {rss_after / 1024:.0f}"]
            )  # fmt: skip
            print(f"  {transport}: {mbps:,.0f} MB/s", flush=True)
    print()
    header = ["system", "MB/s", "vs direct", "server CPU", "proxy peak RSS MiB (before -> after)"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
