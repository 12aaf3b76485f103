"""Loopback ports and bounded waits: every wait in the tests is on a condition, with a limit."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback port nothing listens on right now (for a process that binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    return free_port()


def bind_local() -> socket.socket:
    """A listening socket on an ephemeral loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A port whose accept queue is full: new connections hang in SYN-SENT."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Wait (in the event loop) until ``check()`` is true; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    """Wait (blocking) until ``check()`` is true; fail saying ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def wait_http(url: str, within: float = 20.0, status: int = 200) -> None:
    """Wait until ``url`` answers ``status``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {within}s")


def wait_started(process: subprocess.Popen[bytes], url: str, log: Path, within: float = 30) -> None:
    """Wait until a server process answers ``url`` with 200; fail with the end of its log if
    it exits or does not answer within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"{url} did not answer:\n{tail}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds; reaped."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill(process)


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process that is still running, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()
