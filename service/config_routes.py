"""Route policies in the config: a route's own timeouts and its header policies, and the
header fields no policy may touch (the ones the proxy itself owns)."""

from __future__ import annotations

import re

from pydantic import field_validator, model_validator

from .config_endpoints import Seconds, Strict


class RouteTimeouts(Strict):
    """A route's own timeouts. Each of connect, read, write and pool that is given replaces
    the upstream's for this route (null: none); the others stay the upstream's. ``total``
    bounds the whole exchange, the response body included (null: no bound)."""

    connect: Seconds | None = None
    read: Seconds | None = None
    write: Seconds | None = None
    pool: Seconds | None = None
    total: Seconds | None = None

    def overrides(self) -> dict[str, float | None]:
        """The upstream timeouts this route replaces, by httpx's names."""
        given = self.model_fields_set
        return {n: getattr(self, n) for n in ("connect", "read", "write", "pool") if n in given}


# RFC 9110 5.1 token: what a field name may be.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
# Visible ASCII, spaces and tabs inside (RFC 9110 5.5, without obs-text): never CR, LF or NUL.
HEADER_VALUE = re.compile(r"([\x21-\x7e]([\t\x20-\x7e]*[\x21-\x7e])?)?")


class HeaderPolicy(Strict):
    """Fields a route sets or removes in one direction (README, *Header policies*)."""

    set: dict[str, str] = {}  # each replaces every field of that name
    remove: list[str] = []

    @field_validator("set")
    @classmethod
    def _settable(cls, fields: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for name, value in fields.items():
            _check_policy_name(name, "set")
            if name.lower() in seen:
                raise ValueError(
                    f"{name!r} and {seen[name.lower()]!r} are the same field (names are "
                    "case-insensitive): set it once"
                )
            seen[name.lower()] = name
            if not HEADER_VALUE.fullmatch(value):
                raise ValueError(f"{name!r}: {_value_problem(value)}: {value!r}")
        return fields

    @field_validator("remove")
    @classmethod
    def _removable(cls, names: list[str]) -> list[str]:
        for name in names:
            _check_policy_name(name, "removed")
        return names

    @model_validator(mode="after")
    def _set_or_remove(self) -> HeaderPolicy:
        both = {n.lower() for n in self.set} & {n.lower() for n in self.remove}
        if both:
            raise ValueError(
                f"{sorted(both)[0]!r} is both set and removed: set already replaces every "
                "field of that name"
            )
        return self


def _value_problem(value: str) -> str:
    if value != value.strip(" \t"):
        return "a value must not start or end with a space or tab"
    return "a value holds visible ASCII, spaces and tabs only (no CR, LF, NUL or other controls)"


def _check_policy_name(name: str, verb: str) -> None:
    if not HEADER_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header field name")
    why = reserved_why(name)
    if why is not None:
        raise ValueError(f"{name!r} cannot be {verb} by a header policy: {why}")


# Header fields the proxy itself removes, rewrites or adds (service.headers: hop-by-hop,
# forwarding and claimed-client names, framing, Via; the trace context): a request id in
# one of them would be dropped or overwritten on the way. tests/test_request_ids.py checks
# that every name service.headers handles is here.
RESERVED_HEADERS: frozenset[str] = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "host",
        "content-length",
        "via",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-original-url",
        "x-rewrite-url",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "proxy-status",
        "traceparent",
        "tracestate",
    }
)

# Why a header policy may not set or remove a reserved field, by kind (the rules of
# service.headers are not configurable).
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
_HOP_BY_HOP = frozenset(
    {"connection", "proxy-connection", "keep-alive", "te", "trailer", "upgrade"}
    | {"proxy-authenticate", "proxy-authorization"}
)
_OWN = frozenset({"via", "proxy-status", "traceparent", "tracestate"})


def reserved_why(name: str) -> str | None:
    """Why no header policy may set or remove ``name``: one of RESERVED_HEADERS or any
    ``X-Forwarded-*`` (None: a policy may)."""
    lower = name.lower()
    if lower not in RESERVED_HEADERS and not lower.startswith("x-forwarded-"):
        return None
    if lower in _FRAMING:
        return "the proxy writes Host and the message framing itself"
    if lower in _HOP_BY_HOP:
        return "a hop-by-hop field, never forwarded"
    if lower in _OWN:
        return "the proxy writes it itself (Via, Proxy-Status, the trace context)"
    return "a forwarding field, kept or dropped by server.trusted_proxies only"
