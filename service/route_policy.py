"""Per-route policies, compiled once at start: the upstream timeouts a route replaces, its
total timeout, and the header fields it sets or removes in each direction.

A route without any of them has no policy at all (``None``), so its requests pay nothing for
the feature; the proxy looks a route's policy up by the route object it matched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import RouteConfig
from .config_routes import HeaderPolicy
from .config_upstreams import UpstreamConfig

RawHeaders = list[tuple[bytes, bytes]]
Timeouts = dict[str, float | None]


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """One direction's header policy as bytes: the lowercased names whose fields are
    dropped (those removed and those set, since a set field replaces every field of its
    name), then the fields added."""

    drop: frozenset[bytes]
    add: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, policy: HeaderPolicy | None) -> HeaderEdits | None:
        if policy is None or not (policy.set or policy.remove):
            return None
        add = tuple((n.lower().encode("ascii"), v.encode("ascii")) for n, v in policy.set.items())
        drop = frozenset(n.lower().encode("ascii") for n in policy.remove) | {n for n, _ in add}
        return cls(drop, add)

    def apply(self, headers: RawHeaders) -> RawHeaders:
        """``headers`` (lowercase names, as the proxy's own) edited."""
        drop = self.drop
        return [field for field in headers if field[0] not in drop] + list(self.add)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    # httpx's timeout extension for this route's requests (the upstream's with the route's
    # replacements); None: the upstream's own.
    timeouts: Timeouts | None
    total: float | None  # seconds for the whole exchange; None: unbounded
    request_headers: HeaderEdits | None
    response_headers: HeaderEdits | None

    @classmethod
    def of(cls, route: RouteConfig, upstream: UpstreamConfig) -> RoutePolicy | None:
        """The route's compiled policy, or None when it has none."""
        given = route.timeouts
        timeouts: Timeouts | None = None
        if given is not None and given.overrides():
            timeouts = {**upstream.timeouts.model_dump(), **given.overrides()}
        policy = cls(
            timeouts=timeouts,
            total=given.total if given is not None else None,
            request_headers=HeaderEdits.of(route.request_headers),
            response_headers=HeaderEdits.of(route.response_headers),
        )
        if policy == _NONE:
            return None
        return policy


_NONE = RoutePolicy(None, None, None, None)


class RoutePolicies:
    """Every route's policy, by route: the route objects the router hands out are the ones
    of the settings, which live as long as the proxy, so their identity is the key (a
    frozen pydantic model hashes all of its fields)."""

    def __init__(self, routes: Sequence[RouteConfig], upstreams: Mapping[str, UpstreamConfig]):
        found = {id(r): RoutePolicy.of(r, upstreams[r.upstream]) for r in routes}
        self._by_route = {key: policy for key, policy in found.items() if policy is not None}

    def get(self, route: RouteConfig) -> RoutePolicy | None:
        return self._by_route.get(id(route)) if self._by_route else None
