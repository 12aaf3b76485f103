"""DNS discovery: every A and AAAA record of url's host is an endpoint (a Kubernetes headless
Service answers with one record per ready pod).

dnspython's asyncio resolver asks the servers of resolv.conf (search domains and ndots as
the system's resolver applies them), or ``discovery.nameservers``: nothing blocks the event
loop and no thread is used. The name is resolved at start and then every
``refresh_seconds``. A new address becomes an endpoint at once; one that disappears drains
(no new requests; those in flight finish on its pool, which then closes). A failed
resolution, or one with no address, keeps the last good set: logged once per streak of
failures, and each counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from ..config_endpoints import DiscoveryConfig, split_nameserver
from .endpoints import EndpointObserver, EndpointSet

log = logging.getLogger("relay.upstreams")

RECORD_TYPES = ("A", "AAAA")
# One resolution may take this long at most (dnspython retries within it).
MAX_LIFETIME_SECONDS = 5.0


class DnsDiscovery:
    def __init__(
        self,
        host: str,
        port: int,
        config: DiscoveryConfig,
        endpoints: EndpointSet,
        observer: EndpointObserver,
    ) -> None:
        self._host = host
        self._port = port
        self._config = config
        self._endpoints = endpoints
        self._observer = observer
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._failing = False
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self._literal = False
        else:
            self._literal = True

    def _resolver_now(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            servers = self._config.nameservers
            # Reads resolv.conf (a small file, once) unless the servers are given.
            resolver = dns.asyncresolver.Resolver(configure=not servers)
            if servers:
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(*split_nameserver(s)) for s in servers
                ]
            resolver.lifetime = min(self._config.refresh_seconds, MAX_LIFETIME_SECONDS)
            self._resolver = resolver
        return self._resolver

    async def addresses(self) -> list[str]:
        """Every address of the name now; raises ``dns.exception.DNSException`` (or
        ``LookupError`` for a name with no address) when it cannot be resolved."""
        if self._literal:
            return [self._host]  # an address already: nothing to ask
        resolver = self._resolver_now()
        answers = await asyncio.gather(
            *(self._records(resolver, kind) for kind in RECORD_TYPES), return_exceptions=True
        )
        found: list[str] = []
        errors: list[BaseException] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                errors.append(answer)
            else:
                found.extend(answer)
        if errors and len(errors) == len(answers):
            raise errors[0]
        if not found:
            raise LookupError(f"{self._host} has no A or AAAA record")
        return found

    async def _records(self, resolver: dns.asyncresolver.Resolver, kind: str) -> list[str]:
        answer = await resolver.resolve(self._host, kind, search=True, raise_on_no_answer=False)
        return [record.to_text() for record in answer]

    async def refresh(self) -> None:
        """Resolve once and apply the result (or keep the last set)."""
        upstream = self._endpoints.upstream
        try:
            addresses = await self.addresses()
        except (dns.exception.DNSException, LookupError, OSError) as exc:
            self._observer.discovery_refresh(upstream, "failure")
            if not self._failing:
                self._failing = True
                log.warning(
                    "upstream %s: resolving %s failed, keeping the last %d endpoints: %s",
                    upstream,
                    self._host,
                    self._endpoints.active(),
                    exc,
                )
            return
        self._observer.discovery_refresh(upstream, "success")
        if self._failing:
            self._failing = False
            log.info("upstream %s: resolving %s works again", upstream, self._host)
        added, removed = self._endpoints.replace((a, self._port) for a in addresses)
        if added or removed:
            log.info(
                "upstream %s: %s resolves to %d endpoints (%d new, %d draining)",
                upstream,
                self._host,
                len(addresses),
                added,
                removed,
            )

    async def run(self) -> None:
        """Refresh every ``refresh_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(self._config.refresh_seconds)
            await self.refresh()
