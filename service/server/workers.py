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
(``serve.Service.serve`` unblocks them) instead of killing it with a traceback.

A worker that dies is respawned in its slot (the same index, so its metrics files and its
``worker`` label carry on) after a delay that doubles with each death in a row that came
within ``STABLE_AFTER_SECONDS`` of starting. ``CRASH_STREAK_LIMIT`` such deaths in a row
stop the pod: the other workers drain and the supervisor exits with
``EXIT_WORKERS_CRASHING``, so Kubernetes sees a crash loop instead of a Running pod that
keeps losing workers. Respawns are counted in ``relay_worker_restarts_total``.

Metrics use prometheus-client's multiprocess mode: the directory is created empty at start,
each worker slot has one set of files (telemetry/multiproc.py), and a dead worker's live
gauges are removed before it is replaced, so in-flight and pool gauges never count a process
that is gone. The workers share a small table in the same directory (telemetry/pod.py) for
readiness and the pod's process metrics.
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
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from ..config import Settings, summary
from ..telemetry.multiproc import use_files_of, worker_file_id
from ..telemetry.pod import PodTable, WorkerSlot
from .fds import raise_open_files_limit
from .listeners import EXIT_CANNOT_START, ListenerError, Listeners, announce, bind_listeners
from .serve import CUT_SIGNAL, STOP_SIGNALS, serve_forever

log = logging.getLogger("relay.workers")
startup_log = logging.getLogger("relay.server")

DEFAULT_METRICS_DIR = "/tmp/relay-prometheus"
SUPERVISED_SIGNALS = (*STOP_SIGNALS, CUT_SIGNAL)
# Respawning: the first replacement after RESPAWN_DELAY_SECONDS, doubling with each quick
# death in a row, never more than RESPAWN_DELAY_MAX_SECONDS. A death is quick when the
# worker ran less than STABLE_AFTER_SECONDS; a worker that ran longer ends its slot's streak.
RESPAWN_DELAY_SECONDS = 0.5
RESPAWN_DELAY_MAX_SECONDS = 10.0
STABLE_AFTER_SECONDS = 60.0
# This many quick deaths in a row of one slot stop the pod.
CRASH_STREAK_LIMIT = 5
# Exit code of the supervisor stopped by a crash streak (2: invalid config; 3: cannot start).
EXIT_WORKERS_CRASHING = 4
# Longest the supervisor sleeps between looks at its workers and its signal lines; a death
# wakes it at once.
POLL_SECONDS = 0.2


def prepare_metrics_dir() -> Path:
    """Create an empty multiprocess directory and export it to the workers."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or DEFAULT_METRICS_DIR)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _worker(settings: Settings, listeners: Listeners, table: PodTable, index: int) -> None:
    from ..telemetry.logs import configure

    configure(settings.log)
    use_files_of(worker_file_id(index))  # before any metric exists
    serve_forever(settings, listeners, slot=WorkerSlot(table, index))


@dataclass
class Respawns:
    """One slot's crash streak: when its next worker starts, and when to give up."""

    streak: int = 0  # deaths in a row, each within STABLE_AFTER_SECONDS of its start

    def died(self, lived_seconds: float) -> float | None:
        """Seconds until the replacement starts; None once the streak reaches the limit."""
        self.streak = self.streak + 1 if lived_seconds < STABLE_AFTER_SECONDS else 0
        if self.streak >= CRASH_STREAK_LIMIT:
            return None
        delay = RESPAWN_DELAY_SECONDS * 2 ** max(self.streak - 1, 0)
        return float(min(delay, RESPAWN_DELAY_MAX_SECONDS))


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    started: float = 0.0  # time.monotonic() of the current process's start
    respawn_at: float | None = None
    respawns: Respawns = field(default_factory=Respawns)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, settings: Settings, listeners: Listeners) -> None:
        self.settings = settings
        self.listeners = listeners
        # What the signals and the workers' exits have told it so far.
        self._stopping = self._cut = self._failed = self._crashed = False
        self._slots = [_Slot(index) for index in range(settings.server.workers)]
        self._table: PodTable | None = None
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

    def _start(self, slot: _Slot, table: PodTable) -> None:
        # "spawn" gives each worker a fresh interpreter that imports prometheus-client
        # with the multiprocess directory already in its environment.
        context = multiprocessing.get_context("spawn")
        table.starting(slot.index)
        process = context.Process(
            target=_worker,
            args=(self.settings, self.listeners, table, slot.index),
            name=f"relay-worker-{slot.index}",
        )
        process.start()
        table.started(slot.index, process.pid or 0)
        slot.process, slot.started, slot.respawn_at = process, time.monotonic(), None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._stopping:
            self._said.append((logging.INFO, f"{name}: stopping the workers; each drains"))
            self._stop()
        elif not self._cut:
            self._cut = True
            line = f"second signal ({name}): the workers cut their drain short"
            self._said.append((logging.WARNING, line))
            self._tell_workers(CUT_SIGNAL)

    def _stop(self) -> None:
        self._stopping = True
        if self._table is not None:
            self._table.stop()  # readiness turns 503 in every worker at once
        for slot in self._slots:
            slot.respawn_at = None
        self._tell_workers(signal.SIGTERM)

    def _tell_workers(self, signum: int) -> None:
        for slot in self._slots:
            process = slot.process
            if process is not None and process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    def _say(self) -> None:
        while self._said:
            log.log(*self._said.pop(0))

    def _wait(self) -> None:
        """Until a worker dies, a respawn is due, or POLL_SECONDS pass."""
        timeout = POLL_SECONDS
        due = [slot.respawn_at for slot in self._slots if slot.respawn_at is not None]
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        sentinels = [slot.process.sentinel for slot in self._slots if slot.process is not None]
        if sentinels:
            wait(sentinels, timeout)
        else:
            time.sleep(timeout)

    def _reap(self, slot: _Slot, table: PodTable, metrics_dir: Path) -> None:
        from prometheus_client import multiprocess

        process = slot.process
        assert process is not None
        process.join()
        slot.process = None
        lived = time.monotonic() - slot.started
        multiprocess.mark_process_dead(worker_file_id(slot.index), str(metrics_dir))  # type: ignore[no-untyped-call]
        table.gone(slot.index)
        status = _exit_status(process.exitcode)
        if self._stopping:
            if process.exitcode != 0:
                self._failed = True
                log.warning("worker %d (pid %s) exited with %s", slot.index, process.pid, status)
            return
        delay = slot.respawns.died(lived)
        if delay is None:
            self._crashed = True
            log.error(
                "worker %d died %d times in a row within %gs of starting (last: pid %s, %s): "
                "stopping all workers; exit code %d",
                slot.index, CRASH_STREAK_LIMIT, STABLE_AFTER_SECONDS, process.pid, status,
                EXIT_WORKERS_CRASHING,
            )  # fmt: skip
            self._stop()
            return
        slot.respawn_at = time.monotonic() + delay
        log.warning(
            "worker %d (pid %s) exited with %s after %.1fs; restarting it in %gs",
            slot.index, process.pid, status, lived, delay,
        )  # fmt: skip

    def run(self) -> int:
        metrics_dir = prepare_metrics_dir()
        table = self._table = PodTable.create(len(self._slots), metrics_dir)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        with self._signals_held():
            for slot in self._slots:
                self._start(slot, table)
        pids = ", ".join(str(slot.process.pid) for slot in self._slots if slot.process)
        log.info(
            "started %d workers (pids %s); metrics dir %s", len(self._slots), pids, metrics_dir
        )
        while any(slot.process is not None for slot in self._slots) or not self._stopping:
            self._wait()
            self._say()
            for slot in self._slots:
                if slot.process is not None and not slot.process.is_alive():
                    self._reap(slot, table, metrics_dir)
            now = time.monotonic()
            due = [s for s in self._slots if s.respawn_at is not None and s.respawn_at <= now]
            if due and not self._stopping:
                with self._signals_held():
                    for slot in due:
                        table.respawned()
                        self._start(slot, table)
        self._say()
        log.info("stopped: all workers exited")
        if self._crashed:
            return EXIT_WORKERS_CRASHING
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
    raise_open_files_limit()
    if settings.server.workers == 1:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Multiprocess mode was asked for explicitly: it still needs its directory.
            prepare_metrics_dir()
            use_files_of(str(os.getpid()))
        serve_forever(settings, listeners)
        return
    raise SystemExit(Supervisor(settings, listeners).run())


__all__ = ["run"]
