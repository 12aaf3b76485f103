"""The proxy listener's protocol: uvicorn's httptools protocol, one class built in one place.

Its parts, each a mixin of ``RelayProtocol``: the drain-safe close of fresh connections
(below), coalesced response writes (coalesce.py), and the parse-time guard with its limits,
hostile-input checks and the proxy's own answer to requests over
``server.limit_concurrency`` (guard.py), and the time limits on connections between
requests (head_timeout.py).
"""

from __future__ import annotations

from typing import Any

from ..app import Relay
from ..config import Settings
from ..request_ids import RequestIds
from .coalesce import CoalescedWrites
from .guard import stall_budget_for
from .head_timeout import HeadTimeout
from .uvicorn_compat import UvicornProtocol

# How long a connection accepted just before the listener closed may take to send its
# request head once the drain has begun.
FRESH_CONNECTION_GRACE_SECONDS = 1.0


class DrainSafe(UvicornProtocol):
    """When the listener closes, uvicorn closes every connection with no request under way.

    A connection accepted just before has its request on the way, or already in the socket
    unread: closing it would reset a request the client sent to an open listener. So such a
    connection gets ``FRESH_CONNECTION_GRACE_SECONDS`` for its request head, and that one
    request is served, with ``Connection: close``.
    """

    _draining = False

    def shutdown(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self._draining = True
            self.loop.call_later(FRESH_CONNECTION_GRACE_SECONDS, self._close_if_no_request)
            return
        super().shutdown()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def _close_if_no_request(self) -> None:
        if self.cycle is None:
            self.transport.close()


class RelayProtocol(DrainSafe, CoalescedWrites, HeadTimeout):
    """One client connection of the proxy listener."""

    @classmethod
    def configured(cls, settings: Settings, relay: Relay) -> type[RelayProtocol]:
        """The class for ``uvicorn.Config(http=...)``: uvicorn makes one instance per
        connection and passes no arguments of ours, so the settings go on a subclass."""
        attributes: dict[str, Any] = {
            "limits": settings.limits,
            "server_name": settings.server.name,
            "observer": relay.observers,
            "overloaded": relay.proxy.overloaded,
            "stall_budget": stall_budget_for(settings.limits),
            "trusted": settings.server.trusted_proxies,
            "request_ids": RequestIds.of(settings.request_id),
            "head_timeout": settings.server.request_head_timeout_seconds,
        }
        return type(cls.__name__, (cls,), attributes)
