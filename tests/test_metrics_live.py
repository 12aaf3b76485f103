"""Metrics as Prometheus sees them: a real server scraping a real proxy process, several
workers aggregated through multiprocess mode, and exemplars linking latency to traces."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.metrics import exposition, samples, scrape, value
from tests.support.net import wait_http, wait_until
from tests.support.otlp import otlp_receiver
from tests.support.prometheus import Prometheus, prometheus
from tests.support.relays import demo_config, spawn_relay, worker_processes

pytestmark = pytest.mark.live


def test_two_workers_sum_counters_and_drop_dead_workers_gauges(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    with spawn_relay(demo_config(workers=2), tmp_path, env) as relay:
        supervisor = psutil.Process(relay.process.pid)
        workers = worker_processes(supervisor)
        assert len(workers) == 2, workers
        for _ in range(40):
            # A new connection per request, so the kernel spreads them over both workers.
            with httpx.Client(base_url=relay.url) as client:
                assert client.get("/").status_code == 200
        m = scrape(relay.admin_url)
        assert value(m, "relay_requests_total", upstream="demo", code="200") == 40
        assert value(m, "relay_request_duration_seconds_count", upstream="demo") == 40
        assert value(m, "relay_pool_max_connections", upstream="demo") == 200  # 2 x 100
        # One set of files per worker slot, named by its index (not its pid).
        files = [path.name for path in (tmp_path / "prom").glob("*.db")]
        assert {name.rsplit("_", 1)[1] for name in files} == {"w0.db", "w1.db"}, files

        # Park requests in both workers, then kill both: their live gauges must go.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            parked = [pool.submit(_get_quietly, f"{relay.url}/delay/30") for _ in range(8)]
            wait_until(
                lambda: value(scrape(relay.admin_url), "relay_requests_in_flight") >= 8,
                10,
                "requests never became in-flight",
            )
            for worker in workers:
                worker.send_signal(signal.SIGKILL)
            for future in parked:
                future.result(timeout=15)
        deadline = time.monotonic() + 20
        while True:
            try:
                m = scrape(relay.admin_url)
                fresh = [p for p in worker_processes(supervisor) if p not in workers]
                if len(fresh) >= 2 and value(m, "relay_requests_in_flight") == 0:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "in-flight gauge of dead workers was kept"
            time.sleep(0.1)
        wait_http(f"{relay.admin_url}/readyz")
        # Counters of the dead workers are history and stay.
        assert value(m, "relay_requests_total", upstream="demo", code="200") == 40


def _get_quietly(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(url, timeout=20)


def exemplar_trace_ids(prom: Prometheus) -> set[str]:
    now = time.time()
    exemplars = prom.api(
        "/api/v1/query_exemplars",
        query='relay_request_duration_seconds_bucket{upstream="demo"}',
        start=str(now - 300),
        end=str(now + 60),
    )
    return {e["labels"]["trace_id"] for series in exemplars for e in series["exemplars"]}


@pytest.mark.parametrize("workers", [1, 2])
def test_prometheus_scrapes_quantiles_and_exemplars(tmp_path: Path, workers: int) -> None:
    """With several workers too: each keeps its exemplars, and the one that answers a scrape
    puts its own on the merged buckets."""
    with otlp_receiver() as (endpoint, receiver):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "relay-test",
        }
        if workers > 1:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
        with spawn_relay(demo_config(workers=workers), tmp_path, env) as relay:
            admin = relay.admin_url.removeprefix("http://")
            with prometheus([admin], extra_args=["--enable-feature=exemplar-storage"]) as prom:
                prom.wait_for('up{job="relay"} == 1')
                deadline = time.monotonic() + 60
                quantile = (
                    "histogram_quantile(0.99, sum by (le, upstream) "
                    '(rate(relay_request_duration_seconds_bucket{upstream="demo"}[30s])))'
                )
                result: list[dict[str, Any]] = []
                trace_ids: set[str] = set()
                while not (result and trace_ids) and time.monotonic() < deadline:
                    for _ in range(20):
                        # A connection each: with several workers, every one serves some.
                        assert httpx.get(f"{relay.url}/").status_code == 200
                    time.sleep(0.5)
                    result = [r for r in prom.query(quantile) if r["value"][1] != "NaN"]
                    trace_ids = exemplar_trace_ids(prom)
                assert result, "no quantile from the scraped histogram"
                p99 = float(result[0]["value"][1])
                assert 0 < p99 <= 1.0, p99
                assert trace_ids, "no exemplar"
        spans = receiver.wait_for(lambda s: any(x.trace_id in trace_ids for x in s))
        assert any(span.trace_id in trace_ids for span in spans)


def test_empty_multiprocess_dir_means_single_process_metrics(tmp_path: Path) -> None:
    before = set(Path.cwd().glob("*.db"))
    with spawn_relay(demo_config(), tmp_path, {"PROMETHEUS_MULTIPROC_DIR": ""}) as relay:
        for _ in range(5):
            assert httpx.get(f"{relay.url}/").status_code == 200
        text = exposition(relay.admin_url)
    assert value(samples(text), "relay_requests_total", upstream="demo", code="200") == 5
    assert "process_resident_memory_bytes" in text  # only in single-process mode
    assert set(Path.cwd().glob("*.db")) == before
