"""The record of one WebSocket session, kept on its exchange (``Exchange.websocket``) and
read by metrics, the access log and the server span."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum


class SessionResult(StrEnum):
    """How a session (or its attempt) ended: a closed set, a metric label."""

    CLIENT_CLOSED = "client_closed"  # the client closed, or vanished
    UPSTREAM_CLOSED = "upstream_closed"  # the upstream closed, or vanished
    IDLE = "idle"  # websocket.idle_timeout_seconds without a message either way
    TOO_LARGE = "too_large"  # a message over websocket.max_message_bytes
    DRAIN = "drain"  # still open when the drain's grace period ended
    UPSTREAM_REFUSED = "upstream_refused"  # the upstream answered its handshake without 101
    ERROR = "error"  # the upstream could not be reached, or the proxy failed


class Direction(StrEnum):
    TO_UPSTREAM = "to_upstream"
    TO_CLIENT = "to_client"


class Closer(StrEnum):
    """Who ended an open session."""

    CLIENT = "client"
    UPSTREAM = "upstream"
    PROXY = "proxy"


@dataclass
class Session:
    opened_at: float | None = None  # perf_counter when the client got the 101
    closed_at: float | None = None
    result: SessionResult | None = None
    close_code: int | None = None  # the code that ended it (1006: a side vanished)
    close_reason: str = ""
    closed_by: Closer | None = None
    messages_to_upstream: int = 0
    messages_to_client: int = 0
    bytes_to_upstream: int = 0
    bytes_to_client: int = 0

    @property
    def opened(self) -> bool:
        return self.opened_at is not None

    def open(self) -> None:
        self.opened_at = time.perf_counter()

    def end(self, result: SessionResult, closed_by: Closer | None, code: int | None) -> None:
        """The first end found is the session's (later ones are its consequences)."""
        if self.result is not None:
            return
        self.result, self.closed_by, self.close_code = result, closed_by, code
        self.closed_at = time.perf_counter()

    @property
    def seconds(self) -> float | None:
        if self.opened_at is None or self.closed_at is None:
            return None
        return self.closed_at - self.opened_at
