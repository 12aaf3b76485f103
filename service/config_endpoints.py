"""The config of an upstream's endpoints (README, *Endpoints*): discovery, outlier
ejection and active health checks. Kept beside config.py, which holds ``UpstreamConfig``."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

Seconds = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiscoveryConfig(Strict):
    """Where an upstream's endpoints come from (README, *Endpoints*)."""

    # none: connect to url's host; dns: every A/AAAA record of url's host is an endpoint.
    mode: Literal["none", "dns"] = "none"
    refresh_seconds: Seconds = 5.0
    # "ip" or "ip:port" of the DNS servers asked; empty: the system's (resolv.conf).
    nameservers: list[Annotated[str, Field(pattern=r"^[0-9A-Fa-f:.\[\]]+$")]] = []

    @field_validator("nameservers")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            split_nameserver(value)
        return values


def split_nameserver(value: str) -> tuple[str, int]:
    """``ip``, ``ip:port``, ``[ipv6]:port`` or a bare IPv6 address -> (ip, port)."""
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            port = _port(value, rest.removeprefix(":"))
    elif value.count(":") == 1:
        host, _, text = value.partition(":")
        port = _port(value, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (with an optional :port)") from None
    return host, port


def _port(value: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{value!r}: the port must be 1-65535")
    return int(text)


class OutlierConfig(Strict):
    """Passive ejection of an endpoint that keeps failing (README, *Endpoints*)."""

    # In a row: connect failures, resets, and 502/503/504 answers of the endpoint.
    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    # Doubles with each repeat ejection of the same endpoint, up to max_ejection_seconds.
    base_ejection_seconds: Seconds = 30.0
    max_ejection_seconds: Seconds = 300.0
    # Never more than this share of the endpoints ejected at once.
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50

    @model_validator(mode="after")
    def _cap_above_base(self) -> OutlierConfig:
        if self.max_ejection_seconds < self.base_ejection_seconds:
            raise ValueError(
                f"max_ejection_seconds ({self.max_ejection_seconds:g}) must not be below "
                f"base_ejection_seconds ({self.base_ejection_seconds:g})"
            )
        return self


class HealthCheckConfig(Strict):
    """An active check of each endpoint: a GET of ``path`` (null: off)."""

    path: Annotated[str, Field(pattern=r"^/[^#\s]*$")] | None = None
    interval_seconds: Seconds = 5.0
    timeout_seconds: Seconds = 1.0
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    healthy_threshold: Annotated[int, Field(ge=1)] = 2


def check_endpoints(
    url: AnyHttpUrl, endpoints: list[AnyHttpUrl], discovery: DiscoveryConfig
) -> None:
    """``ValueError`` naming the field when a static endpoint list does not fit ``url``."""
    if endpoints and discovery.mode != "none":
        raise ValueError(
            "endpoints: a static list replaces discovery: give endpoints or "
            "discovery.mode: dns, not both"
        )
    seen: set[str] = set()
    for index, endpoint in enumerate(endpoints):
        where = f"endpoints.{index}"
        if endpoint.scheme != url.scheme:
            raise ValueError(
                f"{where}: {endpoint} must use url's scheme ({url.scheme}://): "
                "the TLS settings and server name are url's"
            )
        if (endpoint.path or "/") != "/" or endpoint.query or endpoint.fragment:
            raise ValueError(
                f"{where}: {endpoint} must be scheme, host and port only: the base path is url's"
            )
        if endpoint.username or endpoint.password:
            raise ValueError(f"{where}: {endpoint} must not carry credentials")
        address = f"{endpoint.host}:{endpoint.port}"
        if address in seen:
            raise ValueError(f"{where}: {address} is listed twice")
        seen.add(address)
