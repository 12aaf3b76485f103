"""What the gated transport and the pools behind it share: the retry policy's vocabulary
(what one attempt at sending a request learned, was its connection reused, and asked for, a
fresh connection) and the interface of a pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import httpx

ATTEMPT_EXTENSION = "relay.attempt"


class AttemptInfo:
    """Per-attempt facts a transport reports back to the retry policy."""

    __slots__ = ("fresh", "resends", "retry_connect", "reused")

    def __init__(self) -> None:
        self.reused = False
        # Whether the pool gate may send it once more after a refused connect (off when the
        # route's retry policy handles connect failures itself).
        self.retry_connect = True
        # How many times this request was sent before (http.request.resend_count).
        self.resends = 0
        # Set for the stale keep-alive retry: any other pooled connection may be just as
        # stale (an upstream that drops its idle connections drops them all), so the retry
        # must go out on a new one.
        self.fresh = False


def resends_of(extensions: Mapping[str, Any] | None) -> int:
    """How many times the request of these extensions was sent before this attempt (0 for
    a first attempt): its span's ``http.request.resend_count``."""
    info = extensions.get(ATTEMPT_EXTENSION) if extensions else None
    return info.resends if isinstance(info, AttemptInfo) else 0


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
    # (gated.py explains why httpcore needs that).
    cancel_safe: ClassVar[bool]

    def idle_connections(self) -> int:
        raise NotImplementedError


class WrappedStream(httpx.AsyncByteStream):
    """A response body passed through as it is, with steps of its own around its close.

    ``_before_close`` runs first; the inner stream is closed even if it raised, and
    ``_after_close`` runs however the close ended.
    """

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._inner.__aiter__()

    async def aclose(self) -> None:
        try:
            try:
                self._before_close()
            finally:
                await self._close_inner()
        finally:
            await self._after_close()

    def _before_close(self) -> None:
        pass

    async def _close_inner(self) -> None:
        await self._inner.aclose()

    async def _after_close(self) -> None:
        pass
