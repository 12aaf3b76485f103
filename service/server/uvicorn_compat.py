"""uvicorn's private names, used nowhere else (checked at import: see ``service/compat.py``).

The protocol and server are uvicorn's own classes, extended where uvicorn has no public
hook:

* ``HttpToolsProtocol._start_asgi_task``: the guard defers starting a request's task until
  the whole read parsed cleanly; ``_unset_keepalive_if_required``, ``_should_upgrade`` and
  ``_unsupported_upgrade_warning`` are the steps of uvicorn's ``data_received`` the guard's
  own repeats.
* ``cycle``, ``pipeline``, ``flow`` (set per connection): the request being answered, the
  requests waiting their turn, and the read pausing; the cycle's ``disconnected``,
  ``message_event``, ``keep_alive``, ``transport``, ``response_started`` and
  ``response_complete``. Not underscored, but not documented either: read directly, and
  asserted on real instances by tests/test_compat.py.
* ``flow_control.service_unavailable``: the app uvicorn answers with over
  ``limit_concurrency``, replaced by the proxy's own answer.
* ``WebSocketsSansIOProtocol`` (the websocket protocol uvicorn picks with ``websockets``
  installed, named here so that the choice does not depend on what else is installed): its
  ``shutdown`` closes every session at once with 1012; the drain-safe subclass reads
  ``close_sent``, ``initial_response`` and ``handshake_initiated`` to tell a session from
  a connection that is done.
* ``Server.capture_signals``: uvicorn installs its own signal handlers there; the drain
  (serve.py) replaces ``Server.shutdown`` and reads ``servers``, ``lifespan``, ``started``
  and the ``server_state``'s ``connections`` and ``tasks``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http import flow_control
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from ..compat import require

CLASS_NAMES: dict[object, tuple[str, ...]] = {
    HttpToolsProtocol: (
        "_start_asgi_task",
        "_unset_keepalive_if_required",
        "_should_upgrade",
        "_unsupported_upgrade_warning",
        "handle_websocket_upgrade",
        "on_response_complete",
    ),
    uvicorn.Server: ("capture_signals",),
    flow_control: ("service_unavailable",),
    WebSocketsSansIOProtocol: ("shutdown", "send", "receive"),
}
# Set in __init__: tests/test_compat.py checks them on real instances.
INSTANCE_NAMES: dict[type, tuple[str, ...]] = {
    uvicorn.Server: ("servers", "lifespan", "started", "server_state"),
    ServerState: ("connections", "tasks"),
    HttpToolsProtocol: ("cycle", "pipeline", "flow", "parser", "headers", "scope", "url"),
    RequestResponseCycle: (
        "scope",
        "transport",
        "disconnected",
        "message_event",
        "keep_alive",
        "response_started",
        "response_complete",
    ),
    WebSocketsSansIOProtocol: ("close_sent", "initial_response", "handshake_initiated"),
}

require("uvicorn", CLASS_NAMES)

service_unavailable = flow_control.service_unavailable


class UvicornProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with its private steps under names of Relay's own."""

    run_asgi_task = HttpToolsProtocol._start_asgi_task  # start it now: uvicorn's own
    unset_keepalive_if_required = HttpToolsProtocol._unset_keepalive_if_required
    should_upgrade = HttpToolsProtocol._should_upgrade
    unsupported_upgrade_warning = HttpToolsProtocol._unsupported_upgrade_warning

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self.start_asgi_task(cycle, app)

    def start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """A request was parsed: start its task (override to defer it)."""
        self.run_asgi_task(cycle, app)


class DrainSafeWebSocket(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol, with a session kept open when the listener closes.

    uvicorn closes every session at once with 1012 then. A session (or its handshake under
    way) is an exchange in flight like any other: it gets the drain's grace period, after
    which the drain cancels its task and the proxy closes both sides with 1001."""

    def shutdown(self) -> None:
        if self.close_sent or self.initial_response is not None or not self.handshake_initiated:
            super().shutdown()


class UvicornServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the service installs its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
