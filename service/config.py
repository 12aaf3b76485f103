"""Typed configuration: a YAML file plus ``RELAY_*`` environment overrides, validated once.

The file path comes from ``--config`` or ``RELAY_CONFIG``. Environment variables override
file values with ``__`` as the nesting delimiter (``RELAY_SERVER__PORT=8000``). With no file
the built-in default applies: a demo upstream on loopback and one route to it, so that a bare
``python -m service`` proxies something real.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .config_endpoints import (
    Strict,
)
from .config_errors import env_overrides, format_validation_error
from .config_routes import RESERVED_HEADERS, HeaderPolicy, RouteTimeouts
from .config_upstreams import UpstreamConfig
from .retry_config import RetryConfig
from .route_index import Conflict, find_conflict

CONFIG_ENV_VAR = "RELAY_CONFIG"

# Names become Prometheus label values and span attributes: keep them short identifiers so
# label cardinality is bounded by the config, never by traffic.
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Seconds = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """Raised for any invalid configuration; the message names the offending field."""


class RouteConfig(Strict):
    name: Name | None = None
    prefix: Annotated[str, Field(pattern=r"^/[^?#\s]*$")] = "/"
    host: Annotated[str, Field(pattern=r"^(\*\.)?[A-Za-z0-9.-]+$")] | None = None
    upstream: Name
    strip_prefix: bool = False
    # Per-route policies (README, *Route policies*): each replaces the upstream's setting.
    timeouts: RouteTimeouts | None = None
    request_headers: HeaderPolicy | None = None  # on what goes upstream
    response_headers: HeaderPolicy | None = None  # on what goes to the client
    retry: RetryConfig = RetryConfig()
    # WebSocket upgrades proxied (README, *WebSocket*); false: refused with 403.
    websocket: bool = True

    @property
    def label(self) -> str:
        return self.name or self.upstream


class ServerConfig(Strict):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    admin_host: str = "0.0.0.0"
    admin_port: Annotated[int, Field(ge=0, le=65535)] = 9090
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = "relay"
    drain_delay_seconds: Annotated[float, Field(ge=0)] = 5.0
    grace_period_seconds: Annotated[float, Field(ge=0)] = 30.0
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    backlog: Annotated[int, Field(ge=1)] = 2048
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    retry_after_seconds: Annotated[int, Field(ge=0)] = 1
    # uvicorn answers 503 to a request arriving while this many client connections (idle
    # keep-alive ones and its own included) are open or requests run: null or 0, no limit.
    limit_concurrency: Annotated[int, Field(ge=0)] | None = None
    # How long an idle keep-alive client connection stays open: longer than the idle timeout
    # of a load balancer in front (AWS ALB: 60 s), as nginx's 75 s is, so that it is never
    # Relay that closes a connection the balancer is about to reuse. Each idle connection
    # holds a descriptor and some 10 KB (README, *At platform size*).
    keepalive_timeout_seconds: Seconds = 75.0
    # From a request's first byte, how long its head (request line and header fields) may
    # take to arrive: beyond, 408 and the connection closes (nginx's client_header_timeout).
    # A new connection that sends nothing is closed after keepalive_timeout_seconds.
    request_head_timeout_seconds: Seconds | None = 60.0
    # "module:function", called with the proxy's FastAPI app before it starts, in every
    # worker: routes and middleware of your own (README, *Extending the app*).
    app_hook: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")] | None = None


class LogConfig(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    access_log: bool = True
    # Access lines of successful exchanges kept: 1 in this many (counted per worker, not
    # drawn at random); every error, failure and disconnect is always kept. 1: all.
    access_sample: Annotated[int, Field(ge=1)] = 1


class RequestIdConfig(Strict):
    """The request id every exchange carries (README, *Request ids*)."""

    # Read from trusted clients, sent upstream, returned on every response.
    header: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")] = "X-Request-Id"
    # true: keep a well-formed id from any client, not only from server.trusted_proxies.
    keep_untrusted: bool = False

    @field_validator("header")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() in RESERVED_HEADERS:
            raise ValueError(f"{value!r} is a header the proxy sets or removes itself")
        return value


class TracingConfig(Strict):
    """How spans are made; whether and where they go is the ``OTEL_*`` variables' business."""

    # stock: opentelemetry-instrumentation-fastapi and -httpx. native: the same spans made
    # directly on the SDK, at a fraction of the cost per request (README, *Tracing*).
    instrumentation: Literal["stock", "native"] = "stock"


class DemoConfig(Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8081


class LimitsConfig(Strict):
    """Bounds on what a client may send, enforced while the request is parsed."""

    max_request_target_bytes: Annotated[int, Field(ge=16)] = 8192  # 414 beyond
    max_header_bytes: Annotated[int, Field(ge=64)] = 65536  # names + values; 431 beyond
    max_header_count: Annotated[int, Field(ge=1)] = 100  # 431 beyond
    max_body_bytes: Annotated[int, Field(ge=0)] = 0  # 413 beyond; 0: unlimited
    # %2F and %5C in a path are refused (400) unless this is set; then they stay encoded,
    # are forwarded as sent and never separate segments for routing.
    allow_encoded_slashes: bool = False


DEFAULT_CONFIG: dict[str, Any] = {
    # Nothing routes traffic to a demo on a workstation: Ctrl-C need not wait for anything
    # to notice the drain.
    "server": {"drain_delay_seconds": 0},
    "demo": {"enabled": True, "host": "127.0.0.1", "port": 8081},
    "upstreams": {"demo": {"url": "http://127.0.0.1:8081"}},
    "routes": [{"name": "demo", "prefix": "/", "upstream": "demo"}],
}


class WebSocketConfig(Strict):
    """WebSocket sessions (README, *WebSocket*)."""

    # A message (text or binary, all its fragments) larger than this either way closes the
    # session with 1009.
    max_message_bytes: Annotated[int, Field(ge=125, le=1 << 30)] = 1 << 20
    # No message either way for this long closes the session with 1001; null: never.
    idle_timeout_seconds: Seconds | None = None
    # Open sessions per upstream (each holds its own upstream connection, outside the
    # pool); beyond: 503 with Retry-After.
    max_sessions_per_upstream: Annotated[int, Field(ge=1)] = 1000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerConfig = ServerConfig()
    log: LogConfig = LogConfig()
    tracing: TracingConfig = TracingConfig()
    demo: DemoConfig = DemoConfig()
    limits: LimitsConfig = LimitsConfig()
    request_id: RequestIdConfig = RequestIdConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    upstreams: dict[Name, UpstreamConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file (passed as init kwargs) is the base; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _routes_reference_upstreams(self) -> Settings:
        labels: set[str] = set()
        for index, route in enumerate(self.routes):
            if route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                raise ValueError(
                    f"routes.{index}.upstream: unknown upstream {route.upstream!r} (known: {known})"
                )
            if route.name is not None:
                if route.name in labels:
                    raise ValueError(f"routes.{index}.name: duplicate route name {route.name!r}")
                labels.add(route.name)
            _check_request_id_untouched(index, route, self.request_id.header)
        conflict = find_conflict(self.routes)
        if conflict is not None:
            raise ValueError(conflict_message(conflict, self.routes))
        return self


def _check_request_id_untouched(index: int, route: RouteConfig, header: str) -> None:
    for field in ("request_headers", "response_headers"):
        policy: HeaderPolicy | None = getattr(route, field)
        if policy is None:
            continue
        for part, names in (("set", list(policy.set)), ("remove", policy.remove)):
            for name in names:
                if name.lower() == header.lower():
                    verb = "set" if part == "set" else "removed"
                    raise ValueError(
                        f"routes.{index}.{field}.{part}: {name!r} cannot be {verb} by a header "
                        "policy: it is the request id field (request_id.header)"
                    )


def conflict_message(conflict: Conflict, routes: list[RouteConfig]) -> str:
    """One line: the route that never matches, and the route that takes its requests."""
    route, other = routes[conflict.route], routes[conflict.other]
    host = f"host {other.host!r}" if other.host is not None else "no host"
    if conflict.duplicate:
        problem = f"duplicate route: routes.{conflict.other} has the same host and prefix"
    else:
        problem = f"shadowed route: routes.{conflict.other} takes every request it would match"
    if len(other.prefix) > len(route.prefix):
        rank = f"prefix {other.prefix!r} is longer than {route.prefix!r}"
    else:
        rank = f"prefix {other.prefix!r} is as long as {route.prefix!r} and earlier"
    return f"routes.{conflict.route}: {problem} ({host}, {rank}), so this one never matches"


# libyaml's loader parses a large config (thousands of upstreams) about ten times as fast as
# the pure-Python one; PyYAML's wheels ship it, a source build may not.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def config_path(path: str | Path | None = None) -> Path | None:
    """The config file: ``path``, else ``$RELAY_CONFIG``, else None (the built-in default)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR) or None
    return Path(path) if path is not None else None


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once: the file (or the built-in default), then ``RELAY_*`` env."""
    file = config_path(path)
    data = read_yaml(file) if file is not None else dict(DEFAULT_CONFIG)
    data.update(overrides)
    try:
        settings = Settings(**data)
        if file is None and "upstreams" not in overrides:
            # The built-in upstream is the demo listener, wherever RELAY_DEMO__* moved it.
            demo = settings.demo
            data["upstreams"] = {"demo": {"url": f"http://{demo.host}:{demo.port}"}}
            settings = Settings(**data)
        return settings
    except ValidationError as exc:
        message = format_validation_error(exc, Settings, os.environ)
        raise ConfigError(f"invalid config: {message}") from exc
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc


def deprecations(settings: Settings) -> list[str]:
    """One warning per deprecated field in use, each naming its replacement."""
    return [
        f"upstreams.{name}.verify_tls is deprecated: use upstreams.{name}.tls.verify"
        for name, upstream in settings.upstreams.items()
        if upstream.verify_tls is not None
    ]


def summary(settings: Settings, path: Path | None) -> str:
    """One line: where the config came from, its routes and its upstreams."""
    source = (
        str(path) if path is not None else f"built-in demo config (no --config or {CONFIG_ENV_VAR})"
    )
    variables = sorted(name for name, _ in env_overrides(os.environ).values())
    if variables:
        source += f", overridden by {', '.join(variables)}"
    routes = _listed(
        f"{route.host or ''}{route.prefix} -> {route.upstream}" for route in settings.routes
    )
    upstreams = _listed(f"{name} {config.url}" for name, config in settings.upstreams.items())
    return f"config: {source}; routes: {routes}; upstreams: {upstreams}"


SUMMARY_ITEMS = 20


def _listed(items: Iterable[str]) -> str:
    """The first ``SUMMARY_ITEMS`` of ``items``, then how many more: a config of thousands
    of routes must not make a start-up line of hundreds of KB."""
    listed = list(items)
    shown = ", ".join(listed[:SUMMARY_ITEMS])
    rest = len(listed) - SUMMARY_ITEMS
    return f"{shown} and {rest} more ({len(listed)} in all)" if rest > 0 else shown
