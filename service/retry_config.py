"""A route's ``retry:`` block: when a failed attempt is sent again (README, *Retries*).

Its own module so that the route model in ``config.py`` only names it; the policy that
applies it is ``retries.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# What may trigger a retry: a closed set, each also a ``reason`` of
# relay_upstream_retries_total (statuses as ``status_502`` ...).
#   connect: the connection could not be opened (refused, DNS, connect timeout): nothing
#            reached the upstream.
#   reset: the connection closed or was reset before a response (the upstream may have
#          acted on the request: hence idempotent methods only, by default).
#   read_timeout: no response headers within the read timeout.
#   502/503/504: the upstream answered that status (its response is closed unread).
RetryOn = Literal["connect", "reset", "read_timeout", "502", "503", "504"]
STATUS_TRIGGERS: frozenset[str] = frozenset({"502", "503", "504"})
# The reason labels of the pool gate's own retries: the stale keep-alive one, and a refused
# connect tried once more (the label a route policy's connect retries have too).
STALE_CONNECTION = "stale_connection"
CONNECT_RETRY = "connect"

# RFC 9110 section 9.2.2: the methods whose repetition has the effect of one request.
IDEMPOTENT = ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
MethodName = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_-]{0,31}$")]


class RetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Attempts beyond the first; 0: off (the stale keep-alive retry stays on regardless).
    attempts: Annotated[int, Field(ge=0, le=10)] = 0
    on: tuple[RetryOn, ...] = ("connect", "reset")
    # Methods that may be sent again; POST and PATCH only if listed.
    methods: tuple[MethodName, ...] = IDEMPOTENT
    # Per upstream, over the last 10 s: retries at most this share of its requests...
    budget_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    # ...or this many, whichever is more (so that a quiet upstream can still retry).
    budget_min_retries: Annotated[int, Field(ge=0)] = 3
    # Before retry n: between half and all of backoff_seconds * 2**(n-1), at most 10x.
    backoff_seconds: Annotated[float, Field(ge=0, le=10)] = 0.025
    # A request body is buffered up to this size to be sent again; a larger one is streamed
    # as without retries, and its request is not retried.
    max_body_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] = 65536

    @model_validator(mode="before")
    @classmethod
    def _on_key(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads the key ``on`` as the boolean true.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if key is True else key): value for key, value in data.items()}
        return data

    @field_validator("on", mode="before")
    @classmethod
    def _statuses_as_text(cls, value: Any) -> Any:
        # YAML reads an unquoted 502 as a number.
        if isinstance(value, list | tuple):
            return tuple(str(v) if isinstance(v, int) else v for v in value)
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(v.upper() if isinstance(v, str) else v for v in value)
        return value

    @field_validator("on", "methods")
    @classmethod
    def _no_duplicates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen = [v for i, v in enumerate(value) if v in value[:i]]
        if seen:
            raise ValueError(f"{seen[0]!r} listed twice")
        return value

    @model_validator(mode="after")
    def _can_apply(self) -> RetryConfig:
        if self.attempts:
            for name in ("on", "methods"):
                if not getattr(self, name):
                    raise ValueError(f"{name}: empty, so attempts never apply")
        return self

    @field_validator("methods")
    @classmethod
    def _not_connect(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "CONNECT" in value:
            raise ValueError("CONNECT is never proxied, so never retried")
        return value
