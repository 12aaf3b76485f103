"""The shipped alerting and recording rules, as the tests load them.

Each overlay's PrometheusRule is read from the manifests kustomize renders (the dev overlay's
severities are set there, by a component); the plain rules file for Prometheus without the
operator comes from the generator. ``alerts/generate.py`` is a script, loaded by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.support.k8s import one, rendered
from tests.support.tools import ROOT

GENERATOR = ROOT / "alerts" / "generate.py"
# The overlays that install rules, and the namespace each one scopes them to.
RULE_OVERLAYS = {"production": "relay", "dev": "relay-dev"}

# kube-state-metrics series (a stock kube-prometheus-stack scrapes them).
KUBE_STATE_METRICS = {
    "kube_pod_container_resource_limits",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
    "kube_horizontalpodautoscaler_spec_min_replicas",
}


def load_generator() -> ModuleType:
    name = "relay_alerts_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def prometheus_rule(overlay: str) -> dict[str, Any]:
    """The PrometheusRule of an overlay, as rendered by kustomize."""
    return one(rendered(f"overlays/{overlay}"), "PrometheusRule")


def overlay_groups(overlay: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = prometheus_rule(overlay)["spec"]["groups"]
    return groups


def plain_groups(namespace: str | None = None) -> list[dict[str, Any]]:
    """The plain rules file's groups: every namespace, or one."""
    generate = load_generator()
    text = generate.render_rules_file(generate.load_config(), namespace)
    groups: list[dict[str, Any]] = yaml.safe_load(text)["groups"]
    return groups


def rules_of(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for group in groups for rule in group["rules"]]


def write_rules_file(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path
