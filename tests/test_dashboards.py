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

from tests.alert_rules import plain_groups, rules_of
from tests.dashboard_queries import DASHBOARDS, load, panel_queries

ROOT = Path(__file__).resolve().parent.parent
VARIABLES = {"datasource", "job", "namespace", "instance", "upstream"}
# Metric names, not the recording rules (``level:metric:operation``) that embed them.
METRIC = re.compile(r"(?<![:\w])(relay_[a-z_]+|process_[a-z_]+|up)\b(?!:)")
RECORD = re.compile(r"\b([a-z_]+:[a-z_]+:[a-z_0-9]+)\b")


def test_committed_json_equals_generator_output() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_four_dashboards_exist() -> None:
    assert {p.stem for p in DASHBOARDS} == {
        "relay-overview",
        "relay-pools",
        "relay-errors",
        "relay-process",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_structure(path: Path) -> None:
    board = load(path)
    assert board["uid"] == path.stem
    assert "relay" in board["tags"]
    assert isinstance(board["schemaVersion"], int)
    assert "dashboard" not in board, "a dashboard model, not an API envelope"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == VARIABLES
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["title"]
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
            expr = target["expr"]
            assert expr.strip()
            assert 'job=~"$job"' in expr or RECORD.match(expr), expr
            if "upstream" in expr and "relay_" in expr and "by (instance)" not in expr:
                assert 'upstream=~"$upstream"' in expr, expr
        latency = ("relay_request_duration_seconds", "relay_upstream_response_headers_seconds")
        if any(
            "histogram_quantile" in t["expr"] and any(m in t["expr"] for m in latency)
            for t in panel["targets"]
        ):
            assert all(t.get("exemplar") for t in panel["targets"]), panel["title"]


def test_queries_use_only_exposed_metrics() -> None:
    from service.metrics import Metrics

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
    assert used, "the burn-rate panel reads the SLO recording rules"
    assert used <= records, used - records


def test_kustomization_renders_sidecar_configmaps() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required (kubectl kustomize)"
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "dashboards")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    maps: list[dict[str, Any]] = [d for d in yaml.safe_load_all(rendered) if d]
    assert len(maps) == len(DASHBOARDS)
    for config_map in maps:
        assert config_map["kind"] == "ConfigMap"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = config_map["data"].items()
        assert json.loads(text) == load(ROOT / "dashboards" / name)
