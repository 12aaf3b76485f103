"""The TLS contexts of upstream connections: one per distinct setting, shared, and swapped
when the setting's files change on disk.

Building a certificate-verifying context loads the CA bundle: about 20 ms of CPU and 0.8 MB
each. httpx and aiohttp would build one per client (and httpcore's fresh-connection retry one
per retry), so a config with a thousand upstreams paid it a thousand times at every start.
Here every upstream, transport and retry with the same settings shares one ``TlsSource``,
made the first time an upstream needs it; a plain ``http://`` upstream shares one whose
context loads nothing and is never used for a handshake.

A source holds the current context; the transports read ``source.context`` for each new
connection, so a rebuilt context (a rotated CA or client certificate) is used from the next
connection on while open ones keep theirs. Whether the files changed is a ``stat`` of each,
made by a poller in the app's lifespan (``refresh``), never on the request path.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from dataclasses import dataclass

import httpx

from ..config import ConfigError
from ..config_upstreams import UpstreamConfig

log = logging.getLogger("relay.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class TlsSettings:
    """What an upstream's TLS context depends on: the key of the shared sources."""

    verify: bool
    ca_file: str | None = None
    system_ca: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    min_version: str = "1.2"
    reload_interval_seconds: float = 5.0

    def files(self) -> list[tuple[str, str]]:
        """(field, path) of each file the context is built from."""
        named = (("ca_file", self.ca_file), ("cert_file", self.cert_file))
        found = [(field, path) for field, path in named if path is not None]
        if self.key_file is not None:
            found.append(("key_file", self.key_file))
        return found


class TlsFileError(Exception):
    """A file of a TLS setting is missing, unreadable or unusable: ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _read(field: str, path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read()
    except OSError as exc:
        raise TlsFileError(field, f"cannot read {path}: {exc.strerror or exc}") from None


def build_context(settings: TlsSettings) -> ssl.SSLContext:
    """A new context for ``settings``, its files read now; ``TlsFileError`` names the field
    of a file that cannot be used."""
    if not settings.verify:
        context = httpx.create_ssl_context(verify=False)
    elif settings.system_ca:
        context = httpx.create_ssl_context(verify=True)  # certifi's bundle, as httpx's
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, trusts nothing yet
    context.minimum_version = _VERSIONS[settings.min_version]
    if settings.ca_file is not None:
        pem = _read("ca_file", settings.ca_file)
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise TlsFileError("ca_file", f"{settings.ca_file} holds no PEM certificate")
        try:
            context.load_verify_locations(cadata=pem)
        except ssl.SSLError as exc:
            detail = getattr(exc, "reason", None) or exc
            raise TlsFileError("ca_file", f"{settings.ca_file}: {detail}") from None
    if settings.cert_file is not None:
        _load_client_certificate(context, settings.cert_file, settings.key_file)
    return context


def _load_client_certificate(context: ssl.SSLContext, cert_file: str, key_file: str | None) -> None:
    pem = _read("cert_file", cert_file)
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise TlsFileError("cert_file", f"{cert_file} holds no PEM certificate")
    key_field, key_path = (
        ("key_file", key_file) if key_file is not None else ("cert_file", cert_file)
    )
    key = _read(key_field, key_path) if key_file is not None else pem
    if "PRIVATE KEY-----" not in key:
        raise TlsFileError(key_field, f"{key_path} holds no PEM private key")
    if "ENCRYPTED" in key:
        raise TlsFileError(key_field, f"{key_path}: an encrypted key is not supported")
    try:
        # A password of b"": an encrypted key fails here rather than prompting on stdin.
        context.load_cert_chain(cert_file, key_file, password=b"")
    except OSError as exc:
        detail = getattr(exc, "reason", None) or exc.strerror
        if detail == "KEY_VALUES_MISMATCH":
            raise TlsFileError(key_field, f"{key_path} does not match cert_file") from None
        raise TlsFileError(key_field, f"{key_path}: {detail or exc}") from None


Stamp = tuple[tuple[int, int, int] | None, ...]


class TlsSource:
    """The current context of one setting: the holder every transport using it reads."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._stamp = self._stat()
        self.context = build_context(settings)

    @property
    def watched(self) -> bool:
        """Whether the context depends on files (and is worth polling)."""
        return bool(self.settings.files())

    def _stat(self) -> Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for _, path in self.settings.files():
            try:
                st = os.stat(path)  # follows symlinks: a Secret volume swaps its ..data link
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def refresh(self) -> bool | None:
        """Rebuild the context if a file changed: True when swapped, False when the new
        files are unusable (the old context stays), None when nothing changed."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        # Kept even on failure: a broken file is reported once, not at every poll; the
        # next change (the rest of a rotation, or a fix) is tried again.
        self._stamp = stamp
        try:
            context = build_context(self.settings)
        except TlsFileError as exc:
            log.warning("TLS files changed but cannot be used, keeping the previous ones: %s", exc)
            return False
        self.context = context
        log.info("TLS files reloaded: %s", ", ".join(path for _, path in self.settings.files()))
        return True


@functools.cache
def tls_source(settings: TlsSettings) -> TlsSource:
    """The one source for ``settings`` in this process."""
    return TlsSource(settings)


def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """The current context for ``settings``."""
    return tls_source(settings).context


def tls_settings(config: UpstreamConfig) -> TlsSettings:
    """The settings of ``config``'s connections (plain ones for ``http://``)."""
    if config.url.scheme != "https":
        return TlsSettings(verify=False)
    tls = config.tls
    return TlsSettings(
        verify=tls.verify,
        ca_file=str(tls.ca_file) if tls.ca_file is not None else None,
        system_ca=tls.system_ca,
        cert_file=str(tls.cert_file) if tls.cert_file is not None else None,
        key_file=str(tls.key_file) if tls.key_file is not None else None,
        min_version=tls.min_version,
        reload_interval_seconds=tls.reload_interval_seconds,
    )


def upstream_tls(config: UpstreamConfig) -> TlsSource:
    """The source of ``config``'s connections' context."""
    return tls_source(tls_settings(config))


def server_name(config: UpstreamConfig) -> str | None:
    """The SNI and certificate name of ``config``'s connections, when not the URL's host."""
    if config.url.scheme != "https":
        return None
    return config.tls.server_name


def check_files(name: str, config: UpstreamConfig) -> None:
    """Build ``config``'s context now, so that a bad file stops the start: ``ConfigError``
    naming ``upstreams.<name>.tls.<field>``."""
    if config.url.scheme != "https" or not config.tls.files:
        return
    try:
        upstream_tls(config)
    except TlsFileError as exc:
        raise ConfigError(f"invalid config: upstreams.{name}.tls.{exc}") from None


def as_source(tls: TlsSource | ssl.SSLContext) -> TlsSource:
    """A source for a bare context (fixed: it never reloads)."""
    if isinstance(tls, TlsSource):
        return tls
    source = TlsSource.__new__(TlsSource)
    source.settings = TlsSettings(verify=tls.verify_mode != ssl.CERT_NONE)
    source._stamp = ()
    source.context = tls
    return source
