"""Dashboards: generated from code, structurally sound, renderable for the Grafana sidecar."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboards import DASHBOARDS, load, panel_queries
from tests.support.rules import plain_groups, rules_of

ROOT = Path(__file__).resolve().parent.parent
BOARDS = {"relay-overview", "relay-slo", "relay-pools", "relay-errors", "relay-process"}
VARIABLES = {"datasource", "cluster", "namespace", "job", "instance", "upstream"}
# Metric names, not the recording rules (``level:metric:operation``) that embed them.
METRIC = re.compile(r"(?<![:\w])(relay_[a-z_]+|process_[a-z_]+|up)\b(?!:)")
RECORD = re.compile(r"\b([a-z_]+:[a-z_]+:[a-z_0-9]+)\b")
SELECTOR = re.compile(r"(?<![\w:])([a-z_:][a-z0-9_:]*)\{([^}]*)\}")
GRAFANA_DEFAULT_STEPS = [{"color": "green", "value": None}, {"color": "red", "value": 80}]
LEVEL = "cluster_namespace_upstream"


def board(uid: str) -> dict[str, Any]:
    return load(ROOT / "dashboards" / f"{uid}.json")


def panels(uid: str) -> dict[str, dict[str, Any]]:
    return {panel["title"]: panel for panel in board(uid)["panels"]}


@pytest.mark.live
def test_committed_json_equals_generator_output() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.live
def test_the_generator_names_the_extra_it_needs() -> None:
    """Without grafana-foundation-sdk (pip install -e . alone) it says what to install."""
    blocked = (
        "import runpy, sys; sys.modules['grafana_foundation_sdk'] = None; "
        f"runpy.run_path({str(ROOT / 'dashboards' / 'generate.py')!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "dashboards/generate.py needs grafana-foundation-sdk==0.0.21: "
        "pip install -e '.[test]' installs it"
    )


def test_the_dashboards_exist() -> None:
    assert {p.stem for p in DASHBOARDS} == BOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_structure(path: Path) -> None:
    dashboard = load(path)
    assert dashboard["uid"] == path.stem
    assert "relay" in dashboard["tags"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert "dashboard" not in dashboard, "a dashboard model, not an API envelope"
    assert dashboard["graphTooltip"] == 1, "shared crosshair"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == VARIABLES
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["description"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert_scoped(target["expr"])
        latency = ("relay_request_duration_seconds", "relay_upstream_response_headers_seconds")
        if any(
            ("histogram_quantile" in t["expr"] or t.get("format") == "heatmap")
            and any(m in t["expr"] for m in latency)
            and panel["type"] in ("timeseries", "heatmap")
            for t in panel["targets"]
        ):
            assert all(t.get("exemplar") for t in panel["targets"]), panel["title"]


def assert_scoped(expr: str) -> None:
    """Every selector names the deployment; Relay's own series also the job and instance,
    and the per-upstream ones the upstream (unless they are about unrouted requests)."""
    selectors = SELECTOR.findall(expr)
    assert selectors, expr
    for name, matchers in selectors:
        assert 'cluster=~"$cluster"' in matchers and 'namespace=~"$namespace"' in matchers, expr
        if RECORD.fullmatch(name):
            assert 'upstream=~"$upstream"' in matchers, expr
        else:
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, expr
    if "upstream" in expr and "relay_" in expr and 'upstream="-"' not in expr:
        assert 'upstream=~"$upstream"' in expr, expr


def test_cluster_and_namespace_never_merge_deployments() -> None:
    """One deployment at a time (the first found, not All), so dev never blends into
    production; the rest narrow down and default to all."""
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in load(path)["templating"]["list"]}
        for name in ("cluster", "namespace"):
            assert variables[name]["multi"] is False and variables[name]["includeAll"] is False
            assert "$__all" not in json.dumps(variables[name].get("current", {}))
        for name in ("job", "instance", "upstream"):
            assert variables[name]["includeAll"] is True and variables[name]["allValue"] == ".*"
        # Grafana's own options the schema has no place for on these variables.
        assert not {"auto", "auto_count", "auto_min"} & set().union(*map(set, variables.values()))


def test_links_between_boards_and_to_runbooks() -> None:
    runbook_anchors = set()
    for path in DASHBOARDS:
        dashboard = load(path)
        links = {link["type"]: link for link in dashboard["links"]}
        assert links["dashboards"]["tags"] == ["relay"]
        assert links["dashboards"]["includeVars"] and links["dashboards"]["keepTime"]
        assert links["link"]["url"].endswith("docs/runbooks.md")
        for panel in dashboard["panels"]:
            for link in panel.get("links", []):
                if "#" in link["url"]:
                    runbook_anchors.add(link["url"].rsplit("#", 1)[1])
                else:
                    uid = re.match(r"/d/([\w-]+)\?", link["url"])
                    assert uid and uid.group(1) in BOARDS, link
    alerts = {r["alert"].lower() for r in rules_of(plain_groups()) if "alert" in r}
    assert runbook_anchors and runbook_anchors <= alerts


def test_deploy_annotations() -> None:
    for path in DASHBOARDS:
        annotations = {a["name"]: a for a in load(path)["annotations"]["list"]}
        deploys = annotations["Deploys"]
        assert deploys["enable"] is True
        assert "relay_build_info" in deploys["target"]["expr"]
        assert "offset" in deploys["target"]["expr"], "a version that was not there before"
        for annotation in annotations.values():
            assert_scoped(annotation["target"]["expr"])


def test_every_stat_panel_has_thresholds_that_mean_something() -> None:
    """Grafana's default (red from 80, whatever the unit) turned uptime red after 80 s and
    showed zero targets up in green."""
    for path in DASHBOARDS:
        for panel in load(path)["panels"]:
            if panel["type"] not in ("stat", "gauge"):
                continue
            defaults = panel["fieldConfig"]["defaults"]
            steps = defaults.get("thresholds", {}).get("steps")
            assert steps and steps != GRAFANA_DEFAULT_STEPS, panel["title"]
            assert steps[0]["value"] is None
            values = [s["value"] for s in steps[1:]]
            assert values == sorted(values), panel["title"]
            if defaults["unit"] == "percentunit":
                assert all(0 <= v <= 1 for v in values), panel["title"]
    process = panels("relay-process")
    assert process["Targets up"]["fieldConfig"]["defaults"]["thresholds"]["steps"][0] == {
        "color": "red",
        "value": None,
    }, "no target up is red"


def test_overview_headline_row() -> None:
    top = [p for p in board("relay-overview")["panels"] if p["gridPos"]["y"] == 0]
    assert [p["type"] for p in top] == ["stat"] * 4
    assert [p["fieldConfig"]["defaults"]["unit"] for p in top] == [
        "reqps",
        "percentunit",
        "s",
        "percentunit",
    ]


def recorded(name: str) -> str:
    records = {r["record"]: r["expr"] for r in rules_of(plain_groups()) if "record" in r}
    return records[name]


def test_error_ratio_panel_is_the_sli_the_alerts_read() -> None:
    (target,) = panels("relay-overview")["Error ratio"]["targets"]
    name, matchers = SELECTOR.fullmatch(target["expr"]).groups()  # type: ignore[union-attr]
    assert name == f"{LEVEL}:relay_requests_errors:ratio_rate5m"
    assert matchers == 'cluster=~"$cluster", namespace=~"$namespace", upstream=~"$upstream"'
    assert recorded(name)
    fast_burn = next(
        r for r in rules_of(plain_groups()) if r.get("alert") == "RelayErrorBudgetFastBurn"
    )
    assert f"{LEVEL}:relay_requests_errors:ratio_rate" in fast_burn["expr"]
    # The headline stat is the same SLI, over the selected upstreams together.
    stat = panels("relay-overview")["Error ratio (availability SLI)"]["targets"][0]["expr"]
    assert f"{LEVEL}:relay_requests_errors:rate5m" in stat
    assert f"{LEVEL}:relay_requests_valid:rate5m" in stat


def test_overview_has_a_route_table_and_a_latency_heatmap() -> None:
    overview = panels("relay-overview")
    table = overview["Upstreams and routes"]
    assert table["type"] == "table"
    assert all("by (upstream, route)" in t["expr"] or "upstream, route)" in t["expr"]
               for t in table["targets"])  # fmt: skip
    assert all(t["instant"] and t["format"] == "table" for t in table["targets"])
    heatmap = overview["Latency distribution"]
    assert heatmap["type"] == "heatmap"
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap" and target["exemplar"] is True
    assert "relay_request_duration_seconds_bucket" in target["expr"]


def test_slo_board() -> None:
    slo = panels("relay-slo")
    exprs = [t["expr"] for p in slo.values() for t in p["targets"]]
    for metric in ("relay_requests_errors", "relay_requests_slow"):
        assert any(f"{metric}:ratio_rate30d" in e and e.startswith("1 - ") for e in exprs)
        assert any(f"{metric}:ratio_rate30d" in e and " / " in e for e in exprs), "budget left"
    windows = yaml.safe_load((ROOT / "alerts" / "slo.yaml").read_text())["windows"]
    burn = slo["Availability burn rate per window"]["targets"]
    assert [re.search(r"ratio_rate(\w+)\{", t["expr"]).group(1) for t in burn] == windows  # type: ignore[union-attr]
    stats = [p for p in slo.values() if p["type"] == "stat"]
    assert {s["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] for s in stats} >= {
        0.999,
        0.99,
    }, "the SLIs turn green at their objectives"


def test_process_panels_work_with_one_worker_and_with_several() -> None:
    """With several workers the process series carry a `worker` label: every panel sums or
    takes the maximum per pod, or shows the worker, and names the pod in its legend."""
    for panel in board("relay-process")["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            if "process_" not in expr:
                continue
            per_pod = re.search(r"\b(sum|max|min) by \(pod, instance\)", expr)
            assert per_pod or "{{worker}}" in target["legendFormat"], panel["title"]
            assert "{{pod}}" in target["legendFormat"], panel["title"]


def test_queries_use_only_exposed_metrics() -> None:
    from service.telemetry.metrics import Metrics

    exposed = {m.name for m in Metrics().registry.collect()}
    known = exposed | {"up", "relay_requests", "relay_disconnects"}
    for path in DASHBOARDS:
        for title, expr in panel_queries(load(path)):
            for name in METRIC.findall(expr):
                base = re.sub(r"_(total|bucket|count|sum)$", "", name)
                assert base in known or name in known, f"{path.stem} / {title}: {name}"


def test_recording_rules_used_exist() -> None:
    records = {r["record"] for r in rules_of(plain_groups()) if "record" in r}
    used = {m for p in DASHBOARDS for _, e in panel_queries(load(p)) for m in RECORD.findall(e)}
    assert used, "the SLO panels read the recording rules"
    assert used <= records, used - records


@pytest.mark.live
def test_kustomization_renders_sidecar_configmaps() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found on PATH (kubectl kustomize): apt-get install kubectl"
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "dashboards")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    maps: list[dict[str, Any]] = [d for d in yaml.safe_load_all(rendered) if d]
    assert len(maps) == len(DASHBOARDS)
    uids = []
    for config_map in maps:
        assert config_map["kind"] == "ConfigMap"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = config_map["data"].items()
        assert json.loads(text) == load(ROOT / "dashboards" / name)
        uids.append(json.loads(text)["uid"])
    assert len(uids) == len(set(uids))
