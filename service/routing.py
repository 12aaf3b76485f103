"""Route matching: optional Host, then the longest path prefix on a segment boundary."""

from __future__ import annotations

from collections.abc import Sequence

from .config import RouteConfig
from .exchange import bare_host
from .route_index import RouteIndex


class Router:
    """The route for each request; see ``route_index`` for the precedence rules."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._index = RouteIndex(routes)
        self._by_host = self._index.by_host

    def match(self, host: str | None, path: str) -> RouteConfig | None:
        # Reading the Host costs about as much as the lookup: only when a route needs it.
        return self._index.match(bare_host(host) if self._by_host else None, path)


_HEX = frozenset(b"0123456789abcdefABCDEF")
_SLASHES = frozenset(b"/\\")


def _encoded_length(raw: bytes, decoded: bytes) -> int | None:
    """How many bytes of the percent-encoded ``raw`` spell ``decoded``, if it starts so."""
    index = 0
    for expected in decoded:
        escape = raw[index : index + 3]
        if len(escape) == 3 and escape[0] == 0x25 and escape[1] in _HEX and escape[2] in _HEX:
            actual, step = int(escape[1:], 16), 3
            if actual in _SLASHES:
                return None  # an encoded slash is segment data, never a prefix's separator
        elif index < len(raw):
            actual, step = raw[index], 1
        else:
            return None
        if actual != expected:
            return None
        index += step
    return index


def rewrite_path(route: RouteConfig, raw_path: bytes) -> bytes:
    """The path sent upstream (still percent-encoded exactly as the client sent it)."""
    if not route.strip_prefix or route.prefix == "/":
        return raw_path
    stem = route.prefix.rstrip("/").encode()
    # Routes match the decoded path; the client may have percent-encoded some of the
    # prefix's characters (``/caf%C3%A9`` for ``/café``), so find where it ends in the raw one.
    cut = len(stem) if raw_path.startswith(stem) else _encoded_length(raw_path, stem)
    rest = raw_path[cut:] if cut is not None else raw_path
    return rest if rest.startswith(b"/") else b"/" + rest
