"""httpx's own transport (httpcore's pool) for ``transport: httpcore``, with what the gate
and the retry policy need from it: whether a connection was reused, a fresh connection for
the stale keep-alive retry, and connections holding bytes past a response never pooled.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import httpx

from ..errors import StaleConnectionError
from .attempt import PoolTransport, WrappedStream, attempt_of
from .httpcore_compat import h11_state_of, pool_connections, set_pool_ssl_context
from .tls import TlsSource, as_source


class HttpcoreTransport(httpx.AsyncHTTPTransport, PoolTransport):
    """httpx's default transport, plus what the gate and retry policy need from it."""

    cancel_safe = False  # encode/httpcore#1093: see gated.py

    def __init__(self, *, tls: TlsSource | ssl.SSLContext, **kwargs: Any) -> None:
        """``tls``: the source of upstream connections' context (upstreams/tls.py)."""
        self._tls = as_source(tls)
        self._context = self._tls.context
        super().__init__(verify=self._context, **kwargs)

    def idle_connections(self) -> int:
        return sum(1 for c in pool_connections(self) if c.is_idle())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        info = attempt_of(request)
        context = self._tls.context
        if context is not self._context:
            # Rotated files: connections opened from now on use the new context; open
            # ones keep theirs.
            set_pool_ssl_context(self, context)
            self._context = context
        if info.fresh:
            return await self._on_new_connection(request)
        info.reused = True

        async def trace(event: str, _: Mapping[str, object]) -> None:
            if event.startswith("connection.connect_tcp."):
                info.reused = False

        request.extensions["trace"] = trace
        try:
            response = await super().handle_async_request(request)
        except httpx.RemoteProtocolError as exc:
            if info.reused and "without sending a response" in str(exc):
                raise StaleConnectionError(str(exc)) from exc
            raise
        except (httpx.ReadError, httpx.WriteError) as exc:
            # The same race when the upstream's close arrives as a reset (it had unread
            # data: our request), as the aiohttp transport maps it.
            if info.reused:
                raise StaleConnectionError(str(exc)) from exc
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _NoBytesPastTheEnd(response.stream)
        return response

    async def _on_new_connection(self, request: httpx.Request) -> httpx.Response:
        """Send on a connection of its own, outside the pool, closed with the response.

        httpcore's pool hands out an idle connection whenever it has one; this one counts
        against the gate slot the request holds, like any other.
        """
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
        transport = httpx.AsyncHTTPTransport(
            verify=self._tls.context, trust_env=False, limits=limits
        )
        try:
            response = await transport.handle_async_request(request)
        except BaseException:
            await transport.aclose()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ClosingTransport(response.stream, transport)
        return response


class _ClosingTransport(WrappedStream):
    def __init__(self, inner: httpx.AsyncByteStream, transport: httpx.AsyncHTTPTransport) -> None:
        super().__init__(inner)
        self._transport = transport

    async def _after_close(self) -> None:
        await self._transport.aclose()


class _NoBytesPastTheEnd(WrappedStream):
    """Closes the connection, instead of pooling it, when the upstream sent bytes past the
    end of the response (say, a body longer than its Content-Length).

    httpcore pools the connection with those bytes still in its parser's buffer and reads
    them as the next request's response. Requests are never pipelined, so any such byte is
    a protocol error.
    """

    def _before_close(self) -> None:
        parser = h11_state_of(self._inner)
        if parser.trailing_data[0]:
            # Our side no longer DONE: httpcore closes the connection on release.
            parser.send_failed()
