"""Prometheus metrics: per-upstream traffic, latency, pool saturation, disconnects, errors.

Every label value comes from the config (upstream and route names) or from a closed set
(method, status code, side, phase, reason), so cardinality is bounded by the config and
never by traffic. Label names avoid the target labels Prometheus attaches itself
(``service``, ``namespace``, ``pod``, ``instance``, ``job``).

Single process: metrics live in a private registry and pool gauges are read from the pool
gates at scrape time. Several workers: prometheus-client multiprocess mode (directory in
``PROMETHEUS_MULTIPROC_DIR``); pool gauges become live gauges refreshed by a sampler, and
the files, exemplars and process figures of the workers are multiproc.py's business.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, Literal, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from .. import __version__
from ..errors import CLIENT_REASONS, Reason
from ..exchange import Exchange, ExchangeObserver, Phase, Side
from ..retry_config import CONNECT_RETRY, STALE_CONNECTION
from ..upstreams.gated import PoolSnapshot
from .endpoint_metrics import EndpointCountSource, EndpointMetrics
from .multiproc import PodScrape, process_collectors
from .names import PREFIX, UPSTREAM, UPSTREAM_ROUTE
from .pod import PodTable
from .pool_metrics import POOL_GAUGES, PoolCollector, pool_samples
from .prometheus_compat import legacy_names_as_is
from .websocket_metrics import SessionMetrics
from .zeros import Exposition, ZeroSeries

NO_UPSTREAM = "-"  # label value for requests that matched no route
ERROR_LABELS = ["upstream", "reason"]
DISCONNECT_LABELS = ["upstream", "side", "phase"]
TLS_RELOAD_LABELS = ["upstream", "result"]
TLS_RELOAD_RESULTS = ("success", "failure")
RETRY_LABELS = ["upstream", "reason"]
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# 1 ms to 60 s: the range between a cached upstream answer and a proxy read timeout.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
POOL_WAIT_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

ExemplarSource = Callable[[], dict[str, str] | None]
GaugeMode = Literal["livesum", "max"]


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def fold_method(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A metric's label children, each looked up once.

    ``labels()`` validates, stringifies and takes a lock on every call; on the hot path
    that was several calls per request for a handful of distinct label sets (bounded by
    the config), so the children are kept here.
    """

    __slots__ = ("_cache", "metric")

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._cache: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self.metric.labels(*values)
        return child


class Metrics(ExchangeObserver):
    """All metric objects of one process, plus the exposition of the admin ``/metrics``."""

    def __init__(
        self,
        snapshots: Callable[[], Iterable[PoolSnapshot]] = tuple,
        exemplar: ExemplarSource | None = None,
        pod: PodTable | None = None,
        endpoint_counts: EndpointCountSource = tuple,
    ) -> None:
        # ``*_created`` series double the series count and no dashboard or alert uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry(auto_describe=True)
        self._exemplar = exemplar
        self._snapshots = snapshots
        self._zeros = ZeroSeries()
        # Defined in the order of the exposition.
        self._define_traffic()
        self._define_upstream_failures()
        self._define_pool_waits()
        self._define_body_bytes()
        self._define_sli()
        self._define_build_info()
        self.websocket = SessionMetrics(
            self._counter,
            lambda name, text, labels: self._gauge(name, text, labels, "livesum"),
            self._histogram,
        )
        self._define_pool_gauges()
        self.endpoints = EndpointMetrics(
            self.registry, self._zeros, endpoint_counts, multiprocess=self.multiprocess
        )
        self._register_process_metrics(pod)

    # -- families --------------------------------------------------------------------------
    def _counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        return Counter(f"{PREFIX}_{name}", documentation, labels, registry=self.registry)

    def _histogram(
        self, name: str, documentation: str, labels: list[str], buckets: Sequence[float]
    ) -> Histogram:
        return Histogram(
            f"{PREFIX}_{name}", documentation, labels, buckets=buckets, registry=self.registry
        )

    def _gauge(self, name: str, documentation: str, labels: list[str], mode: GaugeMode) -> Gauge:
        # ``mode``: how a scrape merges the workers' values in multiprocess mode.
        return Gauge(
            f"{PREFIX}_{name}",
            documentation,
            labels,
            registry=self.registry,
            multiprocess_mode=mode,
        )

    def _define_traffic(self) -> None:
        self.requests = self._counter(
            "requests",
            "Proxied requests, by upstream, route, method and status code.",
            ["upstream", "route", "method", "code"],
        )
        self.duration = self._histogram(
            "request_duration_seconds",
            "Time from request start to the last response byte sent (includes the streamed body).",
            UPSTREAM_ROUTE,
            LATENCY_BUCKETS,
        )
        self.headers_latency = self._histogram(
            "upstream_response_headers_seconds",
            "Time from request start until the upstream's response headers arrived.",
            UPSTREAM_ROUTE,
            LATENCY_BUCKETS,
        )
        self.in_flight = self._gauge(
            "requests_in_flight", "Requests being proxied right now.", UPSTREAM, "livesum"
        )
        self._requests = Children(self.requests)
        self._duration = Children(self.duration)
        self._headers_latency = Children(self.headers_latency)
        self._in_flight = Children(self.in_flight)

    def _define_upstream_failures(self) -> None:
        self.disconnects = self._counter(
            "disconnects",
            "Connections lost mid-exchange, by side (client|upstream) and phase "
            "(before_headers|body).",
            DISCONNECT_LABELS,
        )
        self.errors = self._counter(
            "upstream_errors", "Upstream failures, by bounded reason.", ERROR_LABELS
        )
        self.retries = self._counter(
            "upstream_retries",
            "Attempts sent again, by reason: stale_connection (a reused keep-alive connection "
            "closed by the upstream) or the route retry policy's trigger (connect, reset, "
            "read_timeout, status_502, status_503, status_504).",
            RETRY_LABELS,
        )
        self.retry_budget_exhausted = self._counter(
            "upstream_retry_budget_exhausted",
            "Retries the route policy would have made but the upstream's retry budget refused "
            "(the failure was answered as it was).",
            UPSTREAM,
        )
        self._retries = Children(self.retries)
        self.tls_reloads = self._counter(
            "tls_reloads",
            "Upstream TLS files (CA, client certificate, key) re-read after a change on disk, "
            "by result: success (new connections use them) or failure (unusable, the previous "
            "ones stay).",
            TLS_RELOAD_LABELS,
        )

    def _define_pool_waits(self) -> None:
        self.pool_wait_seconds = self._histogram(
            "pool_wait_seconds",
            "Time requests waited for a free upstream connection.",
            UPSTREAM,
            POOL_WAIT_BUCKETS,
        )
        self.pool_timeouts = self._counter(
            "pool_timeouts",
            "Requests refused (503) for want of an upstream connection: none free within the "
            "pool timeout, or the wait queue full.",
            UPSTREAM,
        )
        self._pool_wait = Children(self.pool_wait_seconds)

    def _define_body_bytes(self) -> None:
        self.request_bytes = self._counter(
            "request_body_bytes", "Request body bytes forwarded upstream.", UPSTREAM
        )
        self.response_bytes = self._counter(
            "response_body_bytes", "Response body bytes sent to clients.", UPSTREAM
        )
        self._request_bytes = Children(self.request_bytes)
        self._response_bytes = Children(self.response_bytes)

    def _define_sli(self) -> None:
        self.failed = self._counter(
            "requests_failed",
            "Requests that failed the availability SLI, each once: answered with a 5xx, or a "
            "response cut short after its status was sent (not by the client).",
            UPSTREAM_ROUTE,
        )
        self.truncated = self._counter(
            "responses_truncated",
            "Responses whose body was cut short by the upstream or the proxy after a non-5xx "
            "status was sent (client hang-ups not included).",
            UPSTREAM_ROUTE,
        )

    def _define_build_info(self) -> None:
        self.build_info = self._gauge(
            "build_info",
            "Build information; the value is always 1.",
            ["version", "python_version"],
            "max",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)

    def _define_pool_gauges(self) -> None:
        """Read at scrape time in one process; with several, each worker's sampler sets live
        gauges that the scrape sums."""
        self._pool_gauges: dict[str, Gauge] = {}
        if not self.multiprocess:
            self.registry.register(PoolCollector(lambda: self._snapshots()))
            return
        for name, (help_text, labels) in POOL_GAUGES.items():
            self._pool_gauges[name] = self._gauge(name, help_text, labels, "livesum")

    def _register_process_metrics(self, pod: PodTable | None) -> None:
        """process_* (CPU, memory, fds, start time), python_info and the worker restarts:
        this process's own, or at scrape time every process of the pod (multiproc.py)."""
        self._pod_scrape: PodScrape | None = None
        path = multiprocess_dir()
        if path is not None:
            with_exemplars = [self.duration, self.headers_latency] if self._exemplar else []
            self._pod_scrape = PodScrape(path, with_exemplars, pod)
            return
        for collector in process_collectors(None):
            self.registry.register(collector)

    def start_at_zero(
        self,
        upstreams: Iterable[str],
        routes: Iterable[tuple[str, str]],
        tls_files: Iterable[str] = (),
        retry_reasons: Mapping[str, Iterable[str]] | None = None,
        websocket_routes: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Expose the counter series of every configured upstream and route at 0 from the
        first scrape (zeros.py says why, and why at scrape time): per upstream, every failure
        reason, disconnect side and phase, retries, pool timeouts, body bytes and requests in
        flight; per route, failed and truncated requests. ``relay_requests_total`` (method
        and status code) and the histograms appear on first use: creating them for every
        method and code would multiply the series of each route by about 50. ``tls_files``:
        the upstreams whose TLS files are watched (their reloads, by result).
        ``retry_reasons``: the reasons the routes' retry policies can count, for the upstreams
        some route retries on (with the budget's refusals); the pool gate's own,
        stale_connection and connect, are there for every upstream. ``websocket_routes``: the
        routes that proxy WebSockets (their sessions, by result).
        """
        names = list(upstreams)
        per_upstream = [(name,) for name in names]
        reasons = [reason.value for reason in Reason if reason not in CLIENT_REASONS]
        zero = self._zeros.add
        zero(self.errors, ERROR_LABELS, [(u, r) for u in names for r in reasons])
        disconnects = [(u, s.value, p.value) for u in names for s in Side for p in Phase]
        zero(self.disconnects, DISCONNECT_LABELS, disconnects)
        for family in (self.pool_timeouts, self.request_bytes, self.response_bytes):
            zero(family, UPSTREAM, per_upstream)
        policies = retry_reasons or {}
        own = {STALE_CONNECTION, CONNECT_RETRY}  # the pool gate's, on every upstream
        retried = [(u, r) for u in names for r in sorted(own | set(policies.get(u, ())))]
        zero(self.retries, RETRY_LABELS, retried)
        budgets = [(u,) for u in names if u in policies]
        zero(self.retry_budget_exhausted, UPSTREAM, budgets)
        zero(self.in_flight, UPSTREAM, per_upstream)
        pairs = list(routes)
        zero(self.failed, UPSTREAM_ROUTE, pairs)
        zero(self.truncated, UPSTREAM_ROUTE, pairs)
        reloads = [(u, result) for u in tls_files for result in TLS_RELOAD_RESULTS]
        zero(self.tls_reloads, TLS_RELOAD_LABELS, reloads)
        self.websocket.start_at_zero(self._zeros, names, websocket_routes)

    # -- pool observer (called from the pool gate) --------------------------------------
    def pool_wait(self, upstream: str, seconds: float) -> None:
        self._pool_wait(upstream).observe(seconds)

    def pool_timeout(self, upstream: str) -> None:
        self.pool_timeouts.labels(upstream).inc()

    def retry(self, upstream: str, reason: str) -> None:
        self._retries(upstream, reason).inc()

    def tls_reload(self, upstreams: Iterable[str], swapped: bool) -> None:
        """The TLS files of ``upstreams`` changed: ``swapped`` if the new ones are in use."""
        result = TLS_RELOAD_RESULTS[0] if swapped else TLS_RELOAD_RESULTS[1]
        for upstream in upstreams:
            self.tls_reloads.labels(upstream, result).inc()

    def sample_pools(self) -> None:
        """Copy pool snapshots into live gauges (multiprocess mode's periodic sampler)."""
        if not self.multiprocess:
            return
        self.endpoints.sample()
        for name, labels, value in pool_samples(self._snapshots()):
            self._pool_gauges[name].labels(*labels).set(value)

    # -- exchange observer (called by the proxy) ------------------------------------------
    def started(self, exchange: Exchange) -> None:
        if exchange.upstream is not None:
            self._in_flight(exchange.upstream).inc()

    def headers(self, exchange: Exchange) -> None:
        if exchange.upstream is not None and exchange.headers_seconds is not None:
            self._headers_latency(exchange.upstream, exchange.route or NO_UPSTREAM).observe(
                exchange.headers_seconds, exemplar=self._exemplar_now()
            )

    def retrying(self, exchange: Exchange) -> None:
        if exchange.upstream is not None and exchange.retry_reason is not None:
            self._retries(exchange.upstream, exchange.retry_reason).inc()

    def retry_denied(self, exchange: Exchange) -> None:
        if exchange.upstream is not None:
            self.retry_budget_exhausted.labels(exchange.upstream).inc()

    def upgraded(self, exchange: Exchange) -> None:
        # An open session is not a request in flight: relay_websocket_sessions counts it.
        if exchange.upstream is not None:
            self._in_flight(exchange.upstream).dec()
        self.websocket.upgraded(exchange)

    def finished(self, exchange: Exchange) -> None:
        upstream = exchange.upstream or NO_UPSTREAM
        route = exchange.route or NO_UPSTREAM
        code = str(exchange.status) if exchange.status is not None else "0"
        self._requests(upstream, route, fold_method(exchange.method), code).inc()
        if exchange.upstream is None:
            return
        session = exchange.websocket
        if session is not None:
            self.websocket.finished(exchange, route)
        if session is None or not session.opened:
            # An open session left the in-flight gauge at its 101, and its length is the
            # session duration's, not a request's.
            self._in_flight(upstream).dec()
            if exchange.total_seconds is not None:
                self._duration(upstream, route).observe(
                    exchange.total_seconds, exemplar=self._exemplar_now()
                )
        if exchange.disconnect_side is not None and exchange.disconnect_phase is not None:
            self.disconnects.labels(
                upstream, exchange.disconnect_side.value, exchange.disconnect_phase.value
            ).inc()
        if exchange.reason is not None and exchange.reason not in CLIENT_REASONS:
            self.errors.labels(upstream, exchange.reason.value).inc()
        if exchange.failed:
            self.failed.labels(upstream, route).inc()
            if exchange.truncated and (exchange.status or 0) < 500:
                self.truncated.labels(upstream, route).inc()
        if exchange.request_bytes:
            self._request_bytes(upstream).inc(exchange.request_bytes)
        if exchange.response_bytes:
            self._response_bytes(upstream).inc(exchange.response_bytes)

    def _exemplar_now(self) -> dict[str, str] | None:
        return self._exemplar() if self._exemplar is not None else None

    # -- exposition --------------------------------------------------------------------------
    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Encode for the scraper: OpenMetrics (with exemplars) when it asks for it. In
        multiprocess mode this reads every worker's files: the admin app calls it in a thread."""
        encoder, content_type = choose_encoder(accept or "")
        encoder = legacy_names_as_is(encoder)
        source: Collector = self._pod_scrape if self._pod_scrape is not None else self.registry
        return encoder(Exposition(source, self._zeros)), content_type
