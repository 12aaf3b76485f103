"""Many idle keep-alive client connections, from plain sockets, for ``bench/scale.py``.

Plain blocking sockets with timeouts: no event loop in the benchmark process, so what it
holds open costs Relay exactly one accepted connection each.
"""

from __future__ import annotations

import resource
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

from common import LOOPBACK
from scale_relay import open_fds, rss_kib

BATCH = 500  # connects, then requests, in flight at once: well under Relay's listen backlog


def raise_fd_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()


def read_response(sock: socket.socket) -> int:
    """Reads one whole response with a Content-Length body; returns its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return int(head.split(b" ", 2)[1])


def connect(port: int, count: int, settle: Callable[[int], None]) -> list[socket.socket]:
    """``count`` connections to ``port``, opened ``BATCH`` at a time; after each batch
    ``settle(opened so far)`` waits for the server to have accepted them."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            for _ in range(min(BATCH, count - len(socks))):
                sock = socket.create_connection((LOOPBACK, port), timeout=10)
                socks.append(sock)
            settle(len(socks))
    except BaseException:
        close(socks)
        raise
    return socks


def one_request_each(socks: list[socket.socket], path: str) -> dict[int, int]:
    """One GET on every connection, ``BATCH`` in flight at once; statuses counted."""
    statuses: dict[int, int] = {}
    request = _request(path)
    for start in range(0, len(socks), BATCH):
        batch = socks[start : start + BATCH]
        for sock in batch:
            sock.sendall(request)
        for sock in batch:
            status = read_response(sock)
            statuses[status] = statuses.get(status, 0) + 1
    return statuses


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has not closed (no EOF waiting to be read)."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            count += sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
        finally:
            sock.setblocking(True)
    return count


def new_request_ms(port: int, path: str, samples: int = 20) -> tuple[float, float]:
    """Median and max ms for a request on a new connection (connect to full response)."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
            sock.sendall(_request(path))
            if read_response(sock) != 200:
                raise RuntimeError(f"{path}: not 200")
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def close(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def settle(pid: int, want: int, within: float = 30) -> None:
    """Waits until the server holds ``want`` fds: the connections opened are accepted."""
    deadline = time.monotonic() + within
    while open_fds(pid) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Relay holds {open_fds(pid)} fds, want {want} within {within} s")
        time.sleep(0.02)


def snapshot(relay: Any, label: str, base: dict[str, Any] | None, clients: int) -> dict[str, Any]:
    """Relay's RSS and fds now, the cost per open client connection over ``base``, and the
    latency of a new request."""
    fds, rss = open_fds(relay.pid), rss_kib(relay.pid)
    row: dict[str, Any] = {"state": label, "rss_kib": rss, "fds": fds, "clients": clients}
    if base is not None and clients:
        row["kb_per_connection"] = (rss - base["rss_kib"]) * 1024 / 1000 / clients
    row["new_request_ms"] = new_request_ms(relay.port, "/up/1k")
    return row
