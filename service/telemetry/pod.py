"""What the processes of one pod share when it runs several workers: each worker's pid and
state, whether the pod is stopping, and how many workers were respawned.

A small table of 64-bit integers in a file of the multiprocess metrics directory
(``pod.table``, which the metrics collector does not read), mapped into memory by the
supervisor before the first worker starts and by each worker. The supervisor writes the
pids, the stop flag and the respawn count; each worker writes its own state. Aligned 64-bit
stores are atomic, so readers (any worker answering ``/readyz`` or ``/metrics``) never see a
torn value, and nobody waits for a lock on a probe.

Readiness is the pod's answer, whichever worker takes the probe: ready while at least one
worker is ready and the pod is not stopping. Every worker accepts on the same proxy socket,
and a worker only accepts once its pools are open, so one ready worker means every
connection the pod accepts is served; a worker being respawned (or still starting next to a
ready one) costs capacity, not correctness, and taking the whole pod out for it would move
all of its traffic onto the other pods because one process died. A worker that keeps dying
is the supervisor's business: it makes the pod exit after a bounded streak (workers.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

FILE_NAME = "pod.table"
_STOPPING, _RESTARTS, _SUPERVISOR = 0, 1, 2
_HEADER = 3


class _Cells(Protocol):
    def __getitem__(self, index: int, /) -> int: ...
    def __setitem__(self, index: int, value: int, /) -> None: ...


class WorkerState(IntEnum):
    GONE = 0  # no process in the slot: not started yet, or dead and not yet respawned
    STARTING = 1
    READY = 2
    DRAINING = 3


class PodTable:
    """The shared table; one slot per worker index, ``0`` to ``workers - 1``."""

    def __init__(self, workers: int, cells: _Cells, path: Path | None = None) -> None:
        self.workers = workers
        self.path = path
        self._cells = cells

    @classmethod
    def create(cls, workers: int, directory: Path) -> PodTable:
        """A new table in ``directory``, all zeros but the supervisor's pid (this process)."""
        path = directory / FILE_NAME
        with open(path, "wb") as file:
            file.truncate(8 * (_HEADER + 2 * workers))
        table = cls.open(workers, path)
        table._cells[_SUPERVISOR] = os.getpid()
        return table

    @classmethod
    def open(cls, workers: int, path: Path) -> PodTable:
        """The table in ``path``, mapped into this process (shared with the others)."""
        with open(path, "r+b") as file:
            mapped = mmap.mmap(file.fileno(), 8 * (_HEADER + 2 * workers))
        return cls(workers, (ctypes.c_int64 * (_HEADER + 2 * workers)).from_buffer(mapped), path)

    @classmethod
    def local(cls, workers: int) -> PodTable:
        """A table in this process only (for a unit test of the readiness rule)."""
        return cls(workers, [0] * (_HEADER + 2 * workers))

    def __reduce__(self) -> tuple[Any, ...]:
        # A worker gets the table as its start argument: it maps the same file.
        if self.path is None:
            raise TypeError("a local PodTable cannot be sent to another process")
        return (PodTable.open, (self.workers, self.path))

    def _pid_cell(self, index: int) -> int:
        if not 0 <= index < self.workers:
            raise IndexError(f"worker index {index} outside 0..{self.workers - 1}")
        return _HEADER + 2 * index

    # -- the supervisor's side ----------------------------------------------------------------
    def starting(self, index: int) -> None:
        """A worker is about to start in slot ``index``: written before it can say ready."""
        cell = self._pid_cell(index)
        self._cells[cell] = 0
        self._cells[cell + 1] = WorkerState.STARTING

    def started(self, index: int, pid: int) -> None:
        self._cells[self._pid_cell(index)] = pid

    def gone(self, index: int) -> None:
        cell = self._pid_cell(index)
        self._cells[cell + 1] = WorkerState.GONE
        self._cells[cell] = 0

    def stop(self) -> None:
        self._cells[_STOPPING] = 1

    def respawned(self) -> None:
        self._cells[_RESTARTS] += 1

    # -- a worker's side ----------------------------------------------------------------------
    def set_state(self, index: int, state: WorkerState) -> None:
        self._cells[self._pid_cell(index) + 1] = state

    # -- anyone -------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return bool(self._cells[_STOPPING])

    @property
    def restarts(self) -> int:
        return int(self._cells[_RESTARTS])

    @property
    def supervisor_pid(self) -> int:
        return int(self._cells[_SUPERVISOR])

    def slots(self) -> list[tuple[int, int, WorkerState]]:
        """(index, pid, state) of every slot; pid 0 while none is known."""
        out = []
        for index in range(self.workers):
            cell = self._pid_cell(index)
            out.append((index, int(self._cells[cell]), WorkerState(self._cells[cell + 1])))
        return out

    def readiness(self) -> tuple[bool, str]:
        """The pod's answer to a readiness probe (see the module docstring)."""
        if self.stopping:
            return False, "draining"
        states = {state for _, _, state in self.slots()}
        if WorkerState.READY in states:
            return True, "ready"
        if WorkerState.DRAINING in states:
            return False, "draining"
        return False, "starting"


@dataclass(frozen=True)
class WorkerSlot:
    """One worker's place in the table: what it publishes its state to."""

    table: PodTable
    index: int

    def publish(self, state: WorkerState) -> None:
        self.table.set_state(self.index, state)
