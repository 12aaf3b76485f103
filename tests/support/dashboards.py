"""Every query of the committed dashboards (panels and annotations), with Grafana's
variables substituted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.tools import ROOT

DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
MATCH_ALL = {"cluster": ".*", "namespace": ".*", "job": ".*", "instance": ".*", "upstream": ".*"}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def substitute(expr: str, values: dict[str, str]) -> str:
    builtins = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
    for name, value in {**builtins, **{f"${k}": v for k, v in values.items()}}.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def panel_queries(
    dashboard: dict[str, Any], values: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """(panel title, query) for every target; variables default to match-all."""
    chosen = {**MATCH_ALL, **(values or {})}
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], substitute(target["expr"], chosen)))
    return out


def annotation_queries(
    dashboard: dict[str, Any], values: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """(annotation name, query) for every annotation of the dashboard."""
    chosen = {**MATCH_ALL, **(values or {})}
    return [
        (annotation["name"], substitute(annotation["target"]["expr"], chosen))
        for annotation in dashboard["annotations"]["list"]
    ]
