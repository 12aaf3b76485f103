"""Canaries for ``service.upstreams.client``: httpx's send path still goes through the
client's cookie store and auth, so the work they skip stays skipped, and nothing of either is
sent."""

from __future__ import annotations

import httpx
import pytest

from service.upstreams.client import SendAsIs, UpstreamClient, _NoCookies


def upstream(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"set-cookie": "session=secret; Path=/"})


async def send_twice(client: UpstreamClient, url: str) -> list[httpx.Response]:
    responses = []
    for _ in range(2):
        response = await client.send(httpx.Request("GET", url), stream=True)
        await response.aclose()
        responses.append(response)
    return responses


async def test_cookie_store_is_the_one_httpx_consults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Response] = []
    monkeypatch.setattr(_NoCookies, "extract_cookies", lambda self, response: seen.append(response))
    async with UpstreamClient(transport=httpx.MockTransport(upstream)) as client:
        responses = await send_twice(client, "http://up.test/")
    assert seen == responses
    assert len(client.cookies) == 0
    assert "cookie" not in responses[1].request.headers


async def test_auth_flow_is_the_clients_and_sends_nothing_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flows: list[httpx.Request] = []
    original = SendAsIs.async_auth_flow

    def counted(self: SendAsIs, request: httpx.Request):  # type: ignore[no-untyped-def]
        flows.append(request)
        return original(self, request)

    monkeypatch.setattr(SendAsIs, "async_auth_flow", counted)
    async with UpstreamClient(transport=httpx.MockTransport(upstream)) as client:
        responses = await send_twice(client, "http://user:secret@up.test/")
    assert flows == [r.request for r in responses]
    assert all("authorization" not in r.request.headers for r in responses)


async def test_no_default_headers_redirects_or_env() -> None:
    seen: list[httpx.Request] = []

    def redirecting(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"location": "http://elsewhere.test/"})

    async with UpstreamClient(transport=httpx.MockTransport(redirecting)) as client:
        request = client.build_request("GET", "http://up.test/")
        response = await client.send(request, stream=True)
        await response.aclose()
    assert response.status_code == 302 and len(seen) == 1
    assert set(seen[0].headers) == {"host"}
    assert client.trust_env is False
