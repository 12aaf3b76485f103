"""Which route a Host and path select, in time independent of the number of routes.

The router asks per request; config validation asks at start whether a route can ever be
selected. Both read the rules from here, so they cannot drift apart:

- An exact Host beats a wildcard (``*.example.com``: one or more labels before
  ``.example.com``) beats no Host. A class is used only if one of its routes matches the path.
- Within a class, the longest prefix as written wins (trailing slashes counted); ties go to
  the earlier route in the config, whichever wildcards matched the host.
- ``/`` matches every path; any other prefix matches on segment boundaries: ``/api`` and
  ``/api/`` match ``/api`` and ``/api/x``, not ``/apix``.

A class holds one segment trie per host pattern; a trie node keeps the best-ranked route
ending there. A lookup costs one dict lookup per path segment, and per label of the Host
for the wildcards.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

NOWHERE = sys.maxsize  # the rank of "no route": every route ranks better


class Route(Protocol):
    @property
    def host(self) -> str | None: ...

    @property
    def prefix(self) -> str: ...


R = TypeVar("R", bound=Route)


def stem(prefix: str) -> str:
    """What a prefix matches by: ``/api/`` and ``/api`` match the same paths."""
    return prefix.rstrip("/")


def segments(prefix: str) -> list[str]:
    # A path matches iff these segments begin ``path.split("/")``, which is the same as
    # ``path == stem or path.startswith(stem + "/")``. "/" is the catch-all at the root.
    return [] if prefix == "/" else stem(prefix).split("/")


class _Node(Generic[R]):
    __slots__ = ("children", "rank", "route")

    def __init__(self) -> None:
        self.children: dict[str, _Node[R]] = {}
        self.rank = NOWHERE
        self.route: R | None = None

    def add(self, parts: Sequence[str], rank: int, route: R) -> None:
        node = self
        for part in parts:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node()
            node = child
        if rank < node.rank:
            node.rank, node.route = rank, route

    def best(self, parts: Sequence[str], rank: int, route: R | None) -> tuple[int, R | None]:
        """The best of (rank, route) and the routes on this trie matching the path ``parts``."""
        node = self
        if node.rank < rank:
            rank, route = node.rank, node.route
        for part in parts:
            child = node.children.get(part)
            if child is None:
                break
            node = child
            if node.rank < rank:
                rank, route = node.rank, node.route
        return rank, route


class RouteIndex(Generic[R]):
    def __init__(self, routes: Sequence[R]) -> None:
        self._exact: dict[str, _Node[R]] = {}
        self._wildcards: dict[str, _Node[R]] = {}  # keyed by the suffix: ".example.com"
        self._any: _Node[R] = _Node()
        self._longest_suffix = 0
        # Rank 0 is the best: the longest prefix, then the earliest (sorted() is stable).
        order = sorted(range(len(routes)), key=lambda index: -len(routes[index].prefix))
        self.ranks = [0] * len(routes)
        for rank, index in enumerate(order):
            self.ranks[index] = rank
            route = routes[index]
            self._trie(route.host).add(segments(route.prefix), rank, route)

    @property
    def by_host(self) -> bool:
        """Whether any route names a Host (else the request's Host need not be read)."""
        return bool(self._exact or self._wildcards)

    def _trie(self, host: str | None) -> _Node[R]:
        if host is None:
            return self._any
        host = host.lower()
        if host.startswith("*."):
            self._longest_suffix = max(self._longest_suffix, len(host) - 1)
            return self._wildcards.setdefault(host[1:], _Node())
        return self._exact.setdefault(host, _Node())

    def match(self, host: str | None, path: str) -> R | None:
        """The route for a request; ``host`` lowercased, without port, None if it has none."""
        parts = path.split("/")
        if host is not None:
            exact = self._exact.get(host)
            if exact is not None:
                route = exact.best(parts, NOWHERE, None)[1]
                if route is not None:
                    return route
            if self._wildcards:
                route = self._wildcard_best(host, parts, 1)[1]
                if route is not None:
                    return route
        return self._any.best(parts, NOWHERE, None)[1]

    def _wildcard_best(self, host: str, parts: Sequence[str], floor: int) -> tuple[int, R | None]:
        """The best (rank, route) among the wildcards whose suffix starts at a dot of ``host`` at
        ``floor`` or later (1 for a request: the host needs a label before the suffix)."""
        rank, route = NOWHERE, None
        # Only suffixes as long as a configured one can match, so a hostile Host of
        # thousands of labels costs no more than a real one.
        floor = max(floor, len(host) - self._longest_suffix)
        dot = host.rfind(".", floor)
        while dot != -1:
            trie = self._wildcards.get(host[dot:])
            if trie is not None:
                rank, route = trie.best(parts, rank, route)
            dot = host.rfind(".", floor, dot)
        return rank, route

    def best_rank_covering(self, route: Route) -> int:
        """The best rank among the routes (``route`` included) that match every request
        ``route`` matches and are in its Host class: it never matches unless that is its own."""
        parts = segments(route.prefix)
        host = route.host.lower() if route.host is not None else None
        if host is None:
            return self._any.best(parts, NOWHERE, None)[0]
        if host.startswith("*."):
            # Wildcards whose suffix ends this one's, itself included (from index 0).
            return self._wildcard_best(host[1:], parts, 0)[0]
        return self._exact[host].best(parts, NOWHERE, None)[0]


class Conflict(NamedTuple):
    """Route number ``route`` never matches: number ``other`` takes every request it would."""

    route: int
    other: int
    duplicate: bool  # same Host and prefix stem; else ``other`` shadows it


def find_conflict(routes: Sequence[Route]) -> Conflict | None:
    """A route that can never match, if any: duplicates first, then shadowed routes, each
    in config order. Each route costs a walk of its own segments (and labels), as a request."""
    index = RouteIndex(routes)
    seen: dict[tuple[str | None, str], int] = {}
    for position, route in enumerate(routes):
        key = (route.host.lower() if route.host is not None else None, stem(route.prefix))
        earlier = seen.setdefault(key, position)
        if earlier != position:
            loser, winner = sorted((earlier, position), key=lambda i: -index.ranks[i])
            return Conflict(loser, winner, duplicate=True)
    by_rank = sorted(range(len(routes)), key=lambda i: index.ranks[i])
    for position, route in enumerate(routes):
        best = index.best_rank_covering(route)
        if best != index.ranks[position]:
            return Conflict(position, by_rank[best], duplicate=False)
    return None
