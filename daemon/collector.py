"""The Collector: the only writer of results and the only publisher.

It binds the PULL socket workers push their reports to (:mod:`spotfinder_daemon.protocol`): ``Ready`` and
``Heartbeat`` feed the roll of workers, ``Bye`` takes a worker off it, ``Started`` and ``Result`` of lane
``watch`` become ledger transitions, each result plus one PUB message.  A result for a frame that is already
final (a re-sent frame finished twice) is dropped here, which is what makes the stored record exactly-once.

The results endpoint may be bound on a reachable interface for remote workers, so every message is decoded
and checked (:func:`~spotfinder_daemon.protocol.decode_report`) before it is handled: a malformed one is dropped
with one warning, and one that still fails costs only itself.

While the ledger refuses writes (a full disk, a read-only folder) the ledger's part of each report waits in
memory, in order, and is retried at every pass (a :class:`~spotfinder_daemon.ledger.WriteBacklog`): the service
stays up and unhealthy, and no result is lost or published before it is stored.

Reports of lane ``query`` (on-demand HTTP queries) go to the waiting query through the lane instead: they
are not frames of a collection, so they are neither recorded nor published, only counted in the metrics.
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import zmq

from . import protocol
from . import publisher as messages
from .ledger import Frame, Ledger, WriteBacklog
from .metrics import Metrics
from .ondemand import Lane
from .publisher import Publisher
from .roll import Roll

log = logging.getLogger("spotfinder.collector")

RATE_WINDOW_S = 10.0


class Collector:
    def __init__(self, *, context: zmq.Context, endpoint: str, ledger: Ledger, publisher: Publisher,
                 frame_timeout_s: float, lane: Lane, metrics: Metrics, roll: Roll,
                 on_result: Callable[[dict], None] = lambda body: None):
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.ledger = ledger
        self.publisher = publisher
        self.frame_timeout_s = frame_timeout_s
        self.lane = lane
        self.metrics = metrics
        self.roll = roll
        self.on_result = on_result  # told every stored result message (or failure), after it was sent
        self.recent_done: collections.deque[float] = collections.deque()
        self.last_done = 0.0
        self.unwritten = WriteBacklog()  # the ledger's part of reports, while the ledger refuses writes

    def _write(self, action: Callable[[], None]) -> None:
        """Run a ledger write (and what follows its commit) now, or after the ones already waiting."""
        self.unwritten.add(action)
        self.unwritten.retry()

    def receive_all(self) -> int:
        """Handle every message waiting on the socket; how many were received (good or not)."""
        self.unwritten.retry()
        received = 0
        while True:
            try:
                data = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return received
            received += 1
            try:
                report = protocol.decode_report(data)
            except protocol.ProtocolError as exc:
                log.warning("dropped a malformed worker message (%s): %.200r", exc, data)
                continue
            try:
                self._handle(report)
            except Exception as exc:  # a bug or a message we did not foresee costs that message, not the service
                log.error("handling a %s message from %s raised %s: %s", report.TYPE, report.worker,
                          type(exc).__name__, exc)

    def _handle(self, report: protocol.Report) -> None:
        worker_id = report.worker
        if self.roll.is_dead(worker_id):
            if isinstance(report, protocol.Result):  # finished before it died: still a good result
                self._take_result(report)
            elif isinstance(report, protocol.Started):  # it died holding this job: settle it as a charged loss
                self._started(report)
                self.roll.died(worker_id)
            return
        if isinstance(report, protocol.Bye):
            if self.roll.left(worker_id):
                log.info("worker %s left", worker_id)
            return
        joined = worker_id not in self.roll.workers
        info = self.roll.heard(worker_id, report.pid, report.host)
        if joined:
            log.info("worker %s (pid %s on %s) joined", worker_id, info.pid, info.host)
        if isinstance(report, protocol.Heartbeat):
            info.busy = report.busy
        elif isinstance(report, protocol.Started):
            info.busy = report.key
            self._started(report)
        elif isinstance(report, protocol.Result):
            info.busy = None
            info.frames_done += 1
            self._take_result(report)

    def _started(self, report: protocol.Started) -> None:
        deadline = time.monotonic() + self.frame_timeout_s
        if report.lane == protocol.QUERY:
            self.lane.started(report.id, report.worker, deadline)
        else:
            self._write(lambda: self.ledger.mark_started(report.id, report.worker, deadline))

    def _take_result(self, report: protocol.Result) -> None:
        if report.lane == protocol.WATCH:
            self._write(lambda: self._publish_result(report))
        elif self.lane.finished(report.id, report.result, report.text) is not None:
            self._count_done("ondemand", report.result)

    def _publish_result(self, report: protocol.Result) -> None:
        result, worker_id = report.result, report.worker
        published = self.ledger.finish(
            report.id, "done", time.time(),
            lambda seq, frame: messages.frame_message(seq, frame, result, worker_id, report.t_start))
        if published is None:
            log.info("duplicate result for frame %s from %s dropped", report.id, worker_id)
            return
        self.publisher.send(published)  # first: nothing between the commit and the send may raise
        body = published["body"]
        self.on_result(body)
        log.debug("result seq %d %s: %s", body["seq"], body["file"], body["status"])
        self._count_done("watch", result)

    def _count_done(self, lane: str, result: dict | None) -> None:
        now = time.monotonic()
        self.last_done = now
        self.recent_done.append(now)
        self.metrics.frame(lane, result)

    def fail(self, frame: Frame, reason: str) -> None:
        """Publish the error result of a frame the service gave up on."""
        self._write(lambda: self._publish_failure(frame, reason))

    def _publish_failure(self, frame: Frame, reason: str) -> None:
        published = self.ledger.finish(frame.id, "failed", time.time(),
                                       lambda seq, current: messages.failure_message(seq, current, reason))
        if published is not None:
            self.publisher.send(published)
            self.on_result(published["body"])
            log.error("frame %s failed: %s", frame.path, reason)
            self._count_done("watch", None)

    def service_error(self, text: str, collection: str | None = None, **fields) -> None:
        """Publish (and store) an error that is not a frame's result."""
        self._write(lambda: self.publisher.send(
            self.ledger.record(lambda seq: messages.error_message(seq, text, collection, **fields))))
        log.warning("%s", text)
        self.metrics.error("service")

    def record(self, compose: Callable[[int], tuple[str, dict]]) -> None:
        """Store and publish a message that is no frame's result (a collection's start, summary or end)."""
        self._write(lambda: self.publisher.send(self.ledger.record(compose)))

    def heartbeat(self, **fields) -> None:
        """A heartbeat, with the newest seq (``last_seq``) and the ledger's id: a subscriber that has not seen
        that seq of that ledger fetches what it missed from /results."""
        topic, body = messages.heartbeat_message(ledger=self.ledger.id, last_seq=self.ledger.last_seq(), **fields)
        self.publisher.send({"topic": topic, "body": body})

    def frames_per_s(self) -> float:
        now = time.monotonic()
        while self.recent_done and self.recent_done[0] < now - RATE_WINDOW_S:
            self.recent_done.popleft()
        return round(len(self.recent_done) / RATE_WINDOW_S, 3)

    def close(self) -> None:
        self.socket.close()
