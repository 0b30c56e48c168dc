"""The on-demand lane: single-frame HTTP queries, analysed by the same workers ahead of the watcher's backlog.

HTTP threads :meth:`Lane.submit` a job and wait on it; only the main thread takes jobs out, tracks them in
flight and settles them, so every ZeroMQ socket stays on the main thread.  Jobs are not frames of a
collection: they never enter the ledger and are not published.

Admission is by expected wait, the way Apache queued clients until a CPU was free: a query waits while
the queries ahead of it (queued or at a worker) x the recent time per frame / the workers leave it time to
be answered within its deadline, and at most ``capacity`` queries wait at once (each one is a blocked
HTTP thread).  Beyond either, or with no worker to run it, it is refused at once (the caller answers 503,
with a Retry-After from the same estimate): nothing waits for room, and nothing waits for a 504 it could
have been told about.  The time per frame is the lane's own: a running estimate of the start-to-result
times of its finished jobs, quick to rise and slow to fall.

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
import math
import threading
import time
from dataclasses import dataclass, field

from spotfinder_core import Params

from . import protocol
from .wakeup import Wakeup

log = logging.getLogger("spotfinder.ondemand")

MAX_TRIES = 2  # the first try and one resend
PRIOR_FRAME_S = 1.0  # time per frame assumed until the lane has timed a job (a PILATUS 6M takes ~0.1-0.3 s)
# Weights of the newest job's time in the running estimate: a slower frame counts ten times as much as a
# faster one, so the estimate rides near the slow end of the spread (a query admitted on it is not late
# when the frames slow down under load) and a slowdown shows within a few frames.
FRAME_S_RISE = 0.5
FRAME_S_FALL = 0.05
# Admit only while the expected answer comes within this share of the deadline: frames that slow down after
# admission (another load on the host) still leave the query its answer in time.
DEADLINE_SHARE = 0.5


class LaneFull(Exception):
    """Refused at once (answer 503): ``reason`` for the client, ``retry_after_s`` when room is expected (None
    when no worker runs, so no estimate exists)."""

    def __init__(self, reason: str, retry_after_s: int | None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


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
    roots: tuple[str, ...] | None = None  # the folders the worker checks the opened frame against
    index: int | None = None  # the frame inside a multi-frame file (an HDF5 series), None for a CBF
    tries: int = 0
    worker: str | None = None
    deadline: float | None = None
    started_at: float | None = None  # when its worker started it (times the lane's frames)
    outcome: Outcome | None = None
    abandoned: bool = False
    _settled: threading.Event = field(default_factory=threading.Event, repr=False)

    def message(self, verify_md5: bool) -> protocol.Job:
        """The job a worker receives."""
        return protocol.Job(lane=protocol.QUERY, id=self.id, frame=protocol.FrameRef(path=self.path, index=self.index),
                            params=self.params, verify_md5=verify_md5, reply=self.reply, roots=self.roots)

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
        self._workers = 0  # the workers the lane counts on, set by the main thread (set_workers)
        self._frame_s = PRIOR_FRAME_S
        self._timed = False  # whether _frame_s is measured yet (the first measurement replaces the prior)

    # ----- HTTP threads ------------------------------------------------------------------------------------
    def submit(self, path: str, params: Params, reply: str | None, deadline_s: float | None = None, *,
               roots: tuple[str, ...] | None = None, index: int | None = None) -> Job:
        """Queue a job for frame ``index`` of ``path`` (None: a single-frame file) that must be answered within
        ``deadline_s`` (None: bounded by ``capacity`` only), its frame checked by the worker against ``roots``;
        LaneFull when it cannot be (no worker, the expected wait too long, too many waiting), LaneClosed when the
        service is stopping."""
        with self._lock:
            if self._closed:
                raise LaneClosed()
            if deadline_s is not None and not self._workers:
                raise LaneFull("no worker is running (workers: 0 and no remote worker connected, or all paused)",
                               None)
            waiting = len(self._queue) + len(self._in_flight)
            limit = self.capacity if deadline_s is None else self._admit_limit(deadline_s)
            if waiting >= limit:
                raise LaneFull("%d queries ahead of it" % waiting, self._retry_after_s(waiting - limit + 1))
            job = Job(next(self._ids), path, params, reply, roots, index)
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

    def frame_s(self) -> float:
        """The recent time per frame (the prior until a job was timed)."""
        with self._lock:
            return self._frame_s

    def expected_wait_s(self) -> float:
        """How long a query arriving now would wait before a worker starts it; infinite with no worker."""
        with self._lock:
            return self._wait_s(len(self._queue) + len(self._in_flight)) if self._workers else math.inf

    def admit_limit(self, deadline_s: float) -> int:
        """How many queries may wait (queued or at a worker) before one with ``deadline_s`` is refused."""
        with self._lock:
            return self._admit_limit(deadline_s)

    def _wait_s(self, ahead: int) -> float:
        return ahead * self._frame_s / self._workers

    def _retry_after_s(self, excess: int) -> int | None:
        """Whole seconds until ``excess`` waiting queries are answered (None with no worker to answer them)."""
        return max(1, math.ceil(self._wait_s(excess))) if self._workers else None

    def _admit_limit(self, deadline_s: float) -> int:
        """How many waiting queries refuse a new one: more would leave it no answer (its wait plus its own
        frame) within DEADLINE_SHARE of its deadline, or break the memory bound; an idle lane takes any."""
        if not self._workers:
            return 0
        in_time = math.floor((DEADLINE_SHARE * deadline_s / self._frame_s - 1) * self._workers) + 1
        return max(1, min(self.capacity, in_time))

    @property
    def closed(self) -> bool:
        return self._closed

    # ----- main thread -------------------------------------------------------------------------------------
    def fileno(self) -> int:
        """Readable when jobs were submitted (for the main loop's poller)."""
        return self._wakeup.fileno()

    def set_workers(self, count: int) -> None:
        """The workers the lane counts on: the live ones, or the local ones being (re)started."""
        with self._lock:
            self._workers = count

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
                job.worker, job.deadline, job.started_at = worker_id, deadline, time.monotonic()
                job.tries += 1

    def finished(self, job_id: int, result: dict, text: str | None) -> Job | None:
        """Settle a job with its worker's result; None for a job already settled (a resent one finished twice)."""
        with self._lock:
            job = self._in_flight.pop(job_id, None)
            if job is not None and job.started_at is not None:
                self._time_frame(time.monotonic() - job.started_at)
        if job is not None:
            job.settle(Outcome(result=result, text=text))
        return job

    def _time_frame(self, seconds: float) -> None:
        """Fold one job's start-to-result time into the running estimate (under the lock)."""
        if self._timed:
            self._frame_s += (FRAME_S_RISE if seconds > self._frame_s else FRAME_S_FALL) * (seconds - self._frame_s)
        else:
            self._frame_s, self._timed = seconds, True

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
