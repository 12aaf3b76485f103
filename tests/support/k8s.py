"""Rendering the kustomize overlays once per test session."""

from __future__ import annotations

import functools
import subprocess
from typing import Any

import yaml

from tests.support.tools import ROOT, require_tool

TARGETS = ["base", "overlays/dev", "overlays/production", "overlays/local", "overlays/upstream-tls"]


def kubectl() -> str:
    return require_tool("kubectl")


@functools.cache
def rendered_text(target: str) -> str:
    return subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "k8s" / target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def rendered(target: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered_text(target)) if d]


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]
