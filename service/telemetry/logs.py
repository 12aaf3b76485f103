"""Logging: JSON lines (or plain text for local use), and one access line per exchange."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any, TextIO

from ..config import LogConfig
from ..exchange import Exchange, ExchangeObserver
from .log_format import ACCESS_FIELDS, JsonLines, TextLines
from .tracing import TraceContextFilter

access_log = logging.getLogger("relay.access")


class _DeliberateAbortFilter(logging.Filter):
    """Drop uvicorn's error line for a response the proxy cut short on purpose.

    When an upstream fails after the response headers went out, the proxy returns without
    the final body message so the server drops the connection (the only honest signal left
    to the client). The proxy logs that exchange itself, with its reason.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines are written in batches: at most ``FLUSH_SECONDS`` after they were logged.

    One write (a system call) per access line cost a proxied request more than the rest of
    its logging. Like Envoy's access log flush interval, lines wait for a short timer on
    the event loop that logged them, or for ``FLUSH_BYTES``; a WARNING or worse, a line
    logged outside an event loop and the end of the process flush at once.
    """

    FLUSH_SECONDS = 0.1
    FLUSH_BYTES = 64 * 1024

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if record.levelno >= logging.WARNING or self._pending_bytes >= self.FLUSH_BYTES:
            self._write_pending()
            return
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write_pending()
                return
            self._timer = loop.call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        data = "".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        # Logging must never fail a request: on a broken stream the lines are lost, as a
        # full disk would lose them.
        with contextlib.suppress(Exception):
            if data:
                self.stream.write(data)
            super().flush()


class _DropColorMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def configure(config: LogConfig) -> None:
    # Documented logging optimisations: no caller lookup (a stack walk) and no thread or
    # process names on every record; none of them is in the output.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BufferedStreamHandler(sys.stdout)
    handler.addFilter(_DropColorMessage())
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonLines() if config.format == "json" else TextLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # The proxy writes its own access line with upstream, durations and outcome; httpx's
    # per-request INFO line would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
    install_uvicorn_filters()
    access_log.disabled = not config.access_log


class _SheddingSummary(logging.Filter):
    """One line per ``SECONDS`` for uvicorn's ``limit_concurrency`` refusals, with a count.

    uvicorn warns once per refused request: under the overload that makes it refuse, that
    is thousands of identical lines a second, written when the process can least afford it.
    """

    MESSAGE = "Exceeded concurrency limit."
    SECONDS = 10.0

    def __init__(self) -> None:
        super().__init__()
        self._window_end = 0.0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE:
            return True
        now = time.monotonic()
        if now < self._window_end:
            self._suppressed += 1
            return False
        if self._suppressed:
            record.msg = (
                f"{self.MESSAGE} ({self._suppressed} more refusals not logged in the "
                f"previous {self.SECONDS:g} s)"
            )
        self._window_end = now + self.SECONDS
        self._suppressed = 0
        return True


class _ServerLifecycle(logging.Filter):
    """Drop uvicorn's own start-up and shutdown lines.

    Each listener is a uvicorn server, so each of these came once per listener and per
    worker, none of them saying which listener it was about. The service logs its own:
    each listener with its name and address, the config, readiness and every step of the
    drain (``server.serve``).
    """

    MESSAGES = frozenset(
        {
            "Started server process [%d]",
            "Finished server process [%d]",
            "Waiting for application startup.",
            "Application startup complete.",
            "Waiting for application shutdown.",
            "Application shutdown complete.",
            "Shutting down",
            "Uvicorn running on %s://%s:%d (Press CTRL+C to quit)",
            "Uvicorn running on %s://[%s]:%d (Press CTRL+C to quit)",
            "Waiting for connections to close. (CTRL+C to force quit)",
            "Waiting for background tasks to complete. (CTRL+C to force quit)",
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.msg not in self.MESSAGES


class _WebSocketChatter(logging.Filter):
    """Drop uvicorn's (and its ``websockets`` protocol's) INFO lines for each WebSocket
    handshake and session: the access line says all of it, once per session, with the
    route, the request id and the close code."""

    MESSAGES = frozenset(
        {
            '%s - "WebSocket %s" [accepted]',
            '%s - "WebSocket %s" 403',
            '%s - "WebSocket %s" %d',
            "connection open",
            "connection closed",
            "connection rejected (%d %s)",
            "HTTP response sent (%d %s)",
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.msg not in self.MESSAGES


def install_uvicorn_filters() -> None:
    logger = logging.getLogger("uvicorn.error")
    for kind in (_DeliberateAbortFilter, _SheddingSummary, _ServerLifecycle, _WebSocketChatter):
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def access_fields(exchange: Exchange) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    fields = {
        "method": exchange.method,
        "path": exchange.path,
        "route": exchange.route,
        "upstream": exchange.upstream,
        "status": exchange.status,
        "outcome": exchange.outcome,
        "reason": exchange.reason.value if exchange.reason else None,
        "disconnect_side": exchange.disconnect_side,
        "disconnect_phase": exchange.disconnect_phase,
        "headers_ms": ms(exchange.headers_seconds),
        "duration_ms": ms(exchange.total_seconds),
        "request_bytes": exchange.request_bytes,
        "response_bytes": exchange.response_bytes,
        "upstream_status": exchange.upstream_status_if_changed,
        "retries": exchange.retries or None,
        "upstream_addr": exchange.upstream_addr,
        "request_id": exchange.request_id,
        "client_addr": exchange.client_addr,
        "peer_addr": exchange.peer_addr,
        "http_version": exchange.http_version,
        "user_agent": exchange.user_agent,
    }
    session = exchange.websocket
    if session is not None:
        # WebSocket lines only: one per session, at its end.
        fields.update(
            ws_result=session.result.value if session.result else None,
            ws_close_code=session.close_code,
            ws_closed_by=session.closed_by.value if session.closed_by else None,
            ws_session_ms=ms(session.seconds),
            ws_messages_to_upstream=session.messages_to_upstream,
            ws_messages_to_client=session.messages_to_client,
            ws_bytes_to_upstream=session.bytes_to_upstream,
            ws_bytes_to_client=session.bytes_to_client,
        )
    return fields


def is_success(exchange: Exchange) -> bool:
    """Sent in full, below 400, nobody hung up: the lines ``log.access_sample`` thins."""
    status = exchange.status
    return (
        status is not None
        and status < 400
        and exchange.outcome == "ok"
        and exchange.websocket is None  # every session keeps its line
    )


class AccessLogObserver(ExchangeObserver):
    """One access line per exchange; of the successful ones, 1 in ``sample`` (counted, so
    that a steady stream keeps exactly that share; every other line is kept)."""

    def __init__(self, sample: int = 1) -> None:
        self._sample = sample
        self._successes = 0

    def finished(self, exchange: Exchange) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        if self._sample > 1 and is_success(exchange):
            kept = self._successes % self._sample == 0
            self._successes += 1
            if not kept:
                return
        fields = access_fields(exchange)
        access_log.info("request", extra={**fields, ACCESS_FIELDS: fields})
