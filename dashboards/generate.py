"""Grafana dashboards for Relay, as code (grafana-foundation-sdk).

    python dashboards/generate.py          # rewrite dashboards/*.json
    python dashboards/generate.py --check  # exit 1 when a committed file differs

Needs grafana-foundation-sdk, which the `test` extra installs (pip install -e ".[test]").
SLO targets and alert thresholds are read from ``alerts/slo.yaml``, so the panels' thresholds,
the SLO board and the alerts agree. The building blocks are in ``dashboards/board.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SLO_FILE = HERE.parent / "alerts" / "slo.yaml"

try:
    import yaml
    from grafana_foundation_sdk.builders import dashboard as _sdk  # noqa: F401
except ImportError as exc:  # one clear line instead of a traceback
    package = {"yaml": "PyYAML"}.get(
        (exc.name or "").split(".")[0], "grafana-foundation-sdk==0.0.21"
    )
    sys.exit(f"dashboards/generate.py needs {package}: pip install -e '.[test]' installs it")

sys.path.insert(0, str(HERE))  # board.py sits next to this script

from board import (  # noqa: E402
    LEVEL,
    RATE_INTERVAL,
    RELAY_SELECTOR,
    SLO,
    UPSTREAM_SELECTOR,
    Panel,
    Query,
    board_link,
    build_dashboard,
    quantiles,
    runbook,
)


@dataclass(frozen=True)
class Objectives:
    errors_target: float
    latency_target: float
    threshold: float
    windows: tuple[str, ...]
    period_days: int
    page_factor: float  # the fastest burn-rate factor that pages
    burn_factors: tuple[float, ...]
    pool_utilization: float
    fds_ratio: float

    @property
    def errors_budget(self) -> float:
        return 1 - self.errors_target

    @property
    def latency_budget(self) -> float:
        return 1 - self.latency_target


def objectives() -> Objectives:
    raw = yaml.safe_load(SLO_FILE.read_text())
    slos, alerts = raw["slos"], raw["alerts"]
    burns = raw["burn_rate_alerts"]
    return Objectives(
        errors_target=float(slos["errors"]["target"]),
        latency_target=float(slos["latency"]["target"]),
        threshold=float(slos["latency"]["threshold_seconds"]),
        windows=tuple(str(w) for w in raw["windows"]),
        period_days=int(raw["slo_period_days"]),
        page_factor=max(float(b["factor"]) for b in burns if b["severity"] == "critical"),
        burn_factors=tuple(sorted({float(b["factor"]) for b in burns})),
        pool_utilization=float(alerts["pool_saturated"]["utilization"]),
        fds_ratio=float(alerts["fds_near_limit"]["ratio"]),
    )


def le(threshold: float) -> str:
    """The threshold bucket as prometheus_client writes it (0.5, 1.0) and Prometheus 3 (1)."""
    return f'le=~"{threshold:g}|{float(threshold)}"'


def errors_by_route() -> str:
    """The availability SLI per upstream and route (the recording rules keep upstreams only)."""
    valid = f'relay_requests_total{{{UPSTREAM_SELECTOR}, code!="499"}}[{RATE_INTERVAL}]'
    bad = f"rate(relay_requests_failed_total{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}])"
    return f"sum by (upstream, route) ({bad}) / sum by (upstream, route) (rate({valid}))"


def overview() -> dict[str, Any]:
    o = objectives()
    budget = o.errors_budget
    rate = f"sum by (upstream) (rate(relay_requests_total{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))"
    in_use = f'sum by (upstream) (relay_pool_connections{{{UPSTREAM_SELECTOR}, state="in_use"}})'
    pool_max = f"sum by (upstream) (relay_pool_max_connections{{{UPSTREAM_SELECTOR}}})"
    per_route = "sum by (le, upstream, route) (rate(relay_request_duration_seconds_bucket"
    panels = [
        Panel("Requests per second", [Query(
            f"sum(rate(relay_requests_total{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))")],
          "reqps", "Every request Relay answered, routed or not.", kind="stat", width=6,
          height=4, thresholds=[(None, "blue")]),
        Panel("Error ratio (availability SLI)", [Query(
            f"sum({LEVEL}:relay_requests_errors:rate5m{{{SLO}}})"
            f" / sum({LEVEL}:relay_requests_valid:rate5m{{{SLO}}})")], "percentunit",
          f"The availability SLI over 5m for the selected upstreams: 5xx and responses cut "
          f"short, over every routed request but 499s. Orange at the budget "
          f"({budget:.1%}), red at the page's burn rate ({o.page_factor:g}x).",
          kind="stat", width=6, height=4, decimals=2,
          thresholds=[(None, "green"), (budget, "orange"), (o.page_factor * budget, "red")],
          links=[runbook("RelayErrorBudgetFastBurn")]),
        Panel("Latency p99", [Query(
            f"histogram_quantile(0.99, sum by (le) "
            f"(rate(relay_request_duration_seconds_bucket"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}])))")], "s",
          f"Whole exchange, streamed body included. Red at the latency SLO's threshold "
          f"({o.threshold:g}s).", kind="stat", width=6, height=4,
          thresholds=[(None, "green"), (o.threshold / 2, "orange"), (o.threshold, "red")],
          links=[runbook("RelayLatencyBudgetFastBurn")]),
        Panel("Pool saturation", [Query(f"max({in_use} / {pool_max})")], "percentunit",
          f"The most used upstream pool: connections in use over max_connections. Red at "
          f"RelayPoolSaturated's {o.pool_utilization:.0%}.", kind="stat", width=6, height=4,
          thresholds=[(None, "green"), (0.7, "orange"), (o.pool_utilization, "red")],
          links=[board_link("relay-pools", "Relay / Upstream pools")]),
        Panel("Requests per second by upstream", [Query(rate, "{{upstream}}")], "reqps",
          "Proxied requests per upstream (relay_requests_total); upstream \"-\" matched no "
          "route."),
        Panel("Error ratio", [Query(f"{LEVEL}:relay_requests_errors:ratio_rate5m{{{SLO}}}",
                            "{{upstream}}")], "percentunit",
          "The availability SLI per upstream: its recording rule, as the burn-rate alerts read "
          "it (5xx and responses cut short, over every routed request but 499s).",
          thresholds=[(None, "transparent"), (budget, "orange"), (o.page_factor * budget, "red")],
          threshold_lines=True, links=[runbook("RelayErrorBudgetFastBurn")]),
        Panel("Latency, whole exchange", quantiles("relay_request_duration_seconds"), "s",
          "Request start to last body byte. Exemplars link to traces.", exemplars=True),
        Panel("Time to upstream headers", quantiles("relay_upstream_response_headers_seconds"), "s",
          "Request start to upstream response headers. Exemplars link to traces.",
          exemplars=True),
        Panel("Latency distribution", [Query(
            f"sum by (le) (rate(relay_request_duration_seconds_bucket"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{le}}", format="heatmap")], "s",
          "Requests per latency bucket over time, whole exchange. Exemplars (dots) link to "
          "traces.", kind="heatmap", exemplars=True),
        Panel("Responses by status code",
          [Query(f"sum by (code) (rate(relay_requests_total"
                 f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))", "{{code}}")],
          "reqps", "499: the client hung up before the response headers."),
        Panel("Upstreams and routes", [
            Query(f"sum by (upstream, route) "
                  f"(rate(relay_requests_total{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
              instant=True, format="table"),
            Query(errors_by_route(), instant=True, format="table"),
            Query(f"histogram_quantile(0.5, {per_route}{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}])))",
              instant=True, format="table"),
            Query(f"histogram_quantile(0.99, "
                  f"{per_route}{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}])))",
              instant=True, format="table"),
        ], "short", "Each route with its upstream: traffic, error ratio (as the SLI counts it) "
          "and latency, over the last rate interval.", kind="table", width=24,
          transformations=[
              ("merge", {}),
              ("organize", {
                  "excludeByName": {"Time": True},
                  "indexByName": {"upstream": 0, "route": 1, "Value #A": 2, "Value #B": 3,
                                  "Value #C": 4, "Value #D": 5},
                  "renameByName": {"Value #A": "req/s", "Value #B": "error ratio",
                                   "Value #C": "p50", "Value #D": "p99"},
              }),
          ],
          overrides=[("req/s", {"unit": "reqps"}), ("error ratio", {"unit": "percentunit"}),
                     ("p50", {"unit": "s"}), ("p99", {"unit": "s"})]),
        Panel("In-flight requests",
          [Query(f"sum by (upstream) (relay_requests_in_flight"
                 f"{{{UPSTREAM_SELECTOR}}})", "{{upstream}}")],
          "short", "Exchanges in progress.", width=8),
        Panel("Error budget burn rate (1h)", [
            Query(f"{LEVEL}:relay_requests_errors:ratio_rate1h{{{SLO}}} / {budget:g}",
              "errors {{upstream}}"),
            Query(f"{LEVEL}:relay_requests_slow:ratio_rate1h{{{SLO}}} / {o.latency_budget:g}",
              f"slower than {o.threshold:g}s {{{{upstream}}}}"),
        ], "short",
          f"How fast each SLO's budget burns: 1 = exactly on budget. Availability target "
          f"{o.errors_target:.1%}, latency target {o.latency_target:.0%} within "
          f"{o.threshold:g}s. Pages at {o.page_factor:g} (1h and 5m).", width=8,
          thresholds=[(None, "transparent"), (1, "orange"), (o.page_factor, "red")],
          threshold_lines=True, links=[board_link("relay-slo", "Relay / SLO")]),
        Panel("Slow requests (over the latency SLO threshold)", [Query(
            f"sum by (upstream) (rate(relay_request_duration_seconds_count"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))"
            f" - sum by (upstream) "
            f"(rate(relay_request_duration_seconds_bucket{{{UPSTREAM_SELECTOR}, "
            f"{le(o.threshold)}}}[{RATE_INTERVAL}]))", "{{upstream}}")], "reqps",
          f"Requests per second that took longer than {o.threshold:g}s.", width=8),
        *websocket_row(),
    ]  # fmt: skip
    return build_dashboard(
        "relay-overview", "Relay / Overview",
        "Traffic, errors, latency and saturation per upstream and route.", panels,
    )  # fmt: skip


def websocket_row() -> list[Panel]:
    """WebSocket sessions: open now, how they end, how long they last, what they carry."""
    def per(metric: str, by: str) -> str:
        return (f"sum by ({by}) "
                f"(rate({metric}{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))")
    return [
        Panel("WebSocket sessions open", [Query(
            f"sum by (upstream) (relay_websocket_sessions_active{{{UPSTREAM_SELECTOR}}})",
            "{{upstream}}")], "short",
          "Sessions open now (after their 101), per upstream. Each holds an upstream "
          "connection of its own, outside the pool; websocket.max_sessions_per_upstream caps "
          "them per worker (503 beyond).", width=8),
        Panel("WebSocket sessions ended, by result", [Query(
            per("relay_websocket_sessions_total", "upstream, result"),
            "{{result}} {{upstream}}")], "ops",
          "client_closed, upstream_closed, idle (websocket.idle_timeout_seconds), too_large "
          "(websocket.max_message_bytes, 1009), drain (1001 at shutdown), upstream_refused "
          "(its answer passed on), error (unreachable, TLS, bad handshake).", width=8),
        Panel("WebSocket session duration", quantiles(
            "relay_websocket_session_duration_seconds"), "s",
          "From the client's 101 to the end of the session.", width=8),
        Panel("WebSocket messages by direction", [Query(
            per("relay_websocket_messages_total", "upstream, direction"),
            "{{direction}} {{upstream}}")], "ops",
          "Messages relayed: to_upstream (from clients) and to_client.", width=12),
        Panel("WebSocket bytes by direction", [Query(
            per("relay_websocket_bytes_total", "upstream, direction"),
            "{{direction}} {{upstream}}")], "Bps",
          "Message payload bytes relayed each way.", width=12),
    ]  # fmt: skip


def slo() -> dict[str, Any]:
    o = objectives()
    period = f"{o.period_days}d"

    def sli(metric: str, target: float, kind: str) -> Panel:
        return Panel(
            f"{kind} SLI, {o.period_days} days",
            [Query(f"1 - {LEVEL}:{metric}:ratio_rate{period}{{{SLO}}}", "{{upstream}}")],
            "percentunit",
            f"Good requests over the last {o.period_days} days, per "
            f"upstream, against the {target:.4g} objective (red below it).",
            kind="stat",
            width=6,
            height=5,
            decimals=3,
            thresholds=[(None, "red"), (target, "green")],
        )

    def remaining(metric: str, budget: float, kind: str) -> Panel:
        return Panel(
            f"{kind} error budget remaining",
            [Query(f"1 - {LEVEL}:{metric}:ratio_rate{period}{{{SLO}}} / "
                   f"{budget:g}", "{{upstream}}")],
            "percentunit",
            f"Share of the {o.period_days}-day budget ({budget:.2g} of requests) not yet "
            "spent; below 0 the SLO is missed.",
            kind="stat",
            width=6,
            height=5,
            decimals=1,
            thresholds=[(None, "red"), (0, "orange"), (0.25, "green")],
        )

    factors = ", ".join(f"{f:g}" for f in o.burn_factors)

    def burn(metric: str, budget: float, kind: str, alert: str) -> Panel:
        return Panel(
            f"{kind} burn rate per window",
            [
                Query(f"{LEVEL}:{metric}:ratio_rate{w}{{{SLO}}} / "
                      f"{budget:g}", f"{{{{upstream}}}} {w}")
                for w in o.windows
            ],
            "short",
            "1 spends the budget exactly over the period. The burn-rate alerts fire when a "
            f"long and a short window both exceed a factor ({factors}).",
            thresholds=[
                (None, "transparent"),
                *((f, "red" if f >= 6 else "orange") for f in o.burn_factors),
            ],
            threshold_lines=True,
            links=[runbook(alert)],
        )

    def over_time(metric: str, target: float, kind: str) -> Panel:
        return Panel(
            f"{kind} SLI (1h) against the objective",
            [Query(f"1 - {LEVEL}:{metric}:ratio_rate1h{{{SLO}}}", "{{upstream}}")],
            "percentunit",
            f"Good requests per hour; the line is the {target:.4g} objective.",
            thresholds=[(None, "red"), (target, "transparent")],
            threshold_lines=True,
        )

    errors, slow = "relay_requests_errors", "relay_requests_slow"
    panels = [
        sli(errors, o.errors_target, "Availability"),
        remaining(errors, o.errors_budget, "Availability"),
        sli(slow, o.latency_target, "Latency"),
        remaining(slow, o.latency_budget, "Latency"),
        burn(errors, o.errors_budget, "Availability", "RelayErrorBudgetFastBurn"),
        burn(slow, o.latency_budget, "Latency", "RelayLatencyBudgetFastBurn"),
        over_time(errors, o.errors_target, "Availability"),
        over_time(slow, o.latency_target, "Latency"),
    ]
    return build_dashboard(
        "relay-slo", "Relay / SLO",
        f"Availability and latency SLOs per upstream: the {o.period_days}-day SLIs against "
        "their objectives, the error budget left, and the burn rate per alert window.",
        panels, time_from="now-7d",
    )  # fmt: skip


def pools() -> dict[str, Any]:
    o = objectives()

    def pool(metric: str, state: str = "") -> str:
        extra = f', state="{state}"' if state else ""
        return f"sum by (upstream) ({metric}{{{UPSTREAM_SELECTOR}{extra}}})"

    panels = [
        Panel("Connections: in use, idle, max", [
            Query(pool("relay_pool_connections", "in_use"), "in use {{upstream}}"),
            Query(pool("relay_pool_connections", "idle"), "idle {{upstream}}"),
            Query(pool("relay_pool_max_connections"), "max {{upstream}}"),
        ], "short", "Upstream pool connections (in use includes ones being opened)."),
        Panel("Pool utilisation", [Query(
            f'{pool("relay_pool_connections", "in_use")} / {pool("relay_pool_max_connections")}',
            "{{upstream}}")], "percentunit", "In-use connections over max_connections.",
          thresholds=[(None, "transparent"), (o.pool_utilization, "red")],
          threshold_lines=True, links=[runbook("RelayPoolSaturated")]),
        Panel("Requests waiting for a connection",
          [Query(pool("relay_pool_waiting_requests"), "{{upstream}}")], "short",
          "Requests queued at the pool gate."),
        Panel("Pool wait time", quantiles("relay_pool_wait_seconds"), "s",
          "Time requests spent waiting for a free connection.",
          links=[runbook("RelayPoolWaitHigh")]),
        Panel("Pool timeouts (503)", [Query(
            f"sum by (upstream) (rate(relay_pool_timeouts_total"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{upstream}}")], "reqps", "Requests that got no connection within the pool timeout.",
          links=[runbook("RelayPoolTimeouts")]),
        Panel("Retries by reason", [Query(
            f"sum by (upstream, reason) (rate(relay_upstream_retries_total"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{reason}} {{upstream}}")], "reqps",
          "Attempts sent again: stale_connection (an idempotent request replayed after a reused "
          "connection was closed by the upstream) and the route retry policies' triggers.",
          links=[runbook("RelayUpstreamRetries")]),
        # Each pod (each worker) sees the endpoints itself: the largest count any sees.
        Panel("Endpoints by state", [Query(
            f"max by (upstream, state) (relay_upstream_endpoints{{{UPSTREAM_SELECTOR}}})",
            "{{upstream}} {{state}}")], "short",
          "Endpoints of each upstream: healthy, ejected (outlier detection), unhealthy (failing "
          "its health check), draining (gone from DNS, finishing its requests). Addresses: the "
          "admin port's /upstreams.",
          links=[runbook("RelayUpstreamNoHealthyEndpoint")]),
        Panel("Endpoint ejections", [Query(
            f"sum by (upstream, reason) (rate(relay_upstream_ejections_total"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{upstream}} {{reason}}")], "ops",
          "Endpoints ejected by outlier detection, by the failure that tipped it.",
          links=[runbook("RelayUpstreamEndpointsEjected")]),
        Panel("Recycled connections", [Query(
            f"sum by (upstream, reason) (rate(relay_upstream_connections_recycled_total"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{upstream}} {{reason}}")], "ops",
          "Connections closed when idle for their age or request count "
          "(pool.max_connection_age_seconds, max_requests_per_connection)."),
    ]  # fmt: skip
    return build_dashboard(
        "relay-pools", "Relay / Upstream pools",
        "Connection pool saturation and endpoints per upstream.", panels,
    )  # fmt: skip


def errors() -> dict[str, Any]:
    panels = [
        Panel("Upstream errors by reason", [Query(
            f"sum by (upstream, reason) "
            f"(rate(relay_upstream_errors_total{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{reason}} {{upstream}}")], "reqps",
          "connect, connect_timeout, read_timeout, write_timeout, pool_timeout, "
          "total_timeout (a route's timeouts.total), protocol, "
          "tls (upstream TLS handshake or certificate), reset, "
          "overloaded (503 at server.limit_concurrency), internal (a Relay bug).",
          links=[runbook("RelayUpstreamConnectFailures"), runbook("RelayInternalErrors")]),
        Panel("Responses cut short", [Query(
            f"sum by (upstream, route) "
            f"(rate(relay_responses_truncated_total{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{upstream}} {{route}}")], "reqps",
          "Responses whose status (not a 5xx) was sent and whose body was then cut: upstream "
          "reset, read timeout, a route's total timeout, protocol error or a Relay failure. "
          "They count against the availability SLI."),
        Panel("Disconnects by side and phase", [Query(
            f"sum by (upstream, side, phase) "
            f"(rate(relay_disconnects_total{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
            "{{side}} {{phase}} {{upstream}}")], "reqps",
          "Exchanges cut short: the client hung up, or the upstream closed or reset.",
          links=[runbook("RelayUpstreamResetSpike"), runbook("RelayClientDisconnectSpike")]),
        Panel("5xx responses by code", [Query(
            f'sum by (upstream, code) (rate(relay_requests_total'
            f'{{{UPSTREAM_SELECTOR}, code=~"5.."}}[{RATE_INTERVAL}]))',
            "{{code}} {{upstream}}")], "reqps", "Proxy-generated and upstream 5xx."),
        Panel("Client hung up before headers (499)", [Query(
            f'sum by (upstream) (rate(relay_requests_total'
            f'{{{UPSTREAM_SELECTOR}, code="499"}}[{RATE_INTERVAL}]))',
            "{{upstream}}")], "reqps", "Clients that gave up waiting for the upstream."),
        Panel("Unrouted and refused requests", [Query(
            f'sum by (pod, instance, code) (rate(relay_requests_total'
            f'{{{RELAY_SELECTOR}, upstream="-"}}'
            f"[{RATE_INTERVAL}]))", "{{code}} {{pod}} {{instance}}")], "reqps",
          "Requests that matched no route (404) or were refused before routing (400, 413, 414, "
          "431).", links=[runbook("RelayUnroutedTraffic")]),
        Panel("Body bytes", [
            Query(f"sum by (upstream) (rate(relay_request_body_bytes_total"
                  f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
              "up {{upstream}}"),
            Query(f"sum by (upstream) (rate(relay_response_body_bytes_total"
                  f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}]))",
              "down {{upstream}}"),
        ], "Bps", "Request bytes sent upstream and response bytes sent to clients.", width=24),
    ]  # fmt: skip
    return build_dashboard(
        "relay-errors", "Relay / Disconnects and errors",
        "Who hung up, when, and why upstream calls failed.", panels,
    )  # fmt: skip


def process() -> dict[str, Any]:
    """Per pod, whatever the number of workers: with several, the process series carry a
    ``worker`` label; sums (CPU, memory) and maxima (fds) per pod cover both."""
    o = objectives()
    pod = "{{pod}} {{instance}}"
    panels = [
        Panel("Targets up", [Query(f"sum(up{{{RELAY_SELECTOR}}})")], "short",
          "Relay targets Prometheus scrapes successfully. Red at none.", kind="stat", width=6,
          height=4, thresholds=[(None, "red"), (1, "green")], links=[runbook("RelayDown")]),
        Panel("Targets down", [Query(f"sum(1 - up{{{RELAY_SELECTOR}}})")], "short",
          "Relay targets whose last scrape failed.", kind="stat", width=6, height=4,
          thresholds=[(None, "green"), (1, "red")], links=[runbook("RelayTargetDown")]),
        Panel("Uptime", [Query(
            f"time() - min by (pod, instance) (process_start_time_seconds{{{RELAY_SELECTOR}}})",
            pod)], "s",
          "Since each pod's oldest Relay process started. Orange for the first 10 minutes.",
          kind="stat", width=6, height=4, thresholds=[(None, "orange"), (600, "green")]),
        Panel("Versions", [Query(
            f"count by (version) (relay_build_info{{{RELAY_SELECTOR}}})", "{{version}}")],
          "short", "Pods per Relay version (more than one: a rollout in progress).",
          kind="stat", width=6, height=4, thresholds=[(None, "blue")]),
        Panel("CPU", [Query(
            f"sum by (pod, instance) (rate(process_cpu_seconds_total{{{RELAY_SELECTOR}}}"
            f"[{RATE_INTERVAL}]))", pod)], "percentunit",
          "CPU time per second of each pod's Relay processes, all workers (1 = one core)."),
        Panel("Resident memory",
          [Query(f"sum by (pod, instance) "
                 f"(process_resident_memory_bytes{{{RELAY_SELECTOR}}})", pod)], "bytes",
          "RSS of each pod's Relay processes, all workers; it stays flat while bodies stream.",
          links=[runbook("RelayMemoryNearLimit")]),
        Panel("File descriptors used", [Query(
            f"max by (pod, instance) (process_open_fds{{{RELAY_SELECTOR}}} / "
            f"process_max_fds{{{RELAY_SELECTOR}}})",
            pod)], "percentunit",
          "Open over maximum file descriptors of each pod's busiest Relay process.",
          thresholds=[(None, "transparent"), (o.fds_ratio, "red")], threshold_lines=True,
          links=[runbook("RelayFileDescriptorsNearLimit")]),
        Panel("Open file descriptors by process",
          [Query(f"process_open_fds"
                 f"{{{RELAY_SELECTOR}}}", "{{pod}} {{instance}} {{worker}}")], "short",
          "Sockets and files held by each process (per worker with several)."),
        Panel("Worker restarts", [Query(
            f"sum by (pod, instance) "
            f"(increase(relay_worker_restarts_total{{{RELAY_SELECTOR}}}[{RATE_INTERVAL}]))",
            pod)], "short",
          "Worker processes respawned after dying (several workers only; the pod stays "
          "Running).", links=[runbook("RelayWorkerRestarts")]),
        Panel("Restarts in range", [Query(
            f"max by (pod, instance) "
            f"(changes(process_start_time_seconds{{{RELAY_SELECTOR}}}[$__range]))",
            pod)], "short",
          "Process (re)starts per pod in the selected time range, workers included.",
          kind="stat", thresholds=[(None, "green"), (1, "orange"), (3, "red")]),
    ]  # fmt: skip
    return build_dashboard(
        "relay-process", "Relay / Process health",
        "Targets, versions, CPU, memory, file descriptors and restarts per pod.", panels,
    )  # fmt: skip


DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "relay-overview.json": overview,
    "relay-slo.json": slo,
    "relay-pools.json": pools,
    "relay-errors.json": errors,
    "relay-process.json": process,
}


def render(build: Callable[[], dict[str, Any]]) -> str:
    import json

    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if committed files differ")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = HERE / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
