"""Active health checks: every ``interval_seconds`` a GET of ``health_check.path`` to each
endpoint, with url's Host and TLS server name, on the endpoint's own pool.

A 2xx within ``timeout_seconds`` passes; anything else fails. ``unhealthy_threshold``
failures in a row take an endpoint out of the eligible set, ``healthy_threshold`` passes in
a row bring it back. Endpoints start healthy, so a new one takes traffic at once, as in
Envoy's and Traefik's default.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import httpx

from ..config_endpoints import HealthCheckConfig
from .endpoints import Endpoint, EndpointObserver, EndpointSet

log = logging.getLogger("relay.upstreams")

USER_AGENT = b"relay-health-check"


class HealthChecker:
    def __init__(
        self,
        config: HealthCheckConfig,
        endpoints: EndpointSet,
        authority: bytes,
        sni: str | None,
        observer: EndpointObserver,
    ) -> None:
        assert config.path is not None
        self._config = config
        self._path = config.path
        self._endpoints = endpoints
        self._headers = [(b"host", authority), (b"user-agent", USER_AGENT)]
        timeout = config.timeout_seconds
        self._extensions: dict[str, object] = {
            "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        }
        if sni is not None:
            self._extensions["sni_hostname"] = sni
        self._observer = observer

    async def passes(self, endpoint: Endpoint) -> bool:
        """One check of ``endpoint``: True for a 2xx answered in time."""
        request = httpx.Request(
            "GET",
            endpoint.origin + self._path,
            headers=self._headers,
            stream=httpx.ByteStream(b""),
            extensions=dict(self._extensions),
        )
        try:
            # An anyio scope: httpcore's pool cleans up after its cancellation.
            with anyio.fail_after(self._config.timeout_seconds):
                response = await endpoint.pool.handle_async_request(request)
                try:
                    assert isinstance(response.stream, httpx.AsyncByteStream)
                    async for _ in response.stream:
                        pass
                finally:
                    await response.aclose()
        except Exception as exc:  # any failure to get an answer is a failed check
            log.debug("health check of %s failed: %r", endpoint.address, exc)
            return False
        return 200 <= response.status_code < 300

    async def check(self, endpoint: Endpoint) -> None:
        passed = await self.passes(endpoint)
        upstream = self._endpoints.upstream
        self._observer.health_check(upstream, "success" if passed else "failure")
        config = self._config
        if passed:
            endpoint.checks_passed += 1
            endpoint.checks_failed = 0
            if endpoint.unhealthy and endpoint.checks_passed >= config.healthy_threshold:
                endpoint.unhealthy = False
                self._endpoints.changed()
                log.info("upstream %s: endpoint %s is healthy again", upstream, endpoint.address)
        else:
            endpoint.checks_failed += 1
            endpoint.checks_passed = 0
            if not endpoint.unhealthy and endpoint.checks_failed >= config.unhealthy_threshold:
                endpoint.unhealthy = True
                self._endpoints.changed()
                log.warning(
                    "upstream %s: endpoint %s failed %d health checks in a row",
                    upstream,
                    endpoint.address,
                    endpoint.checks_failed,
                )

    async def run(self) -> None:
        """Check every endpoint (not draining) each interval, until cancelled."""
        while True:
            endpoints = [e for e in self._endpoints if not e.draining]
            await asyncio.gather(*(self.check(e) for e in endpoints))
            await asyncio.sleep(self._config.interval_seconds)
