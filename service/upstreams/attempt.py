"""What the gated transport and the pools behind it share: the retry policy's vocabulary
(what one attempt at sending a request learned, was its connection reused, and asked for, a
fresh connection) and the interface of a pool."""

from __future__ import annotations

from typing import ClassVar

import httpx

ATTEMPT_EXTENSION = "relay.attempt"


class AttemptInfo:
    """Per-attempt facts a transport reports back to the retry policy."""

    __slots__ = ("fresh", "reused")

    def __init__(self) -> None:
        self.reused = False
        # Set for the stale keep-alive retry: any other pooled connection may be just as
        # stale (an upstream that drops its idle connections drops them all), so the retry
        # must go out on a new one.
        self.fresh = False


def attempt_of(request: httpx.Request) -> AttemptInfo:
    info = request.extensions.get(ATTEMPT_EXTENSION)
    if not isinstance(info, AttemptInfo):
        info = AttemptInfo()
        request.extensions[ATTEMPT_EXTENSION] = info
    return info


class PoolTransport(httpx.AsyncBaseTransport):
    """What the gated transport needs from the pool behind it."""

    # Whether a plain asyncio cancellation may reach the pool's request and close paths
    # without losing a connection. False makes the gate run them in tasks of their own
    # (pools.py explains why httpcore needs that).
    cancel_safe: ClassVar[bool]

    def idle_connections(self) -> int:
        raise NotImplementedError
