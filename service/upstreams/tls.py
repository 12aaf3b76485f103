"""The TLS contexts of upstream connections: one per distinct setting, shared.

Building a certificate-verifying context loads the CA bundle: about 20 ms of CPU and 0.8 MB
each. httpx and aiohttp would build one per client (and httpcore's fresh-connection retry one
per retry), so a config with a thousand upstreams paid it a thousand times at every start.
Here every upstream, transport and retry with the same settings shares one context, built the
first time an upstream needs it; a plain ``http://`` upstream shares a context that loads
nothing and is never used for a handshake.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass

import httpx

from ..config import UpstreamConfig


@dataclass(frozen=True)
class TlsSettings:
    """What an upstream's TLS context depends on: the key of the shared contexts."""

    verify: bool


@functools.cache
def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """The one context for ``settings`` in this process."""
    return httpx.create_ssl_context(verify=settings.verify)


def upstream_tls(config: UpstreamConfig) -> ssl.SSLContext:
    """The context of ``config``'s connections (never used for a handshake with ``http://``)."""
    verify = config.url.scheme == "https" and config.verify_tls
    return tls_context(TlsSettings(verify=verify))
