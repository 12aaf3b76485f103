"""Several workers, as real processes: a worker that dies is respawned in its slot and
counted while the pod keeps serving and stays ready; a worker that keeps dying at start
stops the pod; every process of the pod has its own process figures; and ``/metrics`` merges
the multiprocess files off the loop that serves proxy traffic, a bounded number at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from service.server import admin, workers
from service.telemetry.pod import PodTable, WorkerState
from tests.support.metrics import Samples, exposition, samples, scrape, value
from tests.support.net import free_port, wait_until
from tests.support.relays import RelayProcess, demo_config, spawn_relay, worker_processes
from tests.support.tools import require_tool

PROCESS_METRICS = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
)


def by_worker(m: Samples, name: str) -> dict[str, float]:
    return {dict(labels).get("worker", ""): v for (n, labels), v in m.items() if n == name}


def get_fresh(url: str) -> httpx.Response:
    """GET on a connection of its own, so that any worker may take it."""
    with httpx.Client(timeout=10) as client:
        return client.get(url)


def slot_of(relay: RelayProcess, pid: int) -> str:
    """The worker index of ``pid`` (the supervisor names the pids in slot order)."""
    [started] = relay.messages("started 2 workers (pids ")
    pids = started.split("(pids ", 1)[1].split(")", 1)[0].split(", ")
    return str(pids.index(str(pid)))


def multiproc_env(tmp_path: Path) -> dict[str, str]:
    # One directory per test: the supervisor empties it at start.
    return {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}


# -- a worker dies ---------------------------------------------------------------------------


@pytest.mark.live
def test_a_killed_worker_is_respawned_counted_and_the_pod_keeps_serving(tmp_path: Path) -> None:
    # Every worker takes START_DELAY_SECONDS to open its pools: the replacement is visibly
    # "starting" (its admin listener answers, its proxy listener does not accept yet) for
    # that long, next to a ready worker.
    config = demo_config(workers=2, app_hook="tests.support.worker_hooks:slow_start")
    prom = tmp_path / "prom"
    with spawn_relay(config, tmp_path, multiproc_env(tmp_path)) as relay:
        wait_until(lambda: len(relay.messages("ready: ")) == 2, 30, "both workers ready")
        served = 0
        for _ in range(10):
            assert get_fresh(f"{relay.url}/").status_code == 200
            served += 1
        before = scrape(relay.admin_url)
        assert value(before, "relay_worker_restarts_total") == 0
        for name in PROCESS_METRICS:
            assert set(by_worker(before, name)) == {"0", "1", "supervisor"}, name
        files = sorted(os.listdir(prom))
        metric_files = [name for name in files if name.endswith(".db")]
        assert metric_files and all(n.endswith(("_w0.db", "_w1.db")) for n in metric_files), files

        victim = worker_processes(psutil.Process(relay.process.pid))[0]
        slot = slot_of(relay, victim.pid)
        started = by_worker(before, "process_start_time_seconds")
        victim.kill()
        victim.wait(10)
        readiness = []
        while len(relay.messages("ready: ")) < 3:
            assert len(readiness) < 2000, "the worker was not respawned"
            readiness.append(get_fresh(f"{relay.admin_url}/readyz").text)
            assert get_fresh(f"{relay.url}/").status_code == 200
            served += 1
        # The pod answers, whichever worker takes the probe: ready all along, the
        # replacement's own start included.
        assert set(readiness) == {"ready\n"}, collections.Counter(readiness)
        assert len(readiness) >= 10  # probes spread over the replacement's start

        after = scrape(relay.admin_url)
        assert value(after, "relay_worker_restarts_total") == 1
        lint = subprocess.run(
            [require_tool("promtool"), "check", "metrics"],
            input=exposition(relay.admin_url),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint
        for name in PROCESS_METRICS:
            assert set(by_worker(after, name)) == {"0", "1", "supervisor"}, name
        restarted = by_worker(after, "process_start_time_seconds")
        assert {w for w in started if restarted[w] != started[w]} == {slot}
        # The replacement took over its slot's files: the dead worker's counts are kept,
        # and the directory did not grow.
        assert value(after, "relay_requests_total", upstream="demo", code="200") == served
        assert sorted(os.listdir(prom)) == files
    respawned = relay.messages(f"worker {slot} (pid {victim.pid}) exited with signal SIGKILL")
    assert len(respawned) == 1 and respawned[0].endswith("restarting it in 0.5s"), respawned


@pytest.mark.live
@pytest.mark.parametrize("multiprocess", [False, True])
def test_one_worker_has_the_process_metrics_of_its_own_and_no_restarts(
    tmp_path: Path, multiprocess: bool
) -> None:
    env = multiproc_env(tmp_path) if multiprocess else None
    with spawn_relay(demo_config(), tmp_path, env) as relay:
        m = scrape(relay.admin_url)
    assert value(m, "relay_worker_restarts_total") == 0
    for name in PROCESS_METRICS:
        assert by_worker(m, name).keys() == {""}, name  # one series, no worker label


# -- a worker keeps dying ----------------------------------------------------------------------


@pytest.mark.live
def test_a_worker_that_keeps_crashing_at_start_stops_the_pod(tmp_path: Path) -> None:
    config = demo_config(workers=2, app_hook="tests.support.worker_hooks:crash")
    config["server"].update(
        host="127.0.0.1", port=free_port(), admin_host="127.0.0.1", admin_port=free_port()
    )
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(path)],
        env={**os.environ, **multiproc_env(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == workers.EXIT_WORKERS_CRASHING, result.stdout[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] in ("ERROR", "CRITICAL")]
    assert len(errors) == 1, errors
    [error] = errors
    assert error["logger"] == "relay.workers"
    limit, stable = workers.CRASH_STREAK_LIMIT, workers.STABLE_AFTER_SECONDS
    slot = error["message"].split()[1]
    assert error["message"].startswith(
        f"worker {slot} died {limit} times in a row within {stable:g}s of starting (last: pid "
    ), error
    assert error["message"].endswith("exit code 1): stopping all workers; exit code 4")
    delays = [
        line["message"].rsplit(" ", 1)[1]
        for line in lines
        if line["message"].startswith(f"worker {slot} (pid ")
        and "restarting it in" in line["message"]
    ]
    assert delays == ["0.5s", "1s", "2s", "4s"][: limit - 1]
    assert lines[-1]["message"] == "stopped: all workers exited"


def test_respawn_delays_double_until_the_streak_stops_the_pod() -> None:
    respawns = workers.Respawns()
    assert [respawns.died(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, None]


def test_a_worker_that_ran_long_enough_ends_the_streak() -> None:
    respawns = workers.Respawns()
    assert [respawns.died(1.0) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert respawns.died(workers.STABLE_AFTER_SECONDS) == 0.5
    assert [respawns.died(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, None]


def test_respawn_delays_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "CRASH_STREAK_LIMIT", 10)
    respawns = workers.Respawns()
    delays = [respawns.died(1.0) for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, None]


# -- readiness is the pod's ------------------------------------------------------------------

GONE, STARTING, READY, DRAINING = (
    WorkerState.GONE, WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING,
)  # fmt: skip


@pytest.mark.parametrize(
    ("states", "stopping", "answer"),
    [
        ([READY, READY], False, (True, "ready")),
        ([READY, GONE], False, (True, "ready")),  # one died, its replacement not started yet
        ([STARTING, READY], False, (True, "ready")),  # ... or still starting
        ([DRAINING, READY], False, (True, "ready")),  # one told to stop on its own
        ([STARTING, STARTING], False, (False, "starting")),
        ([GONE, GONE], False, (False, "starting")),
        ([DRAINING, STARTING], False, (False, "draining")),
        ([READY, READY], True, (False, "draining")),  # the pod is stopping
    ],
)
def test_the_pod_is_ready_while_one_worker_is_and_it_is_not_stopping(
    states: list[WorkerState], stopping: bool, answer: tuple[bool, str]
) -> None:
    table = PodTable.local(len(states))
    for index, state in enumerate(states):
        table.starting(index)
        table.set_state(index, state)
    if stopping:
        table.stop()
    assert table.readiness() == answer


# -- /metrics off the serving loop -------------------------------------------------------------

FILLER_KEYS = 600  # what one 64 KiB file holds


def fill(directory: Path, files: int) -> None:
    """Counter files as dead processes of an unbounded directory would leave them."""
    keys = [
        mmap_key("relay_test_filler", "relay_test_filler_total", ["n"], [str(i)], "Filler.")
        for i in range(FILLER_KEYS)
    ]
    for number in range(files):
        mapped = MmapedDict(str(directory / f"counter_filler{number}.db"))
        for key in keys:
            mapped.write_value(key, 1.0, 0.0)
        mapped.close()


def cpu_of_other_threads(process: psutil.Process) -> float:
    """CPU seconds of every thread of ``process`` but its main one (the event loop's)."""
    return sum(t.user_time + t.system_time for t in process.threads() if t.id != process.pid)


@pytest.mark.live
def test_metrics_merge_in_a_thread_while_the_loop_serves(tmp_path: Path) -> None:
    # One process in multiprocess mode: the loop that would run a merge on it is the one
    # that serves every proxied request (and the demo upstream behind it).
    with spawn_relay(demo_config(), tmp_path, multiproc_env(tmp_path)) as relay:
        files = 2000  # a merge of a few seconds here
        fill(tmp_path / "prom", files)
        process = psutil.Process(relay.process.pid)
        idle = cpu_of_other_threads(process)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            scraping = pool.submit(httpx.get, f"{relay.admin_url}/metrics", timeout=120)
            while cpu_of_other_threads(process) < idle + 0.1:
                assert not scraping.done(), "the scrape ended with no thread but the loop working"
                time.sleep(0.01)
            # The merge is under way in a thread of its own: the loop serves meanwhile.
            for _ in range(3):
                assert get_fresh(f"{relay.url}/").status_code == 200
            assert not scraping.done(), "proxied requests waited for the scrape"
            response = scraping.result()
    assert response.status_code == 200
    assert value(samples(response.text), "relay_test_filler_total") == files * FILLER_KEYS


@pytest.mark.live
def test_concurrent_scrapes_are_bounded(tmp_path: Path) -> None:
    with spawn_relay(demo_config(), tmp_path, multiproc_env(tmp_path)) as relay:
        fill(tmp_path / "prom", 600)  # each merge outlasts the arrival of all the scrapes
        admitted = admin.MAX_SCRAPES + admin.MAX_WAITING_SCRAPES
        count = admitted + 4
        together = threading.Barrier(count)

        def one_scrape(_: int) -> httpx.Response:
            together.wait()
            return httpx.get(f"{relay.admin_url}/metrics", timeout=120)

        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            responses = list(pool.map(one_scrape, range(count)))
    statuses = collections.Counter(response.status_code for response in responses)
    assert statuses == {200: admitted, 503: 4}
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert response.text == "busy: too many scrapes at once\n"
