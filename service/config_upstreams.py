"""An upstream in the config: its URL and transport, pool, timeouts and TLS, and (from
config_endpoints.py) the endpoints it spreads requests over."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, field_validator, model_validator

from .config_endpoints import (
    DiscoveryConfig,
    HealthCheckConfig,
    OutlierConfig,
    Seconds,
    Strict,
    check_endpoints,
)


class PoolConfig(Strict):
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 100
    # Unset: as many as max_connections (a pool that keeps fewer alive than it may open
    # reconnects under steady load).
    max_keepalive_connections: Annotated[int, Field(ge=0, le=100_000)] = 100
    keepalive_expiry_seconds: Seconds = 30.0
    # Requests that may wait for a free connection; beyond, 503 at once rather than a wait
    # that would end in a pool timeout anyway (0: no queue; null: unbounded).
    max_waiting: Annotated[int, Field(ge=0)] | None = 1000
    # Recycling (README, *Endpoints*): a connection that has lived this long, or carried
    # this many requests, is closed when it comes back idle instead of being pooled, so a
    # Service address re-balances over the pods behind it. null: never.
    max_connection_age_seconds: Seconds | None = None
    max_requests_per_connection: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _keepalive_defaults_to_max(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_keepalive_connections") is None:
            limit = data.get("max_connections")
            # Only a usable number is copied: a bad max_connections is reported once, as itself.
            if isinstance(limit, int) or (isinstance(limit, str) and limit.strip().isdigit()):
                return {**data, "max_keepalive_connections": limit}
        return data

    @model_validator(mode="after")
    def _keepalive_within_max(self) -> PoolConfig:
        if self.max_keepalive_connections > self.max_connections:
            raise ValueError(
                f"max_keepalive_connections ({self.max_keepalive_connections}) must not exceed "
                f"max_connections ({self.max_connections})"
            )
        return self


class TimeoutConfig(Strict):
    connect: Seconds | None = 5.0
    read: Seconds | None = 30.0
    write: Seconds | None = 30.0
    pool: Seconds | None = 5.0


class TlsConfig(Strict):
    """TLS towards an upstream (``https://`` URLs only). The files are read at start and
    re-read when they change on disk (README, *Upstream TLS*)."""

    verify: bool = True
    # Extra trust anchors (PEM), on top of the default bundle unless system_ca is false.
    ca_file: Path | None = None
    system_ca: bool = True
    # mTLS: the client certificate (PEM, chain allowed) and its key (unencrypted PEM); the
    # key may sit in cert_file itself.
    cert_file: Path | None = None
    key_file: Path | None = None
    # SNI and the name the certificate must hold, for a URL holding an IP address.
    server_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")] | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    # How often the files are checked for a change (a stat each, off the request path).
    reload_interval_seconds: Seconds = 5.0

    @model_validator(mode="after")
    def _consistent(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file: needs cert_file (the certificate of that key)")
        if self.verify and not self.system_ca and self.ca_file is None:
            raise ValueError(
                "system_ca: false with no ca_file trusts nothing: give ca_file or set verify: false"
            )
        return self

    @property
    def files(self) -> bool:
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))


class UpstreamConfig(Strict):
    url: AnyHttpUrl
    # Static base URLs (scheme, host and port) to connect to instead of url's host; url's
    # host stays the Host header and the TLS server name.
    endpoints: list[AnyHttpUrl] = []
    discovery: DiscoveryConfig = DiscoveryConfig()
    balance: Literal["least_request", "round_robin"] = "least_request"
    outlier: OutlierConfig = OutlierConfig()
    health_check: HealthCheckConfig = HealthCheckConfig()
    transport: Literal["aiohttp", "httpcore"] = "aiohttp"
    preserve_host: bool = False
    # Deprecated: tls.verify (a warning at start; both given and different is an error).
    verify_tls: bool | None = None
    tls: TlsConfig = TlsConfig()
    pool: PoolConfig = PoolConfig()
    timeouts: TimeoutConfig = TimeoutConfig()

    @model_validator(mode="after")
    def _verify_tls_alias(self) -> UpstreamConfig:
        old = self.verify_tls
        if old is None or old == self.tls.verify:
            return self
        if "verify" in self.tls.model_fields_set:
            raise ValueError(
                f"verify_tls ({str(old).lower()}, deprecated) contradicts tls.verify "
                f"({str(self.tls.verify).lower()}): give tls.verify only"
            )
        # Frozen model: the alias is folded into tls once, here.
        object.__setattr__(self, "tls", self.tls.model_copy(update={"verify": old}))
        return self

    @model_validator(mode="after")
    def _endpoints_consistent(self) -> UpstreamConfig:
        check_endpoints(self.url, self.endpoints, self.discovery)
        if self.transport != "aiohttp":
            recycling = ("max_connection_age_seconds", "max_requests_per_connection")
            for field in recycling:
                if getattr(self.pool, field) is not None:
                    raise ValueError(f"pool.{field}: needs transport: aiohttp")
        return self

    @property
    def balanced(self) -> bool:
        """Whether requests go through the endpoint set (else: one pool on url's host)."""
        return (
            bool(self.endpoints)
            or self.discovery.mode != "none"
            or self.health_check.path is not None
        )

    @field_validator("url", mode="before")
    @classmethod
    def _has_scheme(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" not in value:
            raise ValueError(
                f"{value!r} has no scheme: the URL needs http:// or https://, "
                f"e.g. http://{value.lstrip('/')}"
            )
        return value

    @field_validator("url")
    @classmethod
    def _no_query(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if value.query or value.fragment:
            raise ValueError("upstream url must not carry a query or fragment")
        return value
