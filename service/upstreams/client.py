"""The one ``httpx.AsyncClient`` of each upstream, set up for a proxy.

Every proxied request goes through ``UpstreamClient.send(request, stream=True)``. What
``send`` does on top of the transport chain is the client's to decide, and for a proxy most
of it is off: no redirects, no cookie persistence, no auth flow, no default headers, no
event hooks. Two of those still cost work per request with httpx's defaults, removed here
through httpx's own extension points (figures in the README, *Performance*):

* cookies: ``send`` hands every response to ``client.cookies.extract_cookies``, and with
  any cookie jar httpx first wraps the request and response in urllib compatibility
  objects (a URL string, a dict of the headers, a ``urllib.request.Request``): over half of
  what ``send`` cost on top of the transport. The client's cookie store does nothing.
* auth: with no auth set, httpx builds an ``Auth()`` per request, looks for credentials in
  the URL, and runs its flow as an async generator. The client's auth is one whose flow
  hands the request over as it is.

tests/test_client.py checks httpx still goes through both, so an httpx release that
changes its send path fails loudly rather than silently costing more.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, NoReturn

import httpx


class _NoCookies(httpx.Cookies):
    """A cookie store that never keeps or sends anything.

    Set-Cookie from one client's response must never be replayed to another client; the
    cookies a client sends travel as its own Cookie header.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass


class _AsIs(AsyncGenerator[httpx.Request, httpx.Response]):
    """An auth flow of one step: the request, unchanged; any response ends it."""

    __slots__ = ("_request",)

    def __init__(self, request: httpx.Request) -> None:
        self._request = request

    async def __anext__(self) -> httpx.Request:
        return self._request

    async def asend(self, response: httpx.Response) -> NoReturn:
        raise StopAsyncIteration

    async def athrow(self, *args: Any) -> NoReturn:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        pass


class SendAsIs(httpx.Auth):
    """No authentication of the proxy's own: the client's credentials travel in its own
    headers, and credentials in an upstream URL are not used."""

    def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        return _AsIs(request)


class UpstreamClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` with the cookie store and auth of a proxy (see above)."""

    _no_cookies = _NoCookies()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("auth", SendAsIs())
        kwargs.setdefault("follow_redirects", False)
        kwargs.setdefault("trust_env", False)
        super().__init__(**kwargs)
        # httpx's defaults (User-Agent, Accept, Accept-Encoding, Connection) would be
        # merged into requests built with build_request.
        self.headers.clear()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        # httpx's __init__ assigns the cookies it was given; there are none to keep.
        pass
