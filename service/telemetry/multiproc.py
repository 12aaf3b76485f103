"""Metrics with several workers: whose files are whose, what a scrape answers, and the
process figures of every process of the pod.

**Files per worker slot, not per pid.** prometheus-client's multiprocess mode writes one set
of files per process identifier, and only ``mark_process_dead`` removes anything (a dead
process's live gauges). Keyed by pid, every respawn would leave its counter and histogram
files behind for good: the directory (a small ``/tmp`` in the pod) grows with each crash and
every scrape reads more. Here a worker's identifier is its slot index (``w0`` ..), which the
supervisor gives a replacement only once the dead worker is joined, so no two live processes
ever share one (the rule ``MultiProcessValue`` sets for a custom identifier). A replacement
opens the files its predecessor left and continues from their values: totals stay monotonic
with no merge step and no moment where a scrape could count a dead worker twice or not at
all, and the directory holds one set of files per slot however often workers die.

**Exemplars.** The files store no exemplars. Each worker keeps the latest exemplar of each
histogram bucket in memory (as one process does), and the worker answering a scrape attaches
its own to the merged buckets: every exemplar is a real observation of that bucket, from the
worker that took the scrape. Exemplars of the other workers show up when scrapes land on
them.

**Process figures.** ``process_*`` per worker, labelled ``worker="0"`` .. and
``worker="supervisor"``, read from ``/proc`` at scrape time for every pid in the pod's
table (pod.py), so they are as fresh as one process's own and a stuck worker cannot freeze
its figures.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from .merge import FileMerge
from .pod import PodTable
from .prometheus_compat import use_value_class

RESTARTS = "relay_worker_restarts"
RESTARTS_HELP = "Worker processes respawned after one died (always 0 with one worker)."
SUPERVISOR = "supervisor"


def worker_file_id(index: int) -> str:
    """The identifier in a worker slot's file names (``counter_w0.db``)."""
    return f"w{index}"


def _set_exemplar(self: Any, exemplar: Exemplar) -> None:
    self._exemplar = exemplar


def _get_exemplar(self: Any) -> Exemplar | None:
    return getattr(self, "_exemplar", None)


def use_files_of(identifier: str) -> None:
    """Back this process's metrics with the files named ``identifier`` and keep exemplars in
    memory. Call before the first metric is created."""
    use_value_class(identifier, {"set_exemplar": _set_exemplar, "get_exemplar": _get_exemplar})


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


class WorkerRestarts(Collector):
    """``relay_worker_restarts_total`` from the pod's table; 0 without one."""

    def __init__(self, table: PodTable | None) -> None:
        self._table = table

    def collect(self) -> Iterator[Metric]:
        value = self._table.restarts if self._table is not None else 0
        yield CounterMetricFamily(RESTARTS, RESTARTS_HELP, value=value)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(RESTARTS, RESTARTS_HELP)


class WorkerProcesses(Collector):
    """``process_*`` of every live worker and of the supervisor, with a ``worker`` label."""

    def __init__(self, table: PodTable) -> None:
        self._table = table

    def targets(self) -> list[tuple[str, int]]:
        workers = [(str(index), pid) for index, pid, _ in self._table.slots() if pid]
        return [*workers, (SUPERVISOR, self._table.supervisor_pid)]

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for label, pid in self.targets():
            # A process that died since the table was read yields nothing.
            one = ProcessCollector(pid=_constant(pid), registry=None)
            for family in one.collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "worker": label}, sample.value)
        yield from merged.values()


def process_collectors(table: PodTable | None) -> list[Collector]:
    """The process, platform and restart metrics: one process's own, or every process of a
    pod with several workers."""
    processes: Collector = (
        WorkerProcesses(table) if table is not None else ProcessCollector(registry=None)
    )
    return [processes, PlatformCollector(registry=None), WorkerRestarts(table)]


def _exemplars(
    local: Sequence[Collector],
) -> dict[tuple[str, frozenset[tuple[str, str]]], Exemplar]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.exemplar
        for collector in local
        for metric in collector.collect()
        for sample in metric.samples
        if sample.exemplar is not None
    }


class PodScrape(Collector):
    """What a worker answers ``/metrics`` with in multiprocess mode: every file in the
    directory merged, this worker's exemplars on the merged samples, and the process metrics.

    Reading and merging the files costs time proportional to the directory; the admin app
    runs it in a thread (admin.py), off the loop that serves proxy traffic.
    """

    def __init__(
        self, path: str, exemplars_of: Sequence[Collector], table: PodTable | None
    ) -> None:
        """``exemplars_of``: this worker's metrics that carry exemplars (read in memory: a
        whole collection of its registry took a fifth of a large scrape)."""
        self._path = path
        self._local = exemplars_of
        self._others = process_collectors(table)
        self._merge = FileMerge()

    def collect(self) -> Iterable[Metric]:
        exemplars = _exemplars(self._local)
        files = glob.glob(os.path.join(self._path, "*.db"))
        merged = self._merge.merge(files)
        for metric in merged:
            if exemplars:
                metric.samples = [
                    sample._replace(
                        exemplar=exemplars.get((sample.name, frozenset(sample.labels.items())))
                    )
                    for sample in metric.samples
                ]
            yield metric
        for collector in self._others:
            yield from collector.collect()
