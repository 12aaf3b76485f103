"""Relay with httpx-aiohttp's stock ``AiohttpTransport`` behind the pool gate (bench only).

Same CLI as ``python -m service``; used by ``bench/transports.py`` to measure the stock
transport on equal terms.
"""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport

from service import upstreams
from service.__main__ import main


class StockTransport(AiohttpTransport):
    def idle_connections(self) -> int:
        return 0


def _stock(*, limits: httpx.Limits, verify: bool = True) -> StockTransport:
    return StockTransport(limits=limits, verify=verify, trust_env=False)


upstreams.AiohttpTransport = _stock  # type: ignore[assignment,misc]

if __name__ == "__main__":
    main()
