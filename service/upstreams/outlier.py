"""Passive outlier ejection: an endpoint that fails ``consecutive_failures`` times in a row
(connect failures, resets, 502/503/504 answers) gets no new requests for a while.

Each repeat ejection lasts twice as long as the one before, up to ``max_ejection_seconds``;
an endpoint that then serves without an ejection for that long starts again from the base.
Never more than ``max_ejection_percent`` of the endpoints are ejected at once, so a failure
of the upstream as a whole (every pod answering 503) does not empty the set: the requests
keep going and fail as the upstream does, as in Envoy.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..config_endpoints import OutlierConfig
from .endpoints import Endpoint, EndpointObserver, EndpointSet

log = logging.getLogger("relay.upstreams")

# An endpoint's answers that count as its failures (STATUS).
FAILING_STATUSES = frozenset({502, 503, 504})


class OutlierDetector:
    def __init__(
        self, config: OutlierConfig, endpoints: EndpointSet, observer: EndpointObserver
    ) -> None:
        self._config = config
        self._endpoints = endpoints
        self._observer = observer

    def success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0
        if endpoint.ejections and time.monotonic() >= endpoint.forgiven_at:
            endpoint.ejections = 0

    def failure(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.consecutive_failures += 1
        if endpoint.ejected or endpoint.draining:
            return
        if endpoint.consecutive_failures < self._config.consecutive_failures:
            return
        endpoints = self._endpoints
        ejected = sum(1 for e in endpoints if e.ejected and not e.draining)
        if (ejected + 1) * 100 > self._config.max_ejection_percent * endpoints.active():
            return
        self._eject(endpoint, reason)

    def _eject(self, endpoint: Endpoint, reason: str) -> None:
        config = self._config
        seconds = min(
            config.base_ejection_seconds * 2**endpoint.ejections, config.max_ejection_seconds
        )
        endpoint.ejections += 1
        endpoint.ejected_until = time.time() + seconds
        endpoint.forgiven_at = time.monotonic() + seconds + config.max_ejection_seconds
        loop = asyncio.get_running_loop()
        endpoint.return_timer = loop.call_later(seconds, self._return, endpoint)
        self._endpoints.changed()
        self._observer.ejection(self._endpoints.upstream, reason)
        log.warning(
            "upstream %s: endpoint %s ejected for %gs after %d failures in a row (last: %s)",
            self._endpoints.upstream,
            endpoint.address,
            seconds,
            endpoint.consecutive_failures,
            reason,
        )

    def _return(self, endpoint: Endpoint) -> None:
        endpoint.ejected_until = None
        endpoint.return_timer = None
        endpoint.consecutive_failures = 0
        self._endpoints.changed()
        log.info(
            "upstream %s: endpoint %s back from ejection",
            self._endpoints.upstream,
            endpoint.address,
        )
