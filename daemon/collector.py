"""The Collector: the only writer of results and the only publisher.

It binds the PULL socket workers push to, feeds the roll of workers from their messages, records
``started`` jobs in the ledger, and turns every result or failure into a ledger transition plus one PUB
message.  A result for a frame that is already final (a re-sent frame finished twice) is dropped here,
which is what makes the stored record exactly-once.

The results endpoint may be bound on a reachable interface for remote workers, so every message is
checked for shape (:func:`malformed`) before it is handled, and one that still fails costs only itself.

Results of on-demand jobs (HTTP queries) go to the waiting query through the lane instead: they are
not frames of a collection, so they are neither recorded nor published, only counted in the metrics.
"""
from __future__ import annotations

import collections
import json
import logging
import time

import zmq

from . import publisher as messages
from .ledger import Frame, Ledger
from .metrics import Metrics
from .ondemand import Lane
from .publisher import Publisher
from .roll import Roll

log = logging.getLogger("spotfinder.collector")

RATE_WINDOW_S = 10.0
KINDS = ("ready", "heartbeat", "started", "result", "bye")


def malformed(message: object) -> str | None:
    """Why a worker's message cannot be handled, or None when its shape is right."""
    if not isinstance(message, dict):
        return "not a JSON object"
    kind = message.get("type")
    if kind not in KINDS:
        return "unknown type %r" % (kind,)
    if not isinstance(message.get("worker"), str) or not message["worker"]:
        return "no worker id"
    pid = message.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        return "bad pid %r" % (pid,)
    if kind in ("started", "result"):
        job_id = message.get("id")
        if isinstance(job_id, bool) or not isinstance(job_id, (int, str)):
            return "bad job id %r" % (job_id,)
        t_start = message.get("t_start")
        if t_start is not None and (isinstance(t_start, bool) or not isinstance(t_start, (int, float))):
            return "bad t_start %r" % (t_start,)
    if kind == "result":
        if not isinstance(message.get("result"), dict):
            return "result is not an object"
        if not isinstance(message.get("text"), (str, type(None))):
            return "text is not a string"
    return None


class Collector:
    def __init__(self, context: zmq.Context, endpoint: str, ledger: Ledger, publisher: Publisher,
                 frame_timeout_s: float, lane: Lane, metrics: Metrics, roll: Roll):
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.ledger = ledger
        self.publisher = publisher
        self.frame_timeout_s = frame_timeout_s
        self.lane = lane
        self.metrics = metrics
        self.roll = roll
        self.recent_done: collections.deque[float] = collections.deque()
        self.last_done = 0.0

    def receive_all(self) -> int:
        """Handle every message waiting on the socket; how many were received (good or not)."""
        received = 0
        while True:
            try:
                data = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return received
            received += 1
            try:
                message = json.loads(data)
            except ValueError:
                log.warning("dropped a message that is not JSON")
                continue
            why = malformed(message)
            if why is not None:
                log.warning("dropped a malformed worker message (%s): %.200r", why, message)
                continue
            try:
                self._handle(message)
            except Exception as exc:  # a bug or a message we did not foresee costs that message, not the service
                log.error("handling a %s message from %s raised %s: %s", message["type"], message["worker"],
                          type(exc).__name__, exc)

    def _handle(self, message: dict) -> None:
        kind, worker_id = message["type"], message["worker"]
        if self.roll.is_dead(worker_id):
            if kind == "result":  # finished before it died: still a good result
                self._take_result(message, worker_id)
            elif kind == "started":  # it died holding this job: settle it as a charged loss
                self._started(message, worker_id)
                self.roll.died(worker_id)
            return
        if kind == "bye":
            if self.roll.left(worker_id):
                log.info("worker %s left", worker_id)
            return
        joined = worker_id not in self.roll.workers
        info = self.roll.heard(worker_id, message.get("pid"), message.get("host"))
        if joined:
            log.info("worker %s (pid %s on %s) joined", worker_id, info.pid, info.host)
        if kind == "heartbeat":
            info.busy = message.get("busy")
        elif kind == "started":
            info.busy = message["id"]
            self._started(message, worker_id)
        elif kind == "result":
            info.busy = None
            info.frames_done += 1
            self._take_result(message, worker_id)

    def _started(self, message: dict, worker_id: str) -> None:
        deadline = time.monotonic() + self.frame_timeout_s
        if self.lane.owns(message["id"]):
            self.lane.started(message["id"], worker_id, deadline)
        else:
            self.ledger.mark_started(message["id"], worker_id, deadline)

    def _take_result(self, message: dict, worker_id: str) -> None:
        if not self.lane.owns(message["id"]):
            self._publish_result(message, worker_id)
        elif self.lane.finished(message["id"], message["result"], message.get("text")) is not None:
            self._count_done("ondemand", message["result"])

    def _publish_result(self, message: dict, worker_id: str) -> None:
        result, t_start = message["result"], message.get("t_start")
        published = self.ledger.finish(
            message["id"], "done", time.time(),
            lambda seq, frame: messages.frame_message(seq, frame, result, worker_id, t_start))
        if published is None:
            log.info("duplicate result for frame %s from %s dropped", message["id"], worker_id)
            return
        self.publisher.send(published)  # first: nothing between the commit and the send may raise
        body = published["body"]
        log.debug("result seq %d %s: %s", body["seq"], body["file"], body["status"])
        self._count_done("watch", result)

    def _count_done(self, lane: str, result: dict | None) -> None:
        now = time.monotonic()
        self.last_done = now
        self.recent_done.append(now)
        self.metrics.frame(lane, result)

    def fail(self, frame: Frame, reason: str) -> None:
        """Publish the error result of a frame the service gave up on."""
        published = self.ledger.finish(frame.id, "failed", time.time(),
                                       lambda seq, current: messages.failure_message(seq, current, reason))
        if published is not None:
            self.publisher.send(published)
            log.error("frame %s failed: %s", frame.path, reason)
            self._count_done("watch", None)

    def service_error(self, text: str, collection: str | None = None, **fields) -> None:
        """Publish (and store) an error that is not a frame's result."""
        self.publisher.send(self.ledger.record(lambda seq: messages.error_message(seq, text, collection, **fields)))
        log.warning("%s", text)
        self.metrics.error("service")

    def heartbeat(self, **fields) -> None:
        """A heartbeat, with ``last_seq``: the newest stored message, so a subscriber can tell a gap in the
        results (fetch it from /results) from seqs taken by heartbeats."""
        last_stored = self.ledger.last_stored_seq()
        topic, body = messages.heartbeat_message(self.ledger.next_seq(), last_seq=last_stored, **fields)
        self.publisher.send({"topic": topic, "body": body})

    def frames_per_s(self) -> float:
        now = time.monotonic()
        while self.recent_done and self.recent_done[0] < now - RATE_WINDOW_S:
            self.recent_done.popleft()
        return round(len(self.recent_done) / RATE_WINDOW_S, 3)

    def close(self) -> None:
        self.socket.close()
