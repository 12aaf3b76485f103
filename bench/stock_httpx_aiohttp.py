"""Relay with httpx-aiohttp's stock ``AiohttpTransport`` behind the pool gate (bench only).

Same command line as ``python -m service`` (``--config FILE``), single worker. It builds the
normal Relay app and wraps its lifespan: once the upstream pools are open, the inner
transport of every upstream's ``GatedTransport`` is replaced by the stock transport (and the
one it replaces is closed). Gate, retry policy, metrics and proxy code stay as shipped, so
the only difference from ``transport: aiohttp`` is the transport itself.

This reaches into ``GatedTransport`` internals on purpose and lives in ``bench/`` only: a
reference row for the comparison, never shipped.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from service.app import Relay
from service.config import load_settings
from service.server.serve import Service
from service.telemetry.logs import configure
from service.telemetry.tracing import Tracing
from service.upstreams.pools import Upstream


class StockTransport(AiohttpTransport):
    """The stock transport plus the one method the pool snapshot reads."""

    def idle_connections(self) -> int:
        session = self.client
        if not isinstance(session, aiohttp.ClientSession) or session.connector is None:
            return 0
        conns = getattr(session.connector, "_conns", {})
        return sum(len(items) for items in conns.values())


def stock_for(upstream: Upstream) -> StockTransport:
    pool = upstream.config.pool
    limits = httpx.Limits(
        max_connections=pool.max_connections,
        max_keepalive_connections=pool.max_keepalive_connections,
        keepalive_expiry=pool.keepalive_expiry_seconds,
    )
    return StockTransport(limits=limits, verify=upstream.config.tls.verify, trust_env=False)


async def swap_to_stock(upstream: Upstream) -> None:
    """Put the stock transport behind the upstream's gate; close the one it replaces."""
    gated = upstream.transport
    old = gated.inner
    # The gate sends through ``_send``: the inner transport itself, or the tracing wrapper
    # around it. Only the unwrapped case is supported (the benchmarks run without tracing).
    if gated._send is not old:
        raise RuntimeError("tracing is on: run the benchmark with OTEL_SDK_DISABLED=true")
    new = stock_for(upstream)
    await new.__aenter__()
    gated.inner = new
    gated._send = new
    await old.aclose()


def build_relay(relay: Relay) -> Relay:
    """Wrap the proxy app's lifespan so the swap happens inside the running event loop."""
    original = relay.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: object) -> AsyncIterator[None]:
        async with original(app):
            for upstream in relay.upstreams().values():
                await swap_to_stock(upstream)
            yield

    relay.router.lifespan_context = lifespan
    return relay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    settings = load_settings(args.config)
    if settings.server.workers != 1:
        raise SystemExit("the stock-transport harness runs one worker only")
    configure(settings.log)
    relay = build_relay(Relay(settings, tracing=Tracing.from_env(settings.tracing)))

    import uvloop

    uvloop.run(Service(settings, relay=relay).serve())


if __name__ == "__main__":
    main()
