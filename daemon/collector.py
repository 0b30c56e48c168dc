"""The Collector: the only writer of results and the only publisher.

It binds the PULL socket workers push to, keeps the roll of workers from their ``ready``/``heartbeat``
messages, records ``started`` jobs in the ledger, and turns every result or failure into a ledger
transition plus one PUB message.  A result for a frame that is already final (a re-sent frame finished
twice) is dropped here, which is what makes publication exactly-once.

Results of on-demand jobs (HTTP queries) go to the waiting query through the lane instead: they are
not frames of a collection, so they are neither recorded nor published, only counted in the metrics.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import zmq

from . import publisher as messages
from .ledger import Frame, Ledger
from .metrics import Metrics
from .ondemand import Lane
from .publisher import Publisher

log = logging.getLogger("spotfinder.collector")

RATE_WINDOW_S = 10.0


@dataclass
class WorkerInfo:
    id: str
    pid: int | None
    host: str | None
    first_seen: float
    last_seen: float
    busy: int | None = None
    frames_done: int = 0


class Collector:
    def __init__(self, context: zmq.Context, endpoint: str, ledger: Ledger, publisher: Publisher,
                 frame_timeout_s: float, lane: Lane, metrics: Metrics):
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.ledger = ledger
        self.publisher = publisher
        self.frame_timeout_s = frame_timeout_s
        self.lane = lane
        self.metrics = metrics
        self.workers: dict[str, WorkerInfo] = {}
        self.departed: list[str] = []  # workers that said goodbye, for the service to settle their frames
        self.dead: set[str] = set()  # workers known dead: their queued messages must not bring them back
        self.recent_done: collections.deque[float] = collections.deque()
        self.last_done = 0.0

    def receive_all(self) -> int:
        """Handle every message waiting on the socket; how many."""
        handled = 0
        while True:
            try:
                message = self.socket.recv_json(zmq.NOBLOCK)
            except zmq.Again:
                return handled
            except ValueError:
                log.warning("dropped a message that is not JSON")
                continue
            handled += 1
            try:
                self._handle(message)
            except (KeyError, TypeError) as exc:
                log.warning("dropped a malformed %s message: missing or bad %s", message.get("type"), exc)

    def _handle(self, message: dict) -> None:
        now = time.time()
        kind, worker_id = message["type"], message["worker"]
        info = self.workers.get(worker_id)
        if worker_id in self.dead:
            if kind == "result":  # finished before it died: still a good result
                self._take_result(message, worker_id)
            return
        if kind == "bye":
            if info is not None:
                del self.workers[worker_id]
                self.departed.append(worker_id)
                log.info("worker %s left", worker_id)
            return
        if info is None:
            info = self.workers[worker_id] = WorkerInfo(worker_id, message.get("pid"), message.get("host"), now, now)
            log.info("worker %s joined", worker_id)
        info.last_seen = now
        if kind == "heartbeat":
            info.busy = message.get("busy")
        elif kind == "started":
            info.busy = message["id"]
            if self.lane.owns(message["id"]):
                self.lane.started(message["id"], worker_id, now)
            else:
                self.ledger.mark_started(message["id"], worker_id, now, now + self.frame_timeout_s)
        elif kind == "result":
            info.busy = None
            info.frames_done += 1
            self._take_result(message, worker_id)

    def _take_result(self, message: dict, worker_id: str) -> None:
        if not self.lane.owns(message["id"]):
            self._publish_result(message, worker_id)
        elif self.lane.finished(message["id"], message["result"], message.get("text")) is not None:
            self.metrics.frame("ondemand", message["result"])
            self._count_done()

    def _publish_result(self, message: dict, worker_id: str) -> None:
        result, t_start = message["result"], message.get("t_start")
        published = self.ledger.finish(
            message["id"], "done", time.time(),
            lambda seq, frame: messages.frame_message(seq, frame, result, worker_id, t_start))
        if published is None:
            log.info("duplicate result for frame %s from %s dropped", message["id"], worker_id)
            return
        self._count_done()
        self.metrics.frame("watch", result)
        self.publisher.send(published)
        body = published["body"]
        log.debug("result seq %d %s: %s", body["seq"], body["file"], body["status"])

    def _count_done(self) -> None:
        now = time.monotonic()
        self.last_done = now
        self.recent_done.append(now)

    def fail(self, frame: Frame, reason: str) -> None:
        """Publish the error result of a frame the service gave up on."""
        published = self.ledger.finish(frame.id, "failed", time.time(),
                                       lambda seq, current: messages.failure_message(seq, current, reason))
        if published is not None:
            log.error("frame %s failed: %s", frame.path, reason)
            self._count_done()
            self.metrics.frame("watch", None)
            self.publisher.send(published)

    def service_error(self, text: str, collection: str | None = None, **fields) -> None:
        """Publish (and store) an error that is not a frame's result."""
        log.warning("%s", text)
        self.metrics.error("service")
        self.publisher.send(self.ledger.record(lambda seq: messages.error_message(seq, text, collection, **fields)))

    def heartbeat(self, **fields) -> None:
        topic, body = messages.heartbeat_message(self.ledger.next_seq(), **fields)
        self.publisher.send({"topic": topic, "body": body})

    def frames_per_s(self) -> float:
        now = time.monotonic()
        while self.recent_done and self.recent_done[0] < now - RATE_WINDOW_S:
            self.recent_done.popleft()
        return round(len(self.recent_done) / RATE_WINDOW_S, 3)

    def silent_workers(self, liveness_s: float) -> list[str]:
        """Workers not heard from for ``liveness_s``: they are dropped from the roll and returned."""
        cutoff = time.time() - liveness_s
        gone = [w for w, info in self.workers.items() if info.last_seen < cutoff]
        for worker_id in gone:  # not marked dead: a worker back from a network hiccup rejoins by its heartbeat
            del self.workers[worker_id]
        return gone

    def drop_worker(self, worker_id: str) -> None:
        """Forget a worker whose process is known to have exited."""
        self.workers.pop(worker_id, None)
        self.dead.add(worker_id)

    def close(self) -> None:
        self.socket.close()
