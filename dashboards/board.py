"""Building blocks of Relay's Grafana dashboards (grafana-foundation-sdk): panels, variables,
links, annotations and the JSON they encode to. The boards themselves are in generate.py.

Every query is scoped by the template variables. ``$cluster`` and ``$namespace`` pick one
deployment (single values that default to the first one found, so a board never merges dev
with production; outside Kubernetes they are empty and ``=~""`` matches the missing label);
``$job``, ``$instance`` and ``$upstream`` narrow further and default to all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import (
    dashboard,
    gauge,
    heatmap,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    DataSourceRef,
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataTransformerConfig,
    DynamicConfigValue,
    GridPos,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
DEPLOYMENT = 'cluster=~"$cluster", namespace=~"$namespace"'
# Relay's own series, and the per-upstream ones.
RELAY_SELECTOR = f'{DEPLOYMENT}, job=~"$job", instance=~"$instance"'
UPSTREAM_SELECTOR = RELAY_SELECTOR + ', upstream=~"$upstream"'
# Series recorded by the SLO rules: per cluster, namespace and upstream, no job or instance.
SLO = f'{DEPLOYMENT}, upstream=~"$upstream"'
RATE_INTERVAL = "$__rate_interval"
LEVEL = "cluster_namespace_upstream"  # the SLO recording rules' level
RUNBOOKS = "https://github.com/relay-proxy/relay/blob/main/docs/runbooks.md"
TAG = "relay"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    format: str = ""  # "" (time series) | table | heatmap


@dataclass(frozen=True)
class Panel:
    title: str
    queries: Sequence[Query]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # timeseries | stat | gauge | table | heatmap
    exemplars: bool = False
    width: int = 12
    height: int = 8
    # (value, colour) steps from the lowest; the first value is None (minus infinity). Stat
    # and gauge panels must set them: Grafana's default turns red at 80 whatever the unit.
    thresholds: Sequence[tuple[float | None, str]] = ()
    threshold_lines: bool = False  # draw the thresholds on a time series
    links: Sequence[tuple[str, str]] = ()  # (title, url)
    min: float | None = None
    max: float | None = None
    decimals: int | None = None
    transformations: Sequence[tuple[str, dict[str, Any]]] = field(default_factory=tuple)
    # Per field (by display name): properties such as {"unit": "percentunit"}.
    overrides: Sequence[tuple[str, dict[str, Any]]] = ()


def runbook(alert: str) -> tuple[str, str]:
    return (f"Runbook: {alert}", f"{RUNBOOKS}#{alert.lower()}")


def board_link(uid: str, title: str) -> tuple[str, str]:
    """A link to another Relay board, keeping the time range and the variables."""
    return (title, f"/d/{uid}?${{__url_time_range}}&${{__all_variables}}")


def quantiles(metric: str, by: str = "upstream") -> list[Query]:
    return [
        Query(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket"
            f"{{{UPSTREAM_SELECTOR}}}[{RATE_INTERVAL}])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def variables() -> list[Any]:
    def query_var(name: str, label: str, query: str, *, one: bool) -> dashboard.QueryVariable:
        variable = (
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(DATASOURCE)
            .query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
        if one:
            # One deployment at a time; Grafana picks the first value found.
            return variable.multi(False).include_all(False)
        return (
            variable.multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
        )

    build_info = "relay_build_info"
    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        query_var("cluster", "Cluster", f"label_values({build_info}, cluster)", one=True),
        query_var(
            "namespace", "Namespace",
            f'label_values({build_info}{{cluster=~"$cluster"}}, namespace)', one=True,
        ),
        query_var("job", "Job", f"label_values({build_info}{{{DEPLOYMENT}}}, job)", one=False),
        query_var(
            "instance", "Instance",
            f'label_values({build_info}{{{DEPLOYMENT}, job=~"$job"}}, instance)', one=False,
        ),
        query_var(
            "upstream",
            "Upstream",
            f"label_values(relay_requests_total{{{RELAY_SELECTOR}}}, upstream)",
            one=False,
        ),
    ]  # fmt: skip


def rounded(value: float | None) -> float | None:
    """0.0010000000000000009 (1 - 0.999) as people write it."""
    return None if value is None else round(value, 10)


def thresholds(steps: Sequence[tuple[float | None, str]]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=rounded(value), color=color) for value, color in steps])
    )


def legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(LegendDisplayMode.TABLE)
        .placement(LegendPlacement.BOTTOM)
        .calcs(["mean", "max", "lastNotNull"])
    )


def visualization(panel: Panel) -> Any:
    if panel.kind == "stat":
        return (
            stat.Panel()
            .graph_mode(BigValueGraphMode.AREA)
            .color_mode(BigValueColorMode.VALUE)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        )
    if panel.kind == "gauge":
        return gauge.Panel().reduce_options(
            common_builders.ReduceDataOptions().calcs(["lastNotNull"])
        )
    if panel.kind == "table":
        return table.Panel()
    if panel.kind == "heatmap":
        return (
            heatmap.Panel()
            .calculate(False)
            .y_axis(heatmap.YAxisConfig().unit(panel.unit))
            .color(
                heatmap.HeatmapColorOptions()
                .mode(HeatmapColorMode.SCHEME)
                .scheme("Oranges")
                .exponent(0.5)
            )
            .exemplars_color("rgba(255,0,255,0.7)")
        )
    builder = (
        timeseries.Panel()
        .line_width(1)
        .fill_opacity(10)
        .legend(legend())
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(TooltipDisplayMode.MULTI)
            .sort(SortOrder.DESCENDING)
        )
    )
    if panel.threshold_lines:
        builder = builder.thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED)
        )
    return builder


def build_panel(panel: Panel, panel_id: int, x: int, y: int) -> Any:
    builder = (
        visualization(panel)
        .id(panel_id)
        .title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .grid_pos(GridPos(h=panel.height, w=panel.width, x=x, y=y))
    )
    if panel.thresholds:
        builder = builder.thresholds(thresholds(panel.thresholds))
    for attribute in ("min", "max", "decimals"):
        if getattr(panel, attribute) is not None:
            builder = getattr(builder, attribute)(getattr(panel, attribute))
    if panel.links:
        builder = builder.links(
            [dashboard.DashboardLink(title).url(url) for title, url in panel.links]
        )
    for name, properties in panel.overrides:
        builder = builder.override_by_name(
            name, [DynamicConfigValue(id_val=key, value=value) for key, value in properties.items()]
        )
    for transformation, options in panel.transformations:
        builder = builder.with_transformation(
            DataTransformerConfig(id_val=transformation, options=options)
        )
    for index, query in enumerate(panel.queries):
        target = (
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + index))
            .expr(query.expr)
            .legend_format(query.legend or "__auto")
        )
        if query.instant:
            target = target.instant()
        if query.format:
            target = target.format(PromQueryFormat(query.format))
        if panel.exemplars:
            target = target.exemplar(True)
        builder = builder.with_target(target)
    return builder


def annotations() -> list[dashboard.AnnotationQuery]:
    """Deploys (a Relay version that was not running 10 minutes before) and, off by default,
    pod starts. The query sits in ``target``, where Grafana keeps Prometheus annotations."""
    build_info = f"relay_build_info{{{RELAY_SELECTOR}}}"

    def annotation(name: str, expr: str, colour: str, enabled: bool) -> Any:
        return (
            dashboard.AnnotationQuery()
            .name(name)
            .datasource(DATASOURCE)
            .enable(enabled)
            .icon_color(colour)
            .target(prometheus.Dataquery().ref_id("Anno").expr(expr).interval("1m"))
        )

    return [
        annotation(
            "Deploys",
            f"count by (version) ({build_info}) "
            f"unless count by (version) ({build_info} offset 10m)",
            "#8F3BB8",
            True,
        ),
        annotation(
            "Pod starts",
            f"count by (pod, instance) ({build_info}) "
            f"unless count by (pod, instance) ({build_info} offset 2m)",
            "#5794F2",
            False,
        ),
    ]


def links() -> list[dashboard.DashboardLink]:
    return [
        dashboard.DashboardLink("Relay")
        .type(DashboardLinkType.DASHBOARDS)
        .tags([TAG])
        .as_dropdown(True)
        .include_vars(True)
        .keep_time(True),
        dashboard.DashboardLink("Runbooks")
        .type(DashboardLinkType.LINK)
        .url(RUNBOOKS)
        .icon("doc")
        .target_blank(True),
    ]


def build_dashboard(
    uid: str, title: str, description: str, panels: Sequence[Panel], time_from: str = "now-1h"
) -> dict[str, Any]:
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .refresh("30s")
        .time(time_from, "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .links(links())
        .annotations(annotations())
        .editable()
    )
    for variable in variables():
        board = board.with_variable(variable)
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        board = board.with_panel(build_panel(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    encoded: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    return tidy(encoded)


def tidy(board: dict[str, Any]) -> dict[str, Any]:
    """Drop what the SDK writes on every variable but only interval variables have
    (``auto``, ``auto_count``, ``auto_min``): Grafana's dashboard schema has no such fields
    on query, datasource or custom variables."""
    for variable in board["templating"]["list"]:
        if variable.get("type") != "interval":
            for key in ("auto", "auto_count", "auto_min"):
                variable.pop(key, None)
    return board
