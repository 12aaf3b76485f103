"""Connection recycling: a connection that has lived ``pool.max_connection_age_seconds`` or
carried ``pool.max_requests_per_connection`` requests is closed when it comes back from its
last request, instead of going back to the pool idle. Never mid-request.

Why: a keep-alive pool on a Kubernetes Service address keeps the pods kube-proxy picked when
its connections opened; pods added later get no traffic from it until connections break.
Recycled connections reconnect, and each reconnection is balanced again (README,
*Endpoints*). Counted in ``relay_upstream_connections_recycled_total{upstream, reason}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config_upstreams import PoolConfig

AGE = "age"
REQUESTS = "requests"


@dataclass(frozen=True)
class Recycling:
    max_age: float | None
    max_requests: int | None
    recycled: Callable[[str], None]  # told the reason of each connection closed

    @classmethod
    def of(cls, pool: PoolConfig, recycled: Callable[[str], None]) -> Recycling | None:
        if pool.max_connection_age_seconds is None and pool.max_requests_per_connection is None:
            return None
        return cls(pool.max_connection_age_seconds, pool.max_requests_per_connection, recycled)

    def due(self, born: float, served: int) -> str | None:
        """Why a connection opened at ``born`` (monotonic) that carried ``served`` requests
        must close now, or None."""
        if self.max_requests is not None and served >= self.max_requests:
            return REQUESTS
        if self.max_age is not None and time.monotonic() - born >= self.max_age:
            return AGE
        return None
