"""Metrics of upstreams' endpoints: how many are in each state, ejections, health checks,
discovery refreshes and recycled connections, all by upstream (never by pod address: an
address is a label value that changes with every rollout; the admin ``/upstreams`` has them).

The state gauge is read from the endpoint sets at scrape time in one process. With several
workers each has its own view (its own ejections and checks): a sampler sets live gauges and
the scrape takes the largest count any worker sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..config_upstreams import UpstreamConfig
from ..upstreams.endpoints import EJECTION_REASONS, EndpointCounts, State
from .names import PREFIX
from .zeros import ZeroSeries

STATES = tuple(state.value for state in State)
RESULTS = ("success", "failure")
RECYCLE_REASONS = ("age", "requests")
ENDPOINTS_HELP = (
    "Endpoints of the upstream by state: healthy, ejected (outlier detection), unhealthy "
    "(failing its health check) or draining (gone from discovery, finishing its requests)."
)
EndpointCountSource = Callable[[], Iterable[tuple[str, EndpointCounts]]]


def _samples(counts: Iterable[tuple[str, EndpointCounts]]) -> Iterator[tuple[str, str, int]]:
    for upstream, count in counts:
        for state in STATES:
            yield upstream, state, getattr(count, state)


class _EndpointCollector(Collector):
    def __init__(self, counts: EndpointCountSource) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_upstream_endpoints", ENDPOINTS_HELP, labels=["upstream", "state"]
        )
        for upstream, state, value in _samples(self._counts()):
            family.add_metric([upstream, state], value)
        yield family


class EndpointMetrics:
    """The families above, and the endpoint observer the upstreams report to."""

    def __init__(
        self,
        registry: CollectorRegistry,
        zeros: ZeroSeries,
        counts: EndpointCountSource,
        *,
        multiprocess: bool,
    ) -> None:
        self._zeros = zeros
        self._counts = counts

        def counter(name: str, help_text: str, label: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", help_text, ["upstream", label], registry=registry)

        self.ejections = counter(
            "upstream_ejections",
            "Endpoints ejected by outlier detection, by the kind of failure that tipped it "
            "(connect, reset, status: a 502/503/504 answer).",
            "reason",
        )
        self.health_checks = counter(
            "upstream_health_checks", "Active health checks of endpoints, by result.", "result"
        )
        self.discovery_refreshes = counter(
            "upstream_discovery_refreshes",
            "DNS resolutions of the upstream's endpoints, by result (a failure keeps the last "
            "set).",
            "result",
        )
        self.recycled = counter(
            "upstream_connections_recycled",
            "Connections closed when they came back idle, by reason: age "
            "(pool.max_connection_age_seconds) or requests (pool.max_requests_per_connection).",
            "reason",
        )
        self._gauge: Gauge | None = None
        if multiprocess:
            self._gauge = Gauge(
                f"{PREFIX}_upstream_endpoints",
                ENDPOINTS_HELP,
                ["upstream", "state"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        else:
            registry.register(_EndpointCollector(counts))

    def start_at_zero(self, upstreams: Mapping[str, UpstreamConfig]) -> None:
        """The counters that can move for each upstream, at 0 from the first scrape."""
        zero = self._zeros.add
        labels = ["upstream", "reason"]
        balanced = [n for n, c in upstreams.items() if c.balanced]
        zero(self.ejections, labels, [(n, r) for n in balanced for r in EJECTION_REASONS])
        checked = [n for n, c in upstreams.items() if c.health_check.path is not None]
        zero(self.health_checks, ["upstream", "result"], [(n, r) for n in checked for r in RESULTS])
        dns = [n for n, c in upstreams.items() if c.discovery.mode == "dns"]
        zero(
            self.discovery_refreshes, ["upstream", "result"], [(n, r) for n in dns for r in RESULTS]
        )
        recycling = [
            n
            for n, c in upstreams.items()
            if c.pool.max_connection_age_seconds or c.pool.max_requests_per_connection
        ]
        zero(self.recycled, labels, [(n, r) for n in recycling for r in RECYCLE_REASONS])

    def sample(self) -> None:
        """Copy the endpoint counts into the live gauge (several workers)."""
        if self._gauge is None:
            return
        for upstream, state, value in _samples(self._counts()):
            self._gauge.labels(upstream, state).set(value)

    # -- endpoint observer -------------------------------------------------------------
    def ejection(self, upstream: str, reason: str) -> None:
        self.ejections.labels(upstream, reason).inc()

    def health_check(self, upstream: str, result: str) -> None:
        self.health_checks.labels(upstream, result).inc()

    def discovery_refresh(self, upstream: str, result: str) -> None:
        self.discovery_refreshes.labels(upstream, result).inc()

    def connection_recycled(self, upstream: str, reason: str) -> None:
        self.recycled.labels(upstream, reason).inc()
