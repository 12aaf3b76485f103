"""An ``httpx`` transport backed by an aiohttp connection pool.

Why not the stock httpcore pool or ``httpx-aiohttp`` (measured in ``bench/transports.py``,
figures in the README): httpcore's pool is several times slower under concurrency
(encode/httpx#3215), and httpx-aiohttp 0.2 maps a reset connection to ``ConnectTimeout``,
re-quotes request paths, lets aiohttp add its own default headers and cannot tell a pool
timeout from a connect timeout. This module keeps the user-facing ``httpx.AsyncClient`` and
puts aiohttp's pool behind it with exact error mapping and byte-exact requests.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.http_exceptions import ContentLengthError, HttpProcessingError
from aiohttp.tracing import Trace
from yarl import URL

from ..errors import StaleConnectionError
from .aiohttp_compat import HookedConnector, disable_silent_retry, payload_of
from .attempt import AttemptInfo, PoolTransport, attempt_of
from .recycling import Recycling
from .tls import TlsSource, as_source

# aiohttp adds these when absent; a proxy must send only what the client sent.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


# The attempt being sent by the current task, for the connector to mark as reused. A
# context variable rather than aiohttp's TraceConfig: its signals cost every request a few
# objects and awaits (about 3% of the CPU, profiled) to learn one bit.
_ATTEMPT: contextvars.ContextVar[AttemptInfo | None] = contextvars.ContextVar(
    "relay_attempt", default=None
)


def _map_error(exc: BaseException, *, got_headers: bool, reused: bool) -> httpx.TransportError:
    """Translate an aiohttp failure to the httpx exception httpcore would have raised."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        if not got_headers and reused:
            return StaleConnectionError(message)
        return httpx.ReadError(message)
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = exc.__cause__
        # A body cut short (fewer bytes than Content-Length) is the upstream hanging up;
        # any other parser error in the body is an invalid response.
        if isinstance(cause, HttpProcessingError) and not isinstance(cause, ContentLengthError):
            return httpx.RemoteProtocolError(message)
        return httpx.ReadError(message)
    if isinstance(exc, aiohttp.ClientResponseError | HttpProcessingError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return httpx.ReadError(message)
    return httpx.TransportError(message)


class _WriteWatch:
    """A write timeout for request bodies, which aiohttp does not have.

    aiohttp's writer pulls each body chunk and writes it before pulling the next, so the
    time from handing a chunk over until the next pull is the time that write took. A
    timer armed at each hand-over cancels the waiting request if the upstream stops reading;
    the cancellation is then turned into ``httpx.WriteTimeout``. It is only live while the
    request waits for response headers, so it can never cancel anything else.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.live = True
        self.fired = False

    def arm(self) -> None:
        if self.live and self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._fire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stop(self) -> None:
        self.live = False
        self.disarm()

    def _fire(self) -> None:
        self._timer = None
        if self.live and self._task is not None:
            self.fired = True
            self._task.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: True when it was ours alone (raise WriteTimeout)."""
        if not self.fired or self._task is None:
            return False
        return self._task.uncancel() == 0


async def _watched(stream: httpx.AsyncByteStream, watch: _WriteWatch) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            watch.arm()
            yield chunk
            watch.disarm()
    finally:
        watch.disarm()


class _ResponseHandler(ResponseHandler):
    """aiohttp's connection protocol, plus: an error that ends the connection mid-body also
    ends that body.

    With aiohttp's C parser a malformed chunked body (bad chunk size or chunk terminator)
    is reported to the protocol only. The transport is closed and sock_read is dropped, but
    the response payload never gets the error or EOF, so its reader (and the pool slot)
    would wait forever.
    """

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        payload = payload_of(self)
        super().set_exception(exc, *args)
        # A read timeout is handed to the payload by aiohttp right after, as itself:
        # wrapped here it would read as the upstream cutting the body (reason reset).
        timeout = isinstance(exc, TimeoutError)
        if (
            payload is not None
            and not timeout
            and not payload.is_eof()
            and payload.exception() is None
        ):
            cause = args[0] if args and isinstance(args[0], BaseException) else exc
            error = aiohttp.ClientPayloadError(f"Response payload is not completed: {cause!r}")
            payload.set_exception(error, cause)

    # Set while the connection waits in the pool, where no byte may arrive: one request at a
    # time, never pipelined. aiohttp would parse such bytes (say, a body sent past its
    # Content-Length) and hand them to the next request as its response.
    pooled = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.born = time.monotonic()  # and requests served: for recycling.py
        self.served = 0

    def set_response_params(self, **kwargs: Any) -> None:
        self.pooled = False
        self.served += 1
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        if self.pooled and data:
            self.pooled = False
            self.force_close()
            if self.transport is not None:
                self.transport.close()  # the pool sees it closed and never hands it out
            return
        super().data_received(data)


class _Connector(HookedConnector):
    def __init__(self, *, max_idle: int | None, recycling: Recycling | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make_protocols_with(_ResponseHandler)
        self._max_idle = max_idle
        self._recycling = recycling

    def give_back(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        # aiohttp has no limit of its own on idle connections: this is where
        # max_keepalive_connections is kept (0 disables keep-alive).
        if self._max_idle is not None and not should_close:
            should_close = self.idle_count() >= self._max_idle
        if isinstance(protocol, _ResponseHandler):
            recycling = self._recycling
            if recycling is not None and not should_close:
                reason = recycling.due(protocol.born, protocol.served)
                if reason is not None:
                    should_close = True
                    recycling.recycled(reason)
            protocol.pooled = not should_close
        super().give_back(key, protocol, should_close=should_close)

    async def take_idle(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        info = _ATTEMPT.get()
        if info is not None and info.fresh:
            return None  # aiohttp then opens a new connection
        connection = await super().take_idle(key, traces)
        while connection is not None and self._expired(connection):
            connection.close()  # aged while idle: closed rather than reused
            connection = await super().take_idle(key, traces)
        if connection is not None and info is not None:
            info.reused = True
        return connection

    def _expired(self, connection: Connection) -> bool:
        recycling, protocol = self._recycling, connection.protocol
        if recycling is None or not isinstance(protocol, _ResponseHandler):
            return False
        reason = recycling.due(protocol.born, protocol.served)
        if reason is not None:
            recycling.recycled(reason)
        return reason is not None


class _ClientRequest(aiohttp.ClientRequest):
    def update_expect_continue(self, expect: bool = False) -> None:
        # Forward "Expect: 100-continue" as sent, but send the body without waiting for the
        # upstream's 100 (as httpcore does). aiohttp would wait for it with no timeout
        # running, forever if the upstream does not implement the expectation. The client's
        # own expectation is answered by the ASGI server when the body is first read.
        pass


class _ResponseStream(httpx.AsyncByteStream):
    """The response body as aiohttp reads it: each chunk as soon as it arrives.

    Its own iterator rather than an async generator: a generator per response costs its
    creation, the event loop's first-iteration hook and a weak reference set entry.
    """

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.content.readany()
        except (TimeoutError, aiohttp.ClientError, HttpProcessingError, OSError) as exc:
            raise _map_error(exc, got_headers=True, reused=False) from exc
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        # release() returns a fully read connection to the pool and closes a partly read
        # one, so an abandoned body can never be handed to the next request.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class SharedResolver:
    """One DNS resolver for the pools of many upstreams.

    aiohttp gives each connector a resolver of its own, and registering one costs about
    50 µs: half a second of start-up with 10,000 upstreams, for nothing a request needs
    (each connector still keeps its own DNS cache). Made by the first ``get()``, in the
    loop that uses it (``UpstreamSet.open`` calls it at start: the resolver holds
    descriptors and a thread); closed by whoever made this, after the pools that share it.
    """

    def __init__(self) -> None:
        self._resolver: AbstractResolver | None = None

    def get(self) -> AbstractResolver:
        if self._resolver is None:
            self._resolver = aiohttp.DefaultResolver()
        return self._resolver

    async def close(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None


class AiohttpTransport(PoolTransport):
    cancel_safe = True  # aiohttp closes a connection cancelled mid-request, synchronously

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        tls: TlsSource | ssl.SSLContext,
        resolver: SharedResolver | None = None,
        recycling: Recycling | None = None,
    ) -> None:
        """``tls``: the source of upstream connections' context (upstreams/tls.py), read for
        each request; ``resolver``: a resolver shared with other pools, else the pool has
        one of its own; ``recycling``: when connections close instead of being pooled."""
        self._limits = limits
        self._recycling = recycling
        self._tls = as_source(tls)
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = _Connector(
            max_idle=self._limits.max_keepalive_connections,
            recycling=self._recycling,
            limit=self._limits.max_connections or 0,
            limit_per_host=0,
            keepalive_timeout=self._limits.keepalive_expiry,
            ssl=self._tls.context,
            resolver=self._resolver.get() if self._resolver is not None else None,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
            request_class=_ClientRequest,
        )
        # aiohttp would silently retry any failed idempotent request once, including on a
        # fresh connection and uncounted; the proxy's own policy retries only the stale
        # keep-alive race, and counts it.
        disable_silent_retry(session)
        return session

    async def __aenter__(self) -> AiohttpTransport:
        # The session (connector, pool) opens on the first request, in the loop that serves
        # it: about 40 µs then, instead of 0.4 s of every start with 10,000 upstreams.
        return self

    def idle_connections(self) -> int:
        if self._session is None:
            return 0
        connector = self._session.connector
        assert isinstance(connector, _Connector)
        return connector.idle_count()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._open()
        info = attempt_of(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        connect = timeouts.get("connect")
        timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=timeouts.get("read")
        )
        headers = [(k, v) for k, v in request.headers.multi_items() if k != "transfer-encoding"]
        data: Any = None
        watch: _WriteWatch | None = None
        if not isinstance(request.stream, httpx.ByteStream):
            assert isinstance(request.stream, httpx.AsyncByteStream)
            write_timeout = timeouts.get("write")
            if write_timeout is not None:
                watch = _WriteWatch(write_timeout)
                data = _watched(request.stream, watch)
            else:
                data = request.stream
        else:
            data = b"".join(request.stream) or None  # a ByteStream: the bytes, if any
        token = _ATTEMPT.set(info)
        try:
            response = await self._session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
                timeout=timeout,
                # Per request, as the context may be swapped (rotated files): a new context
                # makes a new pool key, so idle connections made with the old one are not
                # reused and expire.
                ssl=self._tls.context,
                server_hostname=request.extensions.get("sni_hostname"),
            )
        except asyncio.CancelledError:
            if watch is not None and watch.absorb():
                raise httpx.WriteTimeout("upstream stopped reading the request body") from None
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            body_error = exc.__cause__
            if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(
                body_error, aiohttp.ClientError | OSError | None
            ):
                # The request body's own exception (e.g. its client went away), which aiohttp
                # wraps as a connection error: it propagates as is, as with httpcore.
                raise body_error from None
            raise _map_error(exc, got_headers=False, reused=info.reused) from exc
        finally:
            _ATTEMPT.reset(token)
            if watch is not None:
                watch.stop()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
