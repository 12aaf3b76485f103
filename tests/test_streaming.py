"""1 GiB through the proxy in each direction with the proxy's memory staying flat."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.net import free_port, kill, wait_http
from tests.support.relays import spawn_relay
from tests.support.tiers import require_live
from tests.support.tools import ROOT

GIB = 1 << 30
MAX_GROWTH = 64 << 20  # bytes of RSS the proxy may gain while moving 1 GiB
MAX_SECONDS = 60  # loopback moves 1 GiB through the proxy in a few seconds

pytestmark = [pytest.mark.slow, pytest.mark.live]


@contextmanager
def bulk_upstream() -> Iterator[str]:
    require_live("the bulk upstream")
    port = free_port()
    script = ROOT / "tests" / "support" / "bulk_upstream.py"
    process = subprocess.Popen([sys.executable, str(script), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/bytes/0", within=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        kill(process)


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.fixture(params=["aiohttp", "httpcore"])
def relay_and_upstream(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    with bulk_upstream() as upstream_url:
        config = {
            "log": {"access_log": False},
            "upstreams": {"bulk": {"url": upstream_url, "transport": request.param}},
            "routes": [{"prefix": "/", "upstream": "bulk"}],
        }
        with spawn_relay(config, tmp_path) as relay:
            # Warm up: first requests allocate pools, buffers and code paths.
            for _ in range(3):
                httpx.get(f"{relay.url}/bytes/{4 << 20}", timeout=30)
            yield relay.url, relay.process.pid


def test_download_1gib_keeps_memory_flat(relay_and_upstream: tuple[str, int]) -> None:
    url, pid = relay_and_upstream
    received = 0
    started = time.monotonic()
    with PeakRss(pid) as rss, httpx.stream("GET", f"{url}/bytes/{GIB}", timeout=60) as response:
        assert response.headers["content-length"] == str(GIB)
        for chunk in response.iter_raw(1 << 20):
            received += len(chunk)
    elapsed = time.monotonic() - started
    assert received == GIB
    print(f"download: 1 GiB in {elapsed:.1f}s, proxy RSS growth {rss.growth >> 20} MiB")
    assert rss.growth < MAX_GROWTH, f"proxy RSS grew {rss.growth >> 20} MiB"
    assert elapsed < MAX_SECONDS


def test_upload_1gib_keeps_memory_flat(relay_and_upstream: tuple[str, int]) -> None:
    url, pid = relay_and_upstream
    block = b"u" * (1 << 20)

    def body() -> Iterator[bytes]:
        for _ in range(GIB // len(block)):
            yield block

    started = time.monotonic()
    with PeakRss(pid) as rss:
        response = httpx.post(
            f"{url}/sink", content=body(), headers={"content-length": str(GIB)}, timeout=60
        )
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.text == str(GIB)
    print(f"upload: 1 GiB in {elapsed:.1f}s, proxy RSS growth {rss.growth >> 20} MiB")
    assert rss.growth < MAX_GROWTH, f"proxy RSS grew {rss.growth >> 20} MiB"
    assert elapsed < MAX_SECONDS
