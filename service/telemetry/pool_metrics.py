"""The pool gauges (connections by state, the maximum, requests waiting), defined once for
both metrics modes: read from the pool gates' snapshots at scrape time with one process,
sampled into live gauges every second with several (metrics.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..upstreams.gated import PoolSnapshot
from .names import PREFIX, UPSTREAM

# Name (after the prefix), help and labels of each pool gauge: one definition for both
# modes (read at scrape time with one process, sampled into live gauges with several).
POOL_GAUGES: dict[str, tuple[str, list[str]]] = {
    "pool_connections": (
        "Upstream pool connections by state (in_use includes ones being opened).",
        ["upstream", "state"],
    ),
    "pool_max_connections": ("Configured maximum connections of the upstream pool.", UPSTREAM),
    "pool_waiting_requests": ("Requests waiting for a free upstream connection.", UPSTREAM),
}

PoolSample = tuple[str, tuple[str, ...], float]


def pool_samples(snapshots: Iterable[PoolSnapshot]) -> Iterator[PoolSample]:
    """(gauge, label values, value) of every pool gauge, from the pool gates' snapshots."""
    for snap in snapshots:
        yield "pool_connections", (snap.upstream, "in_use"), snap.in_use
        yield "pool_connections", (snap.upstream, "idle"), snap.idle
        yield "pool_max_connections", (snap.upstream,), snap.max
        yield "pool_waiting_requests", (snap.upstream,), snap.waiting


class PoolCollector(Collector):
    """Reads the pool gates at scrape time (single-process mode)."""

    def __init__(self, snapshots: Callable[[], Iterable[PoolSnapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = pool_families()
        for name, labels, value in pool_samples(self._snapshots()):
            families[name].add_metric(labels, value)
        yield from families.values()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from pool_families().values()


def pool_families() -> dict[str, GaugeMetricFamily]:
    return {
        name: GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=labels)
        for name, (help_text, labels) in POOL_GAUGES.items()
    }
