"""The Dispatcher decides *where* a queued frame goes and *when* it is sent again.

It binds a PUSH socket with the lowest high-water mark; workers connect with PULL (RCVHWM 1).  PUSH
round-robins over connected workers, so the dispatcher also keeps at most ``CREDIT_PER_WORKER`` frames
in flight per live worker: frames wait in the ledger's queue, not in some worker's socket buffer.

A dispatched frame that no worker started within ``dispatch_timeout_s`` (lost in a dead worker's buffer)
goes back to the queue free of charge; one whose worker died or overran ``frame_timeout_s`` goes back
with a try counted against it, and after ``max_tries`` it is failed instead of looping.  A worker that
overran the frame timeout is reported as hung, for the service to kill.  Deadlines are ``time.monotonic()``.

On-demand jobs (HTTP queries, :mod:`spotfinder_daemon.ondemand`) share the same credit and go first: a query waits
at most for the frames its worker already holds, never for the watcher's backlog.  The lane keeps its
own resend rules; the dispatcher only tells it when time passes and workers are lost.

Every job leaves as a :class:`~spotfinder_daemon.protocol.Job`: lane ``query`` for the lane's jobs, lane ``watch``
with the ledger id for frames, both with the service's parameters, its ``verify_md5`` setting and the workers'
budget per frame (memory, time); a frame's
job names the watched folders as its ``roots``, for the worker to check the file it opens against.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import zmq

from spotfinder_core import Params

from . import protocol
from .ledger import Frame, Ledger
from .ondemand import Lane

log = logging.getLogger("spotfinder.dispatcher")

CREDIT_PER_WORKER = 2  # one being analysed, one waiting at the worker


@dataclass
class Expiry:
    """What :meth:`Dispatcher.expire` found: frames out of tries (to fail) and workers that hung."""

    exhausted: list[tuple[Frame, str]] = field(default_factory=list)
    hung: set[str] = field(default_factory=set)


class Dispatcher:
    def __init__(self, *, context: zmq.Context, endpoint: str, ledger: Ledger, params: Params,
                 dispatch_timeout_s: float, max_tries: int, lane: Lane, verify_md5: bool = True,
                 watch_roots: tuple[str, ...] | None = None, budget_mb: int | None = None,
                 budget_s: float | None = None):
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 1)
        self.socket.setsockopt(zmq.LINGER, 0)  # unsent jobs stay queued in the ledger anyway
        self.socket.bind(endpoint)
        self.ledger = ledger
        self.params = params
        self.verify_md5 = verify_md5  # sent with every job, so remote workers follow the service's setting
        self.budget = {"budget_mb": budget_mb, "budget_s": budget_s}  # the worker's budget, sent the same way
        self.dispatch_timeout_s = dispatch_timeout_s
        self.max_tries = max_tries
        self.lane = lane
        self.watch_roots = None if watch_roots is None else tuple(os.path.realpath(f) for f in watch_roots)

    def dispatch(self, workers_alive: int) -> int:
        """Send on-demand jobs, then queued frames, while live workers have room; how many were sent."""
        in_flight = self.ledger.counts()["dispatched"] + self.lane.in_flight()
        room = workers_alive * CREDIT_PER_WORKER - in_flight
        sent = 0
        jobs = self.lane.take(room)
        for n, job in enumerate(jobs):
            try:
                self.socket.send(protocol.encode(replace(job.message(self.verify_md5), **self.budget)), zmq.NOBLOCK)
            except zmq.Again:
                for unsent in reversed(jobs[n:]):
                    self.lane.put_back(unsent)
                return sent
            self.lane.dispatched(job, time.monotonic())
            sent += 1
        for frame in self.ledger.queued(room - sent):
            try:
                self.socket.send(protocol.encode(self._frame_job(frame)), zmq.NOBLOCK)
            except zmq.Again:  # every worker's pipe is full: try again on the next pass
                break
            self.ledger.mark_dispatched(frame.id, time.monotonic() + self.dispatch_timeout_s)
            sent += 1
        return sent

    def _frame_job(self, frame: Frame) -> protocol.Job:
        return protocol.Job(lane=protocol.WATCH, id=frame.id,
                            frame=protocol.FrameRef(path=frame.path, index=frame.frame_index), params=self.params,
                            verify_md5=self.verify_md5, roots=self.watch_roots, **self.budget)

    def expire(self, now: float) -> Expiry:
        """Re-queue overdue frames and jobs; the frames that used up their tries and must be failed (the lane
        answers its own exhausted jobs), and the workers that overran the frame timeout."""
        expiry = Expiry(hung=set(self.lane.expire(now)))
        for frame in self.ledger.overdue(now):
            started = frame.worker is not None
            if not started:
                log.warning("frame %s was not taken by any worker within %.0f s; queued again",
                            frame.path, self.dispatch_timeout_s)
            else:
                expiry.hung.add(frame.worker)
            if not self.ledger.release(frame.id, charge=started, max_tries=self.max_tries):
                expiry.exhausted.append((frame, "gave up after %d tries: no worker finished the frame in time"
                                         % self.max_tries))
            elif started:
                log.warning("worker %s overran the frame timeout on %s; queued again", frame.worker, frame.path)
        return expiry

    def worker_lost(self, worker_id: str, charge: bool) -> list[tuple[Frame, str]]:
        """Re-queue the frames and jobs a dead or departed worker held; the frames that used up their tries."""
        exhausted = []
        for frame in self.ledger.held_by(worker_id):
            if self.ledger.release(frame.id, charge=charge, max_tries=self.max_tries):
                log.warning("frame %s queued again: its worker %s is gone", frame.path, worker_id)
            else:
                exhausted.append((frame, "failed: its worker died on it %d times" % self.max_tries))
        self.lane.worker_lost(worker_id)
        return exhausted

    def close(self) -> None:
        self.socket.close()
