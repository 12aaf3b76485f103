"""Several worker processes sharing the listeners, with metrics aggregated across them.

The supervisor binds the proxy, admin (and demo) sockets once and starts ``workers``
processes that all accept on them. Metrics use prometheus-client's multiprocess mode: the
directory is created empty at start, and a dead worker's live gauges are removed before it
is replaced, so in-flight and pool gauges never count a process that is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from .config import Settings
from .server import Listeners, serve_forever

log = logging.getLogger("relay.workers")

DEFAULT_METRICS_DIR = "/tmp/relay-prometheus"
RESTART_PAUSE_SECONDS = 0.5


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def prepare_metrics_dir() -> Path:
    """Create an empty multiprocess directory and export it to the workers."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or DEFAULT_METRICS_DIR)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _worker(settings: Settings, listeners: Listeners) -> None:
    from .logs import configure

    configure(settings.log)
    serve_forever(settings, listeners)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stopping = False
        self._workers: list[BaseProcess] = []

    def _spawn(self, listeners: Listeners) -> BaseProcess:
        # "spawn" gives each worker a fresh interpreter that imports prometheus-client
        # with the multiprocess directory already in its environment.
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=_worker, args=(self.settings, listeners), daemon=False)
        process.start()
        return process

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        second = self._stopping
        self._stopping = True
        for process in self._workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGINT if second else signal.SIGTERM)

    def run(self) -> int:
        from prometheus_client import multiprocess

        metrics_dir = prepare_metrics_dir()
        server = self.settings.server
        listeners = Listeners(
            proxy=_bind(server.host, server.port, server.backlog),
            admin=_bind(server.admin_host, server.admin_port, 128),
            demo=_bind(self.settings.demo.host, self.settings.demo.port, 128)
            if self.settings.demo.enabled
            else None,
        )
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._workers = [self._spawn(listeners) for _ in range(server.workers)]
        log.info("started %d workers; metrics dir %s", server.workers, metrics_dir)
        while self._workers:
            time.sleep(RESTART_PAUSE_SECONDS)
            running: list[BaseProcess] = []
            for process in self._workers:
                if process.is_alive():
                    running.append(process)
                    continue
                process.join()
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                if not self._stopping:
                    log.warning("worker %s exited (%s); restarting", process.pid, process.exitcode)
                    running.append(self._spawn(listeners))
            self._workers = running
        return 0


def run(settings: Settings) -> None:
    if settings.server.workers == 1:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Multiprocess mode was asked for explicitly: it still needs its directory.
            prepare_metrics_dir()
        serve_forever(settings)
        return
    raise SystemExit(Supervisor(settings).run())


__all__ = ["run"]
