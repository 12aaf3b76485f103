"""Grafana dashboards for Relay, as code (grafana-foundation-sdk).

    python dashboards/generate.py          # rewrite dashboards/*.json
    python dashboards/generate.py --check  # exit 1 when a committed file differs

Every query is scoped by the template variables ``$job``, ``$namespace`` (empty outside
Kubernetes: ``.*`` also matches a missing label), ``$instance`` and, where the metric has
it, ``$upstream``. SLO targets are read from ``alerts/slo.yaml`` so the burn-rate panels and
the alerts agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    DataSourceRef,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    GridPos,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

HERE = Path(__file__).resolve().parent
SLO_FILE = HERE.parent / "alerts" / "slo.yaml"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")

SEL = 'job=~"$job", namespace=~"$namespace", instance=~"$instance"'
SELU = SEL + ', upstream=~"$upstream"'
RI = "$__rate_interval"
LEVEL = "cluster_namespace_upstream"  # the SLO recording rules' level


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class P:
    title: str
    queries: Sequence[Q]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # timeseries | stat
    exemplars: bool = False
    width: int = 12


def quantiles(metric: str, by: str = "upstream") -> list[Q]:
    return [
        Q(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SELU}}}[{RI}])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def variables() -> list[Any]:
    def query_var(name: str, label: str, query: str) -> dashboard.QueryVariable:
        return (
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(DS)
            .query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
        )

    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        query_var("job", "Job", "label_values(relay_build_info, job)"),
        query_var(
            "namespace", "Namespace", 'label_values(relay_build_info{job=~"$job"}, namespace)'
        ),
        query_var(
            "instance", "Instance",
            'label_values(relay_build_info{job=~"$job", namespace=~"$namespace"}, instance)',
        ),
        query_var("upstream", "Upstream", f"label_values(relay_requests_total{{{SEL}}}, upstream)"),
    ]  # fmt: skip


def build_panel(panel: P, panel_id: int, x: int, y: int) -> Any:
    builder: Any
    if panel.kind == "stat":
        builder = stat.Panel()
    else:
        builder = (
            timeseries.Panel()
            .line_width(1)
            .fill_opacity(10)
            .legend(
                common_builders.VizLegendOptions()
                .show_legend(True)
                .display_mode(LegendDisplayMode.TABLE)
                .placement(LegendPlacement.BOTTOM)
                .calcs(["mean", "max", "lastNotNull"])
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(TooltipDisplayMode.MULTI)
                .sort(SortOrder.DESCENDING)
            )
        )
    builder = (
        builder.id(panel_id)
        .title(panel.title)
        .description(panel.description)
        .datasource(DS)
        .unit(panel.unit)
        .grid_pos(GridPos(h=8, w=panel.width, x=x, y=y))
    )
    for index, query in enumerate(panel.queries):
        target = (
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + index))
            .expr(query.expr)
            .legend_format(query.legend or "__auto")
        )
        if panel.exemplars:
            target = target.exemplar(True)
        builder = builder.with_target(target)
    return builder


def build_dashboard(uid: str, title: str, description: str, panels: Sequence[P]) -> dict[str, Any]:
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["relay"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .editable()
    )
    for var in variables():
        board = board.with_variable(var)
    x = y = 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        board = board.with_panel(build_panel(panel, panel_id, x, y))
        x += panel.width
    encoded = JSONEncoder(sort_keys=True).encode(board.build())
    result: dict[str, Any] = json.loads(encoded)
    return result


def slo_targets() -> tuple[float, float, float]:
    slo = yaml.safe_load(SLO_FILE.read_text())["slos"]
    return (
        float(slo["errors"]["target"]),
        float(slo["latency"]["target"]),
        float(slo["latency"]["threshold_seconds"]),
    )


def overview() -> dict[str, Any]:
    errors_target, latency_target, threshold = slo_targets()
    rate = f"sum by (upstream) (rate(relay_requests_total{{{SELU}}}[{RI}]))"
    slo_sel = 'namespace=~"$namespace", upstream=~"$upstream"'
    panels = [
        P("Requests per second", [Q(rate, "{{upstream}}")], "reqps",
          "Proxied requests per upstream (relay_requests_total)."),
        P("Error ratio (5xx)", [Q(
            f'sum by (upstream) (rate(relay_requests_total{{{SELU}, code=~"5.."}}[{RI}]))'
            f' / sum by (upstream) (rate(relay_requests_total{{{SELU}, code!="499"}}[{RI}]))',
            "{{upstream}}")], "percentunit",
          "Share of responses with a 5xx status, proxy-generated or from the upstream."),
        P("Latency, whole exchange", quantiles("relay_request_duration_seconds"), "s",
          "Request start to last body byte. Exemplars link to traces.", exemplars=True),
        P("Time to upstream headers", quantiles("relay_upstream_response_headers_seconds"), "s",
          "Request start to upstream response headers. Exemplars link to traces.",
          exemplars=True),
        P("In-flight requests",
          [Q(f"sum by (upstream) (relay_requests_in_flight{{{SELU}}})", "{{upstream}}")],
          "short", "Exchanges in progress."),
        P("Responses by status code",
          [Q(f"sum by (code) (rate(relay_requests_total{{{SELU}}}[{RI}]))", "{{code}}")],
          "reqps", "499: the client hung up before the response headers."),
        P("Error budget burn rate (1h)", [
            Q(f"{LEVEL}:relay_requests_errors:ratio_rate1h{{{slo_sel}}} / {1 - errors_target:g}",
              "errors {{upstream}}"),
            Q(f"{LEVEL}:relay_requests_slow:ratio_rate1h{{{slo_sel}}} / {1 - latency_target:g}",
              f"slower than {threshold:g}s {{{{upstream}}}}"),
        ], "short",
          f"How fast each SLO's budget burns: 1 = exactly on budget. Availability target "
          f"{errors_target:.1%}, latency target {latency_target:.0%} within {threshold:g}s. "
          "Page at 14.4 (1h and 5m)."),
        P("Slow requests (over the latency SLO threshold)", [Q(
            f"sum by (upstream) (rate(relay_request_duration_seconds_count{{{SELU}}}[{RI}]))"
            f" - sum by (upstream) (rate(relay_request_duration_seconds_bucket{{{SELU}, "
            f'le=~"{threshold:g}|{float(threshold)}"}}[{RI}]))', "{{upstream}}")], "reqps",
          f"Requests per second that took longer than {threshold:g}s."),
    ]  # fmt: skip
    return build_dashboard(
        "relay-overview", "Relay / Overview",
        "Traffic, errors, latency and SLO burn per upstream.", panels,
    )  # fmt: skip


def pools() -> dict[str, Any]:
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
            "{{upstream}}")], "percentunit", "In-use connections over max_connections."),
        P("Requests waiting for a connection",
          [Q(pool("relay_pool_waiting_requests"), "{{upstream}}")], "short",
          "Requests queued at the pool gate."),
        P("Pool wait time", quantiles("relay_pool_wait_seconds"), "s",
          "Time requests spent waiting for a free connection."),
        P("Pool timeouts (503)", [Q(
            f"sum by (upstream) (rate(relay_pool_timeouts_total{{{SELU}}}[{RI}]))",
            "{{upstream}}")], "reqps", "Requests that got no connection within the pool timeout."),
        P("Stale keep-alive retries", [Q(
            f"sum by (upstream) (rate(relay_upstream_retries_total{{{SELU}}}[{RI}]))",
            "{{upstream}}")], "reqps",
          "Idempotent requests replayed after a reused connection was closed by the upstream."),
    ]  # fmt: skip
    return build_dashboard(
        "relay-pools", "Relay / Upstream pools",
        "Connection pool saturation per upstream.", panels,
    )  # fmt: skip


def errors() -> dict[str, Any]:
    panels = [
        P("Disconnects by side and phase", [Q(
            f"sum by (upstream, side, phase) (rate(relay_disconnects_total{{{SELU}}}[{RI}]))",
            "{{side}} {{phase}} {{upstream}}")], "reqps",
          "Exchanges cut short: the client hung up, or the upstream closed or reset."),
        P("Upstream errors by reason", [Q(
            f"sum by (upstream, reason) (rate(relay_upstream_errors_total{{{SELU}}}[{RI}]))",
            "{{reason}} {{upstream}}")], "reqps",
          "connect, connect_timeout, read_timeout, write_timeout, pool_timeout, protocol, reset."),
        P("5xx responses by code", [Q(
            f'sum by (upstream, code) (rate(relay_requests_total{{{SELU}, code=~"5.."}}[{RI}]))',
            "{{code}} {{upstream}}")], "reqps", "Proxy-generated and upstream 5xx."),
        P("Client hung up before headers (499)", [Q(
            f'sum by (upstream) (rate(relay_requests_total{{{SELU}, code="499"}}[{RI}]))',
            "{{upstream}}")], "reqps", "Clients that gave up waiting for the upstream."),
        P("Unrouted requests (404)", [Q(
            f'sum by (instance) (rate(relay_requests_total{{{SEL}, upstream="-"}}[{RI}]))',
            "{{instance}}")], "reqps", "Requests that matched no route."),
        P("Body bytes", [
            Q(f"sum by (upstream) (rate(relay_request_body_bytes_total{{{SELU}}}[{RI}]))",
              "up {{upstream}}"),
            Q(f"sum by (upstream) (rate(relay_response_body_bytes_total{{{SELU}}}[{RI}]))",
              "down {{upstream}}"),
        ], "Bps", "Request bytes sent upstream and response bytes sent to clients."),
    ]  # fmt: skip
    return build_dashboard(
        "relay-errors", "Relay / Disconnects and errors",
        "Who hung up, when, and why upstream calls failed.", panels,
    )  # fmt: skip


def process() -> dict[str, Any]:
    panels = [
        P("CPU", [Q(f"rate(process_cpu_seconds_total{{{SEL}}}[{RI}])", "{{instance}}")],
          "percentunit", "CPU time per second (1 = one core)."),
        P("Resident memory",
          [Q(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")], "bytes",
          "RSS; it stays flat while bodies stream."),
        P("Open file descriptors", [
            Q(f"process_open_fds{{{SEL}}}", "open {{instance}}"),
            Q(f"process_max_fds{{{SEL}}}", "max {{instance}}"),
        ], "short", "Sockets and files held, against the limit."),
        P("Restarts in range",
          [Q(f"changes(process_start_time_seconds{{{SEL}}}[$__range])", "{{instance}}")],
          "short", "Process restarts in the selected time range.", kind="stat"),
        P("Uptime", [Q(f"time() - process_start_time_seconds{{{SEL}}}", "{{instance}}")], "s",
          "Since the process started.", kind="stat"),
        P("Targets up", [Q('up{job=~"$job", namespace=~"$namespace", instance=~"$instance"}',
                           "{{instance}}")], "short", "Scrape health per target.", kind="stat"),
        P("Version", [Q(f"relay_build_info{{{SEL}}}", "{{version}} {{instance}}")], "short",
          "Build info (value is always 1).", kind="stat"),
    ]  # fmt: skip
    return build_dashboard(
        "relay-process", "Relay / Process health",
        "CPU, memory, file descriptors and restarts.", panels,
    )  # fmt: skip


DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "relay-overview.json": overview,
    "relay-pools.json": pools,
    "relay-errors.json": errors,
    "relay-process.json": process,
}


def render(build: Callable[[], dict[str, Any]]) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
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
