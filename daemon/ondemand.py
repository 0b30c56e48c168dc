"""The on-demand lane: single-frame HTTP queries, analysed by the same workers ahead of the watcher's backlog.

HTTP threads :meth:`Lane.submit` a job and wait on it; only the main thread takes jobs out, tracks them in
flight and settles them, so every ZeroMQ socket stays on the main thread.  The queue is bounded and a
full queue is refused at once (the caller answers 503): nothing ever waits for room.  Jobs are not frames
of a collection: they never enter the ledger and are not published.

A job whose worker dies (or overruns the frame timeout, and is then killed) is sent once more, then answered
with an error; a job no worker took within the dispatch timeout (lost in a dead worker's buffer) is re-sent
free of charge.

A job goes to the workers as a :class:`~spotfinder_daemon.protocol.Job` of lane ``query``, numbered by the lane's own
counter; the collector hands back the :class:`~spotfinder_daemon.protocol.Started` and
:class:`~spotfinder_daemon.protocol.Result` reports of that lane (:meth:`Lane.started`, :meth:`Lane.finished`).
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field

from spotfinder_core import Params

from . import protocol
from .wakeup import Wakeup

log = logging.getLogger("spotfinder.ondemand")

MAX_TRIES = 2  # the first try and one resend


class LaneFull(Exception):
    """The bounded queue is full: answer 503 and let the client retry."""


class LaneClosed(Exception):
    """The service is stopping."""


@dataclass
class Outcome:
    """What a waiting HTTP thread gets: the worker's result (and text), or why there is none."""

    result: dict | None = None
    text: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Job:
    id: int
    path: str
    params: Params
    reply: str | None  # "body" (DISTL's GET text), "post" (its short POST text) or None (JSON only)
    tries: int = 0
    worker: str | None = None
    deadline: float | None = None
    outcome: Outcome | None = None
    abandoned: bool = False
    _settled: threading.Event = field(default_factory=threading.Event, repr=False)

    def message(self, verify_md5: bool) -> protocol.Job:
        """The job a worker receives."""
        return protocol.Job(lane=protocol.QUERY, id=self.id, frame=protocol.FrameRef(path=self.path),
                            params=self.params, verify_md5=verify_md5, reply=self.reply)

    def wait(self, timeout: float) -> Outcome | None:
        """The outcome, or None after ``timeout`` seconds."""
        return self.outcome if self._settled.wait(timeout) else None

    def settle(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._settled.set()


class Lane:
    def __init__(self, *, capacity: int, dispatch_timeout_s: float, frame_timeout_s: float):
        self.capacity = capacity
        self.dispatch_timeout_s = dispatch_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self._lock = threading.Lock()
        self._queue: collections.deque[Job] = collections.deque()
        self._in_flight: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._wakeup = Wakeup()

    # ----- HTTP threads ------------------------------------------------------------------------------------
    def submit(self, path: str, params: Params, reply: str | None) -> Job:
        """Queue a job; LaneFull when the queue is full, LaneClosed when the service is stopping."""
        with self._lock:
            if self._closed:
                raise LaneClosed()
            if len(self._queue) >= self.capacity:
                raise LaneFull()
            job = Job(next(self._ids), path, params, reply)
            self._queue.append(job)
        self._wakeup.notify()
        return job

    def abandon(self, job: Job) -> None:
        """The client gave up waiting: drop the job if no worker has it yet, else ignore its result."""
        with self._lock:
            job.abandoned = True
            if job in self._queue:
                self._queue.remove(job)

    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    # ----- main thread -------------------------------------------------------------------------------------
    def fileno(self) -> int:
        """Readable when jobs were submitted (for the main loop's poller)."""
        return self._wakeup.fileno()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def take(self, room: int) -> list[Job]:
        """Up to ``room`` queued jobs, oldest first; the caller sends them and reports back."""
        self._wakeup.clear()
        with self._lock:
            return [self._queue.popleft() for _ in range(min(room, len(self._queue)))]

    def put_back(self, job: Job) -> None:
        """A job that could not be sent goes back to the head of the queue."""
        with self._lock:
            if not job.abandoned:
                self._queue.appendleft(job)

    def dispatched(self, job: Job, now: float) -> None:
        with self._lock:
            job.worker, job.deadline = None, now + self.dispatch_timeout_s
            self._in_flight[job.id] = job

    def started(self, job_id: int, worker_id: str, deadline: float) -> None:
        with self._lock:
            job = self._in_flight.get(job_id)
            if job is not None:
                job.worker, job.deadline = worker_id, deadline
                job.tries += 1

    def finished(self, job_id: int, result: dict, text: str | None) -> Job | None:
        """Settle a job with its worker's result; None for a job already settled (a resent one finished twice)."""
        with self._lock:
            job = self._in_flight.pop(job_id, None)
        if job is not None:
            job.settle(Outcome(result=result, text=text))
        return job

    def worker_lost(self, worker_id: str) -> None:
        """Resend the jobs a dead worker held; answer the ones already resent with an error."""
        with self._lock:
            held = [job for job in self._in_flight.values() if job.worker == worker_id]
        for job in held:
            self._retry(job, "its worker died on it %d times" % MAX_TRIES)

    def expire(self, now: float) -> list[str]:
        """Resend jobs past their deadline (free of charge when no worker started them), or answer them; the
        workers that overran the frame timeout (hung)."""
        with self._lock:
            overdue = [job for job in self._in_flight.values() if job.deadline < now]
        hung = [job.worker for job in overdue if job.worker is not None]
        for job in overdue:
            if job.worker is None:
                log.warning("on-demand job for %s was not taken by any worker in time; sent again", job.path)
                with self._lock:
                    self._in_flight.pop(job.id, None)
                self.put_back(job)
            else:
                self._retry(job, "no worker finished it within %.0f s, %d times" % (self.frame_timeout_s, MAX_TRIES))
        return hung

    def _retry(self, job: Job, reason: str) -> None:
        with self._lock:
            if self._in_flight.pop(job.id, None) is None:
                return
        if job.tries < MAX_TRIES:
            log.warning("on-demand job for %s lost by worker %s; sent again", job.path, job.worker)
            self.put_back(job)
        else:
            log.error("on-demand job for %s failed: %s", job.path, reason)
            job.settle(Outcome(error=reason))

    def close(self, reason: str, queued_only: bool = False) -> None:
        """Refuse new jobs and answer the waiting ones with ``reason`` (the queued ones only, if asked)."""
        with self._lock:
            self._closed = True
            jobs = list(self._queue)
            self._queue.clear()
            if not queued_only:
                jobs.extend(self._in_flight.values())
                self._in_flight.clear()
        for job in jobs:
            job.settle(Outcome(error=reason))
