"""Starting the service: bind, announce, then serve in this process or in several workers.

Every listener is bound before anything is announced, in one place for both modes. With
``workers > 1`` a supervisor starts that many worker processes that all accept on the
sockets it bound, and relays stop signals to them:

- the first SIGTERM or SIGINT becomes one SIGTERM to each worker, which drains; a worker
  takes any repeat (a terminal's Ctrl-C reaches the whole process group, so each worker
  gets it from the terminal as well as from the supervisor) as the same request;
- a second signal to the supervisor becomes ``CUT_SIGNAL`` to each worker, which cuts its
  drain short.

Workers start with SIGTERM, SIGINT and ``CUT_SIGNAL`` blocked (a signal mask is inherited),
so a signal that reaches a worker still starting waits until its own handlers are in place
(``server.Service.serve`` unblocks them) instead of killing it with a traceback.

Metrics use prometheus-client's multiprocess mode: the directory is created empty at start,
and a dead worker's live gauges are removed before it is replaced, so in-flight and pool
gauges never count a process that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from .config import Settings, summary
from .listeners import EXIT_CANNOT_START, ListenerError, Listeners, announce, bind_listeners
from .server import CUT_SIGNAL, STOP_SIGNALS, serve_forever

log = logging.getLogger("relay.workers")
startup_log = logging.getLogger("relay.server")

DEFAULT_METRICS_DIR = "/tmp/relay-prometheus"
RESTART_PAUSE_SECONDS = 0.5
SUPERVISED_SIGNALS = (*STOP_SIGNALS, CUT_SIGNAL)


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
    serve_forever(settings, listeners, worker=True)


class Supervisor:
    def __init__(self, settings: Settings, listeners: Listeners) -> None:
        self.settings = settings
        self.listeners = listeners
        self._stopping = False
        self._cut = False
        self._failed = False
        self._workers: list[BaseProcess] = []
        # Lines from the signal handler, logged by the main loop: logging is not reentrant.
        self._said: list[tuple[int, str]] = []

    @contextlib.contextmanager
    def _signals_held(self) -> Iterator[None]:
        """Start workers with the stop signals blocked, so a signal that reaches one while it
        is still starting waits for its handlers (they unblock them). One that reaches the
        supervisor meanwhile is handled once the new worker is in the list it signals."""
        # multiprocessing's resource tracker unblocks SIGINT and SIGTERM when it starts its
        # own process, which it does on a first spawn: have it running before blocking.
        resource_tracker.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISED_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _spawn(self) -> BaseProcess:
        # "spawn" gives each worker a fresh interpreter that imports prometheus-client
        # with the multiprocess directory already in its environment.
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=_worker, args=(self.settings, self.listeners))
        process.start()
        return process

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._stopping:
            self._stopping = True
            self._said.append((logging.INFO, f"{name}: stopping the workers; each drains"))
            self._tell_workers(signal.SIGTERM)
        elif not self._cut:
            self._cut = True
            line = f"second signal ({name}): the workers cut their drain short"
            self._said.append((logging.WARNING, line))
            self._tell_workers(CUT_SIGNAL)

    def _tell_workers(self, signum: int) -> None:
        for process in self._workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    def run(self) -> int:
        from prometheus_client import multiprocess

        metrics_dir = prepare_metrics_dir()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        with self._signals_held():
            for _ in range(self.settings.server.workers):
                self._workers.append(self._spawn())
        pids = ", ".join(str(process.pid) for process in self._workers)
        log.info(
            "started %d workers (pids %s); metrics dir %s", len(self._workers), pids, metrics_dir
        )
        while self._workers:
            time.sleep(RESTART_PAUSE_SECONDS)
            while self._said:
                log.log(*self._said.pop(0))
            for process in [p for p in self._workers if not p.is_alive()]:
                process.join()
                self._workers.remove(process)
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                if not self._stopping:
                    log.warning("worker %s exited (%s); restarting", process.pid, process.exitcode)
                    with self._signals_held():
                        self._workers.append(self._spawn())
                elif process.exitcode != 0:
                    self._failed = True
                    log.warning("worker %s exited with %s", process.pid, process.exitcode)
        while self._said:
            log.log(*self._said.pop(0))
        log.info("stopped: all workers exited")
        return 1 if self._failed else 0


def run(settings: Settings, config_file: Path | None = None) -> None:
    """Bind every listener, say what runs where, then serve until stopped."""
    try:
        listeners = bind_listeners(settings)
    except ListenerError as exc:
        startup_log.error("%s", exc)
        raise SystemExit(EXIT_CANNOT_START) from None
    startup_log.info("%s", summary(settings, config_file))
    announce(listeners)
    if settings.server.workers == 1:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Multiprocess mode was asked for explicitly: it still needs its directory.
            prepare_metrics_dir()
        serve_forever(settings, listeners)
        return
    raise SystemExit(Supervisor(settings, listeners).run())


__all__ = ["run"]
