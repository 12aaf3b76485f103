"""How a log line looks: JSON (one object per line) or text (readable, the same fields).

Both print the time as RFC 3339 in UTC with milliseconds (``2026-12-03T06:37:37.134Z``),
which log pipelines parse without configuration, and present uvicorn's ``uvicorn.error``
logger (which carries its start-up and shutdown lines too) as ``uvicorn``: its real errors
keep their ERROR level, so a search for errors finds those and only those.

Access records carry their fields under ``ACCESS_FIELDS``; both formatters take a fast path
for them, as they are written once per request.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# The access fields once more, under a private name (skipped as an extra): the formatters'
# fast path for the one record every request writes.
ACCESS_FIELDS = "_relay_access"

LOGGER_NAMES = {"uvicorn.error": "uvicorn"}

# Record attributes that are not extras (as python-json-logger decides it for JSON lines).
_NOT_EXTRAS = frozenset({*RESERVED_ATTRS, "taskName", "color_message"})
# A text value that would be ambiguous bare (spaces, quotes, '=', control or non-ASCII
# characters) is written as a JSON string, so one record stays one line.
_NEEDS_QUOTES = re.compile(r'[\s"\\=]|[^\x21-\x7e]')


class _UtcMilliseconds:
    """``formatTime`` as RFC 3339 UTC with milliseconds; the seconds part cached."""

    _second = -1
    _prefix = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int(record.msecs):03d}Z"


class JsonLines(_UtcMilliseconds, JsonFormatter):
    """python-json-logger's lines, with a fast path for access records.

    The generic path inspects every attribute of every record to find the extras, which
    made formatting the larger part of an access line's cost; an access record says which
    fields it carries. Same keys, same order, same encoder.
    """

    def __init__(self) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = record.__dict__.get(ACCESS_FIELDS)
        if fields is None or record.exc_info or record.stack_info:
            return super().format(record)
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields,
        }
        for name in ("trace_id", "span_id"):
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        return self.serialize_log_record(line)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["logger"] = LOGGER_NAMES.get(record.name, record.name)


class TextLines(_UtcMilliseconds, logging.Formatter):
    """``TIME LEVEL LOGGER message key=value ...``; an access line reads
    ``GET /path 200 12.3ms route=api upstream=api outcome=ok ...`` with every field the JSON
    line has (those without a value left out)."""

    def format(self, record: logging.LogRecord) -> str:
        head = (
            f"{self.formatTime(record)} {record.levelname} "
            f"{LOGGER_NAMES.get(record.name, record.name)}"
        )
        fields: dict[str, Any] | None = record.__dict__.get(ACCESS_FIELDS)
        if fields is not None:
            text = f"{head} {access_text(fields)}{_pairs(_trace_ids(record))}"
        else:
            extras = {
                key: value
                for key, value in record.__dict__.items()
                if key not in _NOT_EXTRAS and not key.startswith("_")
            }
            text = f"{head} {record.getMessage()}{_pairs(extras)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return text


def access_text(fields: dict[str, Any]) -> str:
    status = fields["status"]
    duration = fields["duration_ms"]
    rest = {
        key: f"{value:.1f}" if key == "headers_ms" and value is not None else value
        for key, value in fields.items()
        if key not in ("method", "path", "status", "duration_ms")
    }
    return (
        f"{fields['method']} {_value(fields['path'])} {status if status is not None else '-'} "
        f"{f'{duration:.1f}ms' if duration is not None else '-'}{_pairs(rest)}"
    )


def _trace_ids(record: logging.LogRecord) -> dict[str, Any]:
    return {name: record.__dict__.get(name) for name in ("trace_id", "span_id")}


def _pairs(fields: dict[str, Any]) -> str:
    return "".join(f" {key}={_value(value)}" for key, value in fields.items() if value is not None)


def _value(value: Any) -> str:
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text
