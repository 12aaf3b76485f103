"""service/ imports only downwards: server/ -> the core -> upstreams/, telemetry/ beside them
(see the README's Architecture section). Read from the source, so a new upward import fails
here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parent.parent / "service"
VOCABULARY = {"service", "service.config", "service.config_errors", "service.errors"}
VOCABULARY |= {"service.exchange", "service.compat", "service.route_index", "service.session"}
VOCABULARY |= {"service.retry_config", "service.config_endpoints", "service.config_routes"}
VOCABULARY |= {"service.config_upstreams"}
CORE = {"service.app", "service.proxy", "service.forwarding", "service.routing"}
CORE |= {"service.headers", "service.request_ids", "service.route_policy"}
CORE |= {"service.retries", "service.client_channel"}
CORE |= {"service.websocket", "service.websocket_ends", "service.websocket_upstream"}


def layer(module: str) -> str:
    if module in VOCABULARY:
        return "vocabulary"
    if module in CORE:
        return "core"
    for package in ("server", "upstreams", "telemetry"):
        if module == f"service.{package}" or module.startswith(f"service.{package}."):
            return package
    return "entry point" if module == "service.__main__" else "unknown"


# What each layer may import from service/, besides its own modules.
ALLOWED = {
    "vocabulary": {"vocabulary"},
    "upstreams": {"vocabulary"},
    # The pool snapshots and endpoint states, and the attempt record (a client span's
    # resend count).
    "telemetry": {
        "vocabulary",
        "service.upstreams.pools",
        "service.upstreams.gated",
        "service.upstreams.attempt",
        "service.upstreams.endpoints",
    },
    "core": {"vocabulary", "upstreams", "telemetry"},
    "server": {"vocabulary", "upstreams", "telemetry", "core"},
    "entry point": {"vocabulary", "core", "server", "telemetry"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The service modules ``path`` imports (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if target.startswith("service"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("service")}
    return found


def test_every_module_has_a_layer() -> None:
    paths = sorted(SERVICE.rglob("*.py"))
    assert len(paths) > 20
    assert [module_name(p) for p in paths if layer(module_name(p)) == "unknown"] == []


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for path in sorted(SERVICE.rglob("*.py")):
        own = layer(module_name(path))
        for target in imports(path):
            allowed = ALLOWED[own]
            if layer(target) not in {own, *allowed} and target not in allowed:
                upward.append(f"{module_name(path)} ({own}) imports {target} ({layer(target)})")
    assert upward == []
