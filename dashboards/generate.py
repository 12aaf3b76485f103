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
    RI,
    SEL,
    SELU,
    SLO,
    P,
    Q,
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
    valid = f'relay_requests_total{{{SELU}, code!="499"}}[{RI}]'
    bad = f"rate(relay_requests_failed_total{{{SELU}}}[{RI}])"
    return f"sum by (upstream, route) ({bad}) / sum by (upstream, route) (rate({valid}))"


def overview() -> dict[str, Any]:
    o = objectives()
    budget = o.errors_budget
    rate = f"sum by (upstream) (rate(relay_requests_total{{{SELU}}}[{RI}]))"
    in_use = f'sum by (upstream) (relay_pool_connections{{{SELU}, state="in_use"}})'
    pool_max = f"sum by (upstream) (relay_pool_max_connections{{{SELU}}})"
    per_route = "sum by (le, upstream, route) (rate(relay_request_duration_seconds_bucket"
    panels = [
        P("Requests per second", [Q(f"sum(rate(relay_requests_total{{{SELU}}}[{RI}]))")],
          "reqps", "Every request Relay answered, routed or not.", kind="stat", width=6,
          height=4, thresholds=[(None, "blue")]),
        P("Error ratio (availability SLI)", [Q(
            f"sum({LEVEL}:relay_requests_errors:rate5m{{{SLO}}})"
            f" / sum({LEVEL}:relay_requests_valid:rate5m{{{SLO}}})")], "percentunit",
          f"The availability SLI over 5m for the selected upstreams: 5xx and responses cut "
          f"short, over every routed request but 499s. Orange at the budget "
          f"({budget:.1%}), red at the page's burn rate ({o.page_factor:g}x).",
          kind="stat", width=6, height=4, decimals=2,
          thresholds=[(None, "green"), (budget, "orange"), (o.page_factor * budget, "red")],
          links=[runbook("RelayErrorBudgetFastBurn")]),
        P("Latency p99", [Q(
            f"histogram_quantile(0.99, sum by (le) "
            f"(rate(relay_request_duration_seconds_bucket{{{SELU}}}[{RI}])))")], "s",
          f"Whole exchange, streamed body included. Red at the latency SLO's threshold "
          f"({o.threshold:g}s).", kind="stat", width=6, height=4,
          thresholds=[(None, "green"), (o.threshold / 2, "orange"), (o.threshold, "red")],
          links=[runbook("RelayLatencyBudgetFastBurn")]),
        P("Pool saturation", [Q(f"max({in_use} / {pool_max})")], "percentunit",
          f"The most used upstream pool: connections in use over max_connections. Red at "
          f"RelayPoolSaturated's {o.pool_utilization:.0%}.", kind="stat", width=6, height=4,
          thresholds=[(None, "green"), (0.7, "orange"), (o.pool_utilization, "red")],
          links=[board_link("relay-pools", "Relay / Upstream pools")]),
        P("Requests per second by upstream", [Q(rate, "{{upstream}}")], "reqps",
          "Proxied requests per upstream (relay_requests_total); upstream \"-\" matched no "
          "route."),
        P("Error ratio", [Q(f"{LEVEL}:relay_requests_errors:ratio_rate5m{{{SLO}}}",
                            "{{upstream}}")], "percentunit",
          "The availability SLI per upstream: its recording rule, as the burn-rate alerts read "
          "it (5xx and responses cut short, over every routed request but 499s).",
          thresholds=[(None, "transparent"), (budget, "orange"), (o.page_factor * budget, "red")],
          threshold_lines=True, links=[runbook("RelayErrorBudgetFastBurn")]),
        P("Latency, whole exchange", quantiles("relay_request_duration_seconds"), "s",
          "Request start to last body byte. Exemplars link to traces.", exemplars=True),
        P("Time to upstream headers", quantiles("relay_upstream_response_headers_seconds"), "s",
          "Request start to upstream response headers. Exemplars link to traces.",
          exemplars=True),
        P("Latency distribution", [Q(
            f"sum by (le) (rate(relay_request_duration_seconds_bucket{{{SELU}}}[{RI}]))",
            "{{le}}", format="heatmap")], "s",
          "Requests per latency bucket over time, whole exchange. Exemplars (dots) link to "
          "traces.", kind="heatmap", exemplars=True),
        P("Responses by status code",
          [Q(f"sum by (code) (rate(relay_requests_total{{{SELU}}}[{RI}]))", "{{code}}")],
          "reqps", "499: the client hung up before the response headers."),
        P("Upstreams and routes", [
            Q(f"sum by (upstream, route) (rate(relay_requests_total{{{SELU}}}[{RI}]))",
              instant=True, format="table"),
            Q(errors_by_route(), instant=True, format="table"),
            Q(f"histogram_quantile(0.5, {per_route}{{{SELU}}}[{RI}])))",
              instant=True, format="table"),
            Q(f"histogram_quantile(0.99, {per_route}{{{SELU}}}[{RI}])))",
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
        P("In-flight requests",
          [Q(f"sum by (upstream) (relay_requests_in_flight{{{SELU}}})", "{{upstream}}")],
          "short", "Exchanges in progress.", width=8),
        P("Error budget burn rate (1h)", [
            Q(f"{LEVEL}:relay_requests_errors:ratio_rate1h{{{SLO}}} / {budget:g}",
              "errors {{upstream}}"),
            Q(f"{LEVEL}:relay_requests_slow:ratio_rate1h{{{SLO}}} / {o.latency_budget:g}",
              f"slower than {o.threshold:g}s {{{{upstream}}}}"),
        ], "short",
          f"How fast each SLO's budget burns: 1 = exactly on budget. Availability target "
          f"{o.errors_target:.1%}, latency target {o.latency_target:.0%} within "
          f"{o.threshold:g}s. Pages at {o.page_factor:g} (1h and 5m).", width=8,
          thresholds=[(None, "transparent"), (1, "orange"), (o.page_factor, "red")],
          threshold_lines=True, links=[board_link("relay-slo", "Relay / SLO")]),
        P("Slow requests (over the latency SLO threshold)", [Q(
            f"sum by (upstream) (rate(relay_request_duration_seconds_count{{{SELU}}}[{RI}]))"
            f" - sum by (upstream) (rate(relay_request_duration_seconds_bucket{{{SELU}, "
            f"{le(o.threshold)}}}[{RI}]))", "{{upstream}}")], "reqps",
          f"Requests per second that took longer than {o.threshold:g}s.", width=8),
    ]  # fmt: skip
    return build_dashboard(
        "relay-overview", "Relay / Overview",
        "Traffic, errors, latency and saturation per upstream and route.", panels,
    )  # fmt: skip


def slo() -> dict[str, Any]:
    o = objectives()
    period = f"{o.period_days}d"

    def sli(metric: str, target: float, kind: str) -> P:
        return P(
            f"{kind} SLI, {o.period_days} days",
            [Q(f"1 - {LEVEL}:{metric}:ratio_rate{period}{{{SLO}}}", "{{upstream}}")],
            "percentunit",
            f"Good requests over the last {o.period_days} days, per "
            f"upstream, against the {target:.4g} objective (red below it).",
            kind="stat",
            width=6,
            height=5,
            decimals=3,
            thresholds=[(None, "red"), (target, "green")],
        )

    def remaining(metric: str, budget: float, kind: str) -> P:
        return P(
            f"{kind} error budget remaining",
            [Q(f"1 - {LEVEL}:{metric}:ratio_rate{period}{{{SLO}}} / {budget:g}", "{{upstream}}")],
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

    def burn(metric: str, budget: float, kind: str, alert: str) -> P:
        return P(
            f"{kind} burn rate per window",
            [
                Q(f"{LEVEL}:{metric}:ratio_rate{w}{{{SLO}}} / {budget:g}", f"{{{{upstream}}}} {w}")
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

    def over_time(metric: str, target: float, kind: str) -> P:
        return P(
            f"{kind} SLI (1h) against the objective",
            [Q(f"1 - {LEVEL}:{metric}:ratio_rate1h{{{SLO}}}", "{{upstream}}")],
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
        return f"sum by (upstream) ({metric}{{{SELU}{extra}}})"

    panels = [
        P("Connections: in use, idle, max", [
            Q(pool("relay_pool_connections", "in_use"), "in use {{upstream}}"),
            Q(pool("relay_pool_connections", "idle"), "idle {{upstream}}"),
            Q(pool("relay_pool_max_connections"), "max {{upstream}}"),
        ], "short", "Upstream pool connections (in use includes ones being opened)."),
        P("Pool utilisation", [Q(
            f'{pool("relay_pool_connections", "in_use")} / {pool("relay_pool_max_connections")}',
            "{{upstream}}")], "percentunit", "In-use connections over max_connections.",
          thresholds=[(None, "transparent"), (o.pool_utilization, "red")],
          threshold_lines=True, links=[runbook("RelayPoolSaturated")]),
        P("Requests waiting for a connection",
          [Q(pool("relay_pool_waiting_requests"), "{{upstream}}")], "short",
          "Requests queued at the pool gate."),
        P("Pool wait time", quantiles("relay_pool_wait_seconds"), "s",
          "Time requests spent waiting for a free connection.",
          links=[runbook("RelayPoolWaitHigh")]),
        P("Pool timeouts (503)", [Q(
            f"sum by (upstream) (rate(relay_pool_timeouts_total{{{SELU}}}[{RI}]))",
            "{{upstream}}")], "reqps", "Requests that got no connection within the pool timeout.",
          links=[runbook("RelayPoolTimeouts")]),
        P("Stale keep-alive retries", [Q(
            f"sum by (upstream) (rate(relay_upstream_retries_total{{{SELU}}}[{RI}]))",
            "{{upstream}}")], "reqps",
          "Idempotent requests replayed after a reused connection was closed by the upstream.",
          links=[runbook("RelayUpstreamRetries")]),
    ]  # fmt: skip
    return build_dashboard(
        "relay-pools", "Relay / Upstream pools",
        "Connection pool saturation per upstream.", panels,
    )  # fmt: skip


def errors() -> dict[str, Any]:
    panels = [
        P("Upstream errors by reason", [Q(
            f"sum by (upstream, reason) (rate(relay_upstream_errors_total{{{SELU}}}[{RI}]))",
            "{{reason}} {{upstream}}")], "reqps",
          "connect, connect_timeout, read_timeout, write_timeout, pool_timeout, protocol, "
          "reset, overloaded (503 at server.limit_concurrency), internal (a Relay bug).",
          links=[runbook("RelayUpstreamConnectFailures"), runbook("RelayInternalErrors")]),
        P("Responses cut short", [Q(
            f"sum by (upstream, route) (rate(relay_responses_truncated_total{{{SELU}}}[{RI}]))",
            "{{upstream}} {{route}}")], "reqps",
          "Responses whose status (not a 5xx) was sent and whose body was then cut: upstream "
          "reset, read timeout, protocol error or a Relay failure. They count against the "
          "availability SLI."),
        P("Disconnects by side and phase", [Q(
            f"sum by (upstream, side, phase) (rate(relay_disconnects_total{{{SELU}}}[{RI}]))",
            "{{side}} {{phase}} {{upstream}}")], "reqps",
          "Exchanges cut short: the client hung up, or the upstream closed or reset.",
          links=[runbook("RelayUpstreamResetSpike"), runbook("RelayClientDisconnectSpike")]),
        P("5xx responses by code", [Q(
            f'sum by (upstream, code) (rate(relay_requests_total{{{SELU}, code=~"5.."}}[{RI}]))',
            "{{code}} {{upstream}}")], "reqps", "Proxy-generated and upstream 5xx."),
        P("Client hung up before headers (499)", [Q(
            f'sum by (upstream) (rate(relay_requests_total{{{SELU}, code="499"}}[{RI}]))',
            "{{upstream}}")], "reqps", "Clients that gave up waiting for the upstream."),
        P("Unrouted and refused requests", [Q(
            f'sum by (pod, instance, code) (rate(relay_requests_total{{{SEL}, upstream="-"}}'
            f"[{RI}]))", "{{code}} {{pod}} {{instance}}")], "reqps",
          "Requests that matched no route (404) or were refused before routing (400, 413, 414, "
          "431).", links=[runbook("RelayUnroutedTraffic")]),
        P("Body bytes", [
            Q(f"sum by (upstream) (rate(relay_request_body_bytes_total{{{SELU}}}[{RI}]))",
              "up {{upstream}}"),
            Q(f"sum by (upstream) (rate(relay_response_body_bytes_total{{{SELU}}}[{RI}]))",
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
        P("Targets up", [Q(f"sum(up{{{SEL}}})")], "short",
          "Relay targets Prometheus scrapes successfully. Red at none.", kind="stat", width=6,
          height=4, thresholds=[(None, "red"), (1, "green")], links=[runbook("RelayDown")]),
        P("Targets down", [Q(f"sum(1 - up{{{SEL}}})")], "short",
          "Relay targets whose last scrape failed.", kind="stat", width=6, height=4,
          thresholds=[(None, "green"), (1, "red")], links=[runbook("RelayTargetDown")]),
        P("Uptime", [Q(f"time() - min by (pod, instance) (process_start_time_seconds{{{SEL}}})",
                       pod)], "s",
          "Since each pod's oldest Relay process started. Orange for the first 10 minutes.",
          kind="stat", width=6, height=4, thresholds=[(None, "orange"), (600, "green")]),
        P("Versions", [Q(f"count by (version) (relay_build_info{{{SEL}}})", "{{version}}")],
          "short", "Pods per Relay version (more than one: a rollout in progress).",
          kind="stat", width=6, height=4, thresholds=[(None, "blue")]),
        P("CPU", [Q(f"sum by (pod, instance) (rate(process_cpu_seconds_total{{{SEL}}}[{RI}]))",
                    pod)], "percentunit",
          "CPU time per second of each pod's Relay processes, all workers (1 = one core)."),
        P("Resident memory",
          [Q(f"sum by (pod, instance) (process_resident_memory_bytes{{{SEL}}})", pod)], "bytes",
          "RSS of each pod's Relay processes, all workers; it stays flat while bodies stream.",
          links=[runbook("RelayMemoryNearLimit")]),
        P("File descriptors used", [Q(
            f"max by (pod, instance) (process_open_fds{{{SEL}}} / process_max_fds{{{SEL}}})",
            pod)], "percentunit",
          "Open over maximum file descriptors of each pod's busiest Relay process.",
          thresholds=[(None, "transparent"), (o.fds_ratio, "red")], threshold_lines=True,
          links=[runbook("RelayFileDescriptorsNearLimit")]),
        P("Open file descriptors by process",
          [Q(f"process_open_fds{{{SEL}}}", "{{pod}} {{instance}} {{worker}}")], "short",
          "Sockets and files held by each process (per worker with several)."),
        P("Worker restarts", [Q(
            f"sum by (pod, instance) (increase(relay_worker_restarts_total{{{SEL}}}[{RI}]))",
            pod)], "short",
          "Worker processes respawned after dying (several workers only; the pod stays "
          "Running).", links=[runbook("RelayWorkerRestarts")]),
        P("Restarts in range", [Q(
            f"max by (pod, instance) (changes(process_start_time_seconds{{{SEL}}}[$__range]))",
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
