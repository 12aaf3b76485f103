"""Certificates made by the test (a local CA, server and client certificates, with
``trustme``), the files Relay reads them from, laid out as a Kubernetes Secret volume, and
an HTTPS upstream on 127.0.0.1 that records what each handshake presented."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trustme

from tests.support.loopback import parse_head


def server_context(
    cert: trustme.LeafCert,
    *,
    clients: trustme.CA | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A server context presenting ``cert``; with ``clients``, requiring a client certificate
    issued by that CA (mTLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if max_version is not None:
        context.maximum_version = max_version
    cert.configure_cert(context)
    if clients is not None:
        clients.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsUpstream:
    """An HTTPS upstream on 127.0.0.1 answering 200 with the request's path, one request per
    connection (``Connection: close``) so that every request is a new handshake. ``sni``:
    the server name each handshake asked for; ``peers``: the client certificate's common
    name of each accepted connection (None: none presented).

    Blocking sockets in threads rather than asyncio: an asyncio server drops a connection
    whose handshake failed without sending OpenSSL's alert, where real servers (and the
    ``ssl`` module's blocking sockets) send it, and the alert is what tells a refused client
    certificate or version from a reset."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.context.sni_callback = self._sni
        self.port = 0
        self.sni: list[str | None] = []
        self.peers: list[str | None] = []

    def _sni(self, sslobj: Any, name: str | None, context: ssl.SSLContext) -> None:
        self.sni.append(name)

    def use(self, context: ssl.SSLContext) -> None:
        """Serve new connections with ``context``: swapped whole, as loading a certificate
        into the context in use would race the handshakes of the serving threads."""
        context.sni_callback = self._sni
        self.context = context

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TlsUpstream]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.1)  # how soon the accept loop notices it should stop
        self.port = int(listener.getsockname()[1])
        stop = threading.Event()
        thread = threading.Thread(target=self._accept, args=(listener, stop), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 10)
            listener.close()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        try:
            with self.context.wrap_socket(sock, server_side=True) as tls:
                self.peers.append(common_name(tls.getpeercert()))
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                _, target, _ = parse_head(head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
                body = target.encode()
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
        except ssl.SSLError:
            # A refused handshake, its alert already sent. With TLS 1.3 the client may have
            # sent its request by then: closing with it unread would reset the connection,
            # and a reset can destroy the alert before the client reads it. Linger instead,
            # as real servers do, so the client sees why.
            _linger(sock)
        except OSError:
            pass
        finally:
            sock.close()


def _linger(sock: socket.socket, seconds: float = 1.0) -> None:
    """Half-close, then read and drop what the peer still sends until it closes."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        while sock.recv(65536):
            pass
    except OSError:
        pass


def common_name(peercert: Any) -> str | None:
    """The subject's common name of a certificate as ``SSLSocket.getpeercert`` gives it."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class SecretVolume:
    """Files as a Kubernetes Secret volume lays them out: each name a link into ``..data``,
    itself a link to a directory of the current version, swapped atomically on update (so
    a reader never sees half of a rotation)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._version = 0

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, files: dict[str, bytes]) -> None:
        self._version += 1
        version = self.root / f"..v{self._version}"
        version.mkdir(parents=True)
        for name, data in files.items():
            (version / name).write_bytes(data)
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.root / "..data")


def pem(*blobs: trustme.Blob) -> bytes:
    return b"".join(blob.bytes() for blob in blobs)
