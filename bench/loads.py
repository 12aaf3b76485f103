"""The measurements: wrk runs, and single streamed transfers with curl under a memory watch.

Each function measures one system (already started, already checked) and returns flat
figures for the report. "server CPU" is the CPU time the system's process group used per
second of the measured run (1.00 = one core busy), read from /proc.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx
import psutil
from common import Served, need, wrk
from transports import session_cpu_seconds

MIB = 1 << 20


def check(url: str, size: int) -> None:
    """One request first: a system that answers wrongly is not measured."""
    response = httpx.get(url, timeout=10, trust_env=False)
    if response.status_code != 200 or len(response.content) != size:
        raise RuntimeError(f"{url}: {response.status_code}, {len(response.content)} bytes")


def wrk_load(
    name: str,
    served: Served,
    path: str,
    *,
    body: int,
    duration: int,
    warmup: int,
    connections: int,
    threads: int = 2,
    timeout: int | None = None,
) -> dict[str, Any]:
    url = served.url(path)
    check(url, body)
    if warmup:
        wrk(name, url, warmup, connections, threads, timeout)
        time.sleep(0.5)
    before, started = session_cpu_seconds(served.pid), time.monotonic()
    result = wrk(name, url, duration, connections, threads, timeout)
    cpu = (session_cpu_seconds(served.pid) - before) / (time.monotonic() - started)
    return {
        "rps": result.rps,
        "mb_per_s": result.rps * body / 1e6,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "requests": result.requests,
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "timeouts": result.timeouts,
        "server_cpu": cpu,
        # CPU time of the system's whole process group per answered request.
        "cpu_us_per_request": cpu / result.rps * 1e6 if result.rps else None,
    }


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (nginx master + worker, Relay's
    supervisor + workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


@contextmanager
def rss_watch(pid: int, every: float = 0.02) -> Iterator[dict[str, int]]:
    """Samples the tree's RSS while the block runs; yields {"before", "peak"} (bytes)."""
    figures = {"before": tree_rss(pid), "peak": 0}
    figures["peak"] = figures["before"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            figures["peak"] = max(figures["peak"], tree_rss(pid))
            stop.wait(every)

    thread = threading.Thread(target=sample, name="rss-watch", daemon=True)
    thread.start()
    try:
        yield figures
    finally:
        stop.set()
        thread.join()
        figures["peak"] = max(figures["peak"], tree_rss(pid))


def _curl(args: list[str], max_time: int, stdin: Any = None) -> str:
    curl = need("curl")
    done = subprocess.run(
        [curl, "-sS", "--max-time", str(max_time), *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=max_time + 10,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"curl {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def download(served: Served, path: str, size: int, max_time: int) -> float:
    """Seconds for one GET of ``size`` bytes to /dev/null."""
    started = time.monotonic()
    out = _curl(
        ["-o", "/dev/null", "-w", "%{http_code} %{size_download}", served.url(path)], max_time
    )
    elapsed = time.monotonic() - started
    if out.split() != ["200", str(size)]:
        raise RuntimeError(f"{served.url(path)}: got {out!r}, want 200 and {size} bytes")
    return elapsed


def upload(served: Served, path: str, size: int, max_time: int) -> float:
    """Seconds for one streamed PUT of ``size`` bytes (chunked, from a pipe: nothing on disk,
    nothing buffered whole); the sink upstream answers the byte count it received."""
    feeder = subprocess.Popen(
        ["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    started = time.monotonic()
    try:
        # No Expect: 100-continue, so no system is charged curl's wait for it.
        out = _curl(
            ["-T", "-", "-H", "Expect:", "-w", "\n%{http_code}", served.url(path)],
            max_time,
            stdin=feeder.stdout,
        )
    finally:
        if feeder.stdout is not None:
            feeder.stdout.close()
        feeder.kill()
        feeder.wait()
    elapsed = time.monotonic() - started
    body, _, code = out.rpartition("\n")
    if code != "200" or f'"bytes": {size}' not in body:
        raise RuntimeError(f"{served.url(path)}: got {out!r}, want 200 and {size} bytes received")
    return elapsed


def transfer(
    direction: str, served: Served, path: str, *, size: int, warm_size: int, max_time: int
) -> dict[str, Any]:
    """One warm-up transfer, then the measured one with the RSS watch and CPU count."""
    move = download if direction == "download" else upload
    warm_path = "/warm" if direction == "download" else path
    move(served, warm_path, warm_size, max_time)
    time.sleep(0.3)
    before = session_cpu_seconds(served.pid)
    with rss_watch(served.pid) as rss:
        elapsed = move(served, path, size, max_time)
    cpu = (session_cpu_seconds(served.pid) - before) / elapsed
    return {
        "mb_per_s": size / elapsed / 1e6,
        "seconds": elapsed,
        "rss_before_mib": rss["before"] / MIB,
        "rss_growth_mib": (rss["peak"] - rss["before"]) / MIB,
        "server_cpu": cpu,
    }
