"""aiohttp's private names, used nowhere else (checked at import: see ``service/compat.py``).

aiohttp has no public API for what the transport needs (aiohttp_pool.py says why each):

* ``TCPConnector._get`` / ``_release``: take an idle connection and give one back, where
  the stale keep-alive retry asks for a fresh connection, reuse is detected and
  ``max_keepalive_connections`` is kept. ``_conns`` (idle connections per key) counts them;
  ``_factory`` makes each connection's protocol; ``_loop`` is the connector's loop.
* ``ClientSession._retry_connection``: aiohttp's silent retry of idempotent requests, off.
* ``ResponseHandler._payload``: the body being read, ended when the connection fails.

``HookedConnector`` gives the two pool hooks names of Relay's own; the functions below read
or set the rest.
"""

from __future__ import annotations

import functools
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.streams import StreamReader
from aiohttp.tracing import Trace

from ..compat import incompatible, require

# Read from the class (methods) or its ATTRS (the session's settable attributes).
CLASS_NAMES: dict[object, tuple[str, ...]] = {aiohttp.TCPConnector: ("_get", "_release")}
# Set in __init__: tests/test_compat.py checks them on real instances.
INSTANCE_NAMES: dict[type, tuple[str, ...]] = {
    aiohttp.TCPConnector: ("_conns", "_factory", "_loop"),
    aiohttp.ClientSession: ("_retry_connection",),
    ResponseHandler: ("_payload",),
}

require("aiohttp", CLASS_NAMES)
# Setting an attribute the session does not know only warns: the silent retry would stay on.
if "_retry_connection" not in aiohttp.ClientSession.ATTRS:
    raise incompatible("aiohttp", "ClientSession._retry_connection")


class HookedConnector(aiohttp.TCPConnector):
    """aiohttp's connector with its pool hooks under names of Relay's own: override
    ``take_idle`` and ``give_back``, and call the base class's for aiohttp's own."""

    take_idle = aiohttp.TCPConnector._get  # (key, traces) -> an idle Connection or None
    give_back = aiohttp.TCPConnector._release  # (key, protocol, *, should_close)

    def _get(self, key: ConnectionKey, traces: list[Trace]) -> Any:
        return self.take_idle(key, traces)  # the coroutine itself: no frame of its own

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        self.give_back(key, protocol, should_close=should_close)

    def idle_count(self) -> int:
        return sum(len(connections) for connections in self._conns.values())

    def make_protocols_with(self, protocol: type[ResponseHandler]) -> None:
        """Each new connection's protocol is an instance of ``protocol``."""
        self._factory = functools.partial(protocol, loop=self._loop)


def disable_silent_retry(session: aiohttp.ClientSession) -> None:
    session._retry_connection = False


def payload_of(protocol: ResponseHandler) -> StreamReader | None:
    """The response body the connection is reading, if any."""
    return protocol._payload
