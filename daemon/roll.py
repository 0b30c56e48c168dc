"""The roll of workers: who they are, which are alive, and which were lost with frames to settle.

A worker's id is ``host:uuid``, made once per process (:func:`new_worker_id`), so a new process never
inherits a dead one's id, even on a recycled pid; the pid travels in every message.  The collector feeds
the roll from workers' messages, the service tells it which local processes exited and which went silent,
and takes the losses out (:meth:`Roll.take_losses`) to settle the frames those workers held.  Clocks are
``time.monotonic()``: a wall-clock step must not make every worker look silent.
"""
from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass

from .protocol import JobKey

HOST = socket.gethostname()


def new_worker_id() -> str:
    return "%s:%s" % (HOST, uuid.uuid4().hex[:12])


@dataclass
class WorkerInfo:
    id: str
    pid: int | None
    host: str | None
    last_seen: float
    busy: JobKey | None = None  # the job it holds
    frames_done: int = 0


@dataclass(frozen=True)
class Loss:
    """A worker gone with whatever it held: ``charge`` when it died or hung (a try counts), not when it left."""

    worker_id: str
    charge: bool


class Roll:
    def __init__(self, *, liveness_s: float):
        self.liveness_s = liveness_s
        self.workers: dict[str, WorkerInfo] = {}
        self._dead: dict[str, float] = {}  # id -> when it was found dead; remembered for one liveness window
        self._losses: list[Loss] = []

    def is_dead(self, worker_id: str) -> bool:
        return worker_id in self._dead

    def heard(self, worker_id: str, pid: int | None, host: str | None) -> WorkerInfo | None:
        """A message from a worker: its entry, joined now if new; None for a dead one (no coming back)."""
        if worker_id in self._dead:
            return None
        now = time.monotonic()
        info = self.workers.get(worker_id)
        if info is None:
            info = self.workers[worker_id] = WorkerInfo(worker_id, pid, host, now)
        info.last_seen = now
        return info

    def left(self, worker_id: str) -> bool:
        """A worker said goodbye: what it still held is re-sent free of charge."""
        if self.workers.pop(worker_id, None) is None:
            return False
        self._losses.append(Loss(worker_id, charge=False))
        return True

    def died(self, worker_id: str, charge: bool = True) -> None:
        """A worker's process is known to have exited (or died holding a frame it just started); ``charge``
        unless it exited cleanly (it finished what it had started)."""
        self.workers.pop(worker_id, None)
        self._dead[worker_id] = time.monotonic()
        self._losses.append(Loss(worker_id, charge))

    def silent(self) -> list[WorkerInfo]:
        """Workers not heard from for the liveness window: dropped from the roll (charged losses) and returned.

        They are not marked dead: a remote worker back from a network hiccup rejoins by its next heartbeat.
        """
        now = time.monotonic()
        cutoff = now - self.liveness_s
        gone = [info for info in self.workers.values() if info.last_seen < cutoff]
        for info in gone:
            del self.workers[info.id]
            self._losses.append(Loss(info.id, charge=True))
        for worker_id in [w for w, since in self._dead.items() if since < cutoff]:
            del self._dead[worker_id]  # its last messages are long read: forget it
        return gone

    def take_losses(self) -> list[Loss]:
        losses, self._losses = self._losses, []
        return losses
