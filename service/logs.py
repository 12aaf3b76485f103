"""Logging: JSON lines (or plain text for local use), and one access line per exchange."""

from __future__ import annotations

import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from .config import LogConfig
from .exchange import Exchange
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


class _DropColorMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


def configure(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_DropColorMessage())
    handler.addFilter(TraceContextFilter())
    if config.format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
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
    install_abort_filter()
    access_log.disabled = not config.access_log


def install_abort_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DeliberateAbortFilter) for f in logger.filters):
        logger.addFilter(_DeliberateAbortFilter())


def access_fields(exchange: Exchange) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
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
    }


class AccessLogObserver:
    def started(self, exchange: Exchange) -> None:
        pass

    def headers(self, exchange: Exchange) -> None:
        pass

    def failing(self, exchange: Exchange) -> None:
        pass

    def finished(self, exchange: Exchange) -> None:
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("request", extra=access_fields(exchange))
