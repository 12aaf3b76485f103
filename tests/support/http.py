"""httpx clients for the tests, sharing one TLS context.

httpx builds a TLS context for every client, loading certifi's CA bundle: tens of
milliseconds each on a loaded machine, more than many tests take otherwise. The tests speak
plain HTTP to 127.0.0.1, so every client shares one default context, built once.
"""

from __future__ import annotations

from typing import Any

import httpx

TLS = httpx.create_ssl_context()


def http_client(**options: Any) -> httpx.AsyncClient:
    """``httpx.AsyncClient(**options)``, with the shared TLS context."""
    return httpx.AsyncClient(verify=TLS, **options)
