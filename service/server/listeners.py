"""The listening sockets, all bound before anything is announced or served.

Binding them up front, in one place, means a port that is taken stops the process before
any listener answers or any line claims it is running, with one line that names the
listener, its address, the config fields that set it and the cause; and several workers
share the very sockets a single one would use.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass

from ..config import Settings

log = logging.getLogger("relay.server")

# Exit code when the service cannot start: a listener cannot be bound, or the startup
# (opening the pools) failed. 2 is an invalid config.
EXIT_CANNOT_START = 3
ADMIN_BACKLOG = 128


@dataclass(frozen=True)
class Listeners:
    """Sockets bound once and served by every worker (None: the listener is off)."""

    proxy: socket.socket | None
    admin: socket.socket | None
    demo: socket.socket | None


class ListenerError(Exception):
    """A listener could not be bound; the message is the whole story, on one line."""


@dataclass(frozen=True)
class _Spec:
    name: str
    host: str
    port: int
    fields: str  # where the config sets the address
    backlog: int


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{address(host, port)}"


def bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    # Worker processes serve it too.
    sock.set_inheritable(True)
    return sock


def bind_listeners(settings: Settings) -> Listeners:
    """Bind the proxy, admin and (when on) demo listeners, or raise ``ListenerError``."""
    server, demo = settings.server, settings.demo
    admin_fields = "server.admin_host, server.admin_port"
    specs = [
        _Spec("proxy", server.host, server.port, "server.host, server.port", server.backlog),
        _Spec("admin", server.admin_host, server.admin_port, admin_fields, ADMIN_BACKLOG),
    ]
    if demo.enabled:
        specs.append(_Spec("demo", demo.host, demo.port, "demo.host, demo.port", ADMIN_BACKLOG))
    bound: dict[str, socket.socket] = {}
    try:
        for spec in specs:
            try:
                bound[spec.name] = bind(spec.host, spec.port, spec.backlog)
            except OSError as exc:
                cause = exc.strerror or str(exc)
                raise ListenerError(
                    f"{spec.name} listener: cannot listen on {address(spec.host, spec.port)} "
                    f"({spec.fields}): {cause}"
                ) from None
    except ListenerError:
        for sock in bound.values():
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return Listeners(bound["proxy"], bound["admin"], bound.get("demo"))


def announce(listeners: Listeners) -> None:
    if listeners.proxy is not None:
        log.info("proxy listener on %s", url_of(listeners.proxy))
    if listeners.admin is not None:
        log.info("admin listener on %s (/healthz, /readyz, /metrics)", url_of(listeners.admin))
    if listeners.demo is not None:
        log.info("demo listener on %s (the built-in demo upstream)", url_of(listeners.demo))
