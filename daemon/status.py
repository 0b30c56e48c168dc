"""What the service says about itself: its health, the ``/status`` snapshot, the heartbeat's fields, systemd's
``STATUS=`` line, and the ``/status``, ``/results`` and ``/metrics`` routes.

The main thread owns the parts it reads, so it computes health and a snapshot at every supervision pass
(:meth:`Status.refresh`); HTTP threads only read that snapshot under a lock, or the ledger on a connection of
their own (``/results``), and never touch a part directly.
"""
from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from . import ledger as ledger_module
from .collector import Collector
from .config import Settings
from .http import HttpServer, Request, Response, error_response, json_response
from .ledger import Ledger
from .metrics import Metrics
from .ondemand import Lane
from .periodic import PeriodicTasks
from .pool import WorkerPool
from .publisher import heartbeat_message
from .roll import Roll
from .watcher import Watcher

RESULTS_LIMIT = 1000
# /events streams hold an HTTP connection each: at most this many at once (the rest get 503), so browsers
# left open never take the connections queries and monitoring need.
EVENT_STREAMS = 16
MAX_SEQ = 1 << 63  # a seq beyond SQLite's 64-bit integers names no stored message
SINCE_RANGE = "since must be from 0 to 2**63-1"
EVENTS_POLL_S = 0.2  # how often a stream looks for new stored messages
EVENTS_KEEPALIVE_S = 10.0  # a comment line after this long without a message (keeps proxies and clients awake)
AWAITING_REMOTE = "no live workers (workers: 0 and no remote worker)"
# local workers started, none joined yet: each loads its compiled kernels (a second or two) or, on a first start
# after an install or an upgrade of numba, compiles them (bench_startup.py: ~8 s on the 2-core EPYC)
PREPARING = "workers preparing: loading or compiling the analysis kernels"


class Status:
    def __init__(self, *, settings: Settings, ledger: Ledger, roll: Roll, pool: WorkerPool, collector: Collector,
                 lane: Lane, watcher: Watcher, metrics: Metrics, tasks: PeriodicTasks, lifecycle: Callable[[], str]):
        self.settings = settings
        self.ledger = ledger
        self.roll = roll
        self.pool = pool
        self.collector = collector
        self.lane = lane
        self.watcher = watcher
        self.metrics = metrics
        self.tasks = tasks
        self.lifecycle = lifecycle
        self.started = time.monotonic()
        self.progress_mark = self.started  # the last time the queue was empty or a frame finished
        self.counts = dict.fromkeys(ledger_module.STATES, 0)
        self.oldest_seen: float | None = None
        self._snapshot: dict = {}
        self._lock = threading.Lock()
        self._streams = threading.BoundedSemaphore(EVENT_STREAMS)

    # ----- main thread -------------------------------------------------------------------------------------
    def observe_ledger(self) -> None:
        """Read the ledger's counts and note progress (after each supervision pass)."""
        self.counts = self.ledger.counts()
        self.oldest_seen = self.ledger.oldest_seen()
        if self.counts["queued"] + self.counts["dispatched"] == 0 or self.collector.last_done > self.progress_mark:
            self.progress_mark = time.monotonic()

    def health(self) -> tuple[bool, str]:
        """Healthy = the ledger takes writes, the watcher runs, some worker is alive (a query can come at any
        time), the queue drains and no frame waits for completeness past its timeout and a reconciliation."""
        s = self.settings
        if self.ledger.write_error:
            return False, "the ledger cannot be written (%s): frames wait" % self.ledger.write_error
        if not self.watcher.alive():
            return False, "the folder watcher stopped"
        if not self.roll.workers:
            if self.pool.running() and not self.pool.paused:
                return False, PREPARING
            return False, "no live workers" if self.pool.count else AWAITING_REMOTE
        stall_s = s.dispatch_timeout_s + s.frame_timeout_s
        if time.monotonic() - self.progress_mark > stall_s:
            return False, "queue not draining for %.0f s" % stall_s
        stuck_s = 2 * s.incomplete_timeout_s + s.reconcile_interval_s
        if self.oldest_seen is not None and time.time() - self.oldest_seen > stuck_s:
            return False, "a frame has waited for completeness for over %.0f s" % stuck_s
        if self.degraded():
            return True, "degraded: %d of %d workers alive" % (len(self.roll.workers), self.pool.count)
        return True, "ok"

    def degraded(self) -> bool:
        """Fewer live workers than local ones configured (starting, hung, replaced, paused): frames still
        flow, at a lower rate."""
        return len(self.roll.workers) < self.pool.count

    def fit_to_run(self) -> tuple[bool, str]:
        """What systemd is told (READY, then WATCHDOG): healthy, or a remote-workers-only service (workers: 0)
        that waits for its first remote worker, which a restart would not bring."""
        healthy, why = self.health()
        return healthy or why == AWAITING_REMOTE, why

    def refresh(self) -> None:
        """Tell the on-demand lane how many workers it counts on, build the snapshot HTTP threads read, and set
        the gauges."""
        self.lane.set_workers(len(self.roll.workers) or (0 if self.pool.paused else self.pool.count))
        counts = self.counts
        now = time.monotonic()
        registered = dict(self.roll.workers)
        workers = [_worker(worker_id, registered.pop(worker_id, None), pid, local=True, now=now)
                   for worker_id, pid in self.pool.running().items()]
        workers.extend(_worker(info.id, info, info.pid, local=False, now=now) for info in registered.values())
        snapshot = {
            "state": self.lifecycle(),
            "uptime_s": round(now - self.started, 3),
            "workers": workers,
            "workers_alive": len(self.roll.workers),
            "workers_configured": self.pool.count,
            "degraded": self.degraded(),
            "workers_paused": self.pool.paused,
            "queue_depth": counts["queued"],
            "in_flight": counts["dispatched"],
            "waiting_complete": counts["seen"],
            "frames_done": counts["done"],
            "frames_failed": counts["failed"],
            "frames_per_s": self.collector.frames_per_s(),
            "ondemand_queue": self.lane.depth(),
            "ondemand_in_flight": self.lane.in_flight(),
            "ondemand_frame_s": round(self.lane.frame_s(), 3),
            "ondemand_expected_wait_s": _finite(self.lane.expected_wait_s()),
            "ondemand_admit_limit": self.lane.admit_limit(self.settings.ondemand_timeout_s),
            "last_seq": self.ledger.last_seq(),
            "ledger": self.ledger.id,
            "ledger_error": self.ledger.write_error,
            "watcher_alive": self.watcher.alive(),
            "oldest_waiting_s": None if self.oldest_seen is None else round(time.time() - self.oldest_seen, 3),
            "watch": list(self.settings.watch),
            "pub": self.settings.pub,
            "periodic_tasks": self.tasks.table(),
        }
        snapshot["healthy"], snapshot["health"] = self.health()
        self.metrics.queue.set(counts["queued"])
        self.metrics.in_flight.set(counts["dispatched"])
        self.metrics.workers.set(snapshot["workers_alive"])
        with self._lock:
            self._snapshot = snapshot

    def line(self) -> str:
        """systemd's one-line STATUS=."""
        snap = self.snapshot()
        workers = "%d workers" % snap["workers_alive"]
        if snap["degraded"]:
            workers = "%d of %d workers (degraded)" % (snap["workers_alive"], snap["workers_configured"])
        return "%s, queue %d, done %d, failed %d, %.1f frames/s" % (
            workers, snap["queue_depth"], snap["frames_done"], snap["frames_failed"], snap["frames_per_s"])

    def heartbeat_fields(self) -> dict:
        snap = self.snapshot()
        return {key: snap[key] for key in ("queue_depth", "in_flight", "workers_alive", "workers_configured",
                                           "degraded", "frames_per_s", "frames_done", "frames_failed", "uptime_s",
                                           "healthy")}

    # ----- any thread --------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            return self._snapshot

    def register(self, http: HttpServer) -> None:
        http.route("GET", "/status", self._status)
        http.route("GET", "/results", self._results)
        http.route("GET", "/metrics", self._metrics)
        http.route("GET", "/events", self._events)
        http.reserve("/status", "/metrics")

    def _status(self, request: Request) -> Response:
        return json_response(self.snapshot())

    def _results(self, request: Request) -> Response:
        try:
            since = int(request.arg("since", "0"))
            limit = int(request.arg("limit", str(RESULTS_LIMIT)))
        except ValueError:
            return error_response(400, "since and limit must be integers")
        if not 0 <= since < MAX_SEQ:
            return error_response(400, SINCE_RANGE)
        limit = max(1, min(limit, RESULTS_LIMIT))
        messages, last_seq, ledger_id = ledger_module.read_messages(self.settings.state_dir, since, limit)
        return json_response({"since": since, "last_seq": last_seq, "ledger": ledger_id, "results": messages})

    def _events(self, request: Request) -> Response:
        """Server-Sent Events: the stored messages PUB sends (same JSON, ``id:`` = seq, so a reconnecting
        EventSource resumes after the Last-Event-ID it saw; ``?since=`` for the first connection) and the
        heartbeats (without an id)."""
        try:
            since = int(request.headers.get("last-event-id") or request.arg("since", "0"))
        except ValueError:
            return error_response(400, "Last-Event-ID and since must be integers")
        if not 0 <= since < MAX_SEQ:
            return error_response(400, SINCE_RANGE)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":
            return Response(200, b"", "text/event-stream", headers)
        if not self._streams.acquire(blocking=False):
            return error_response(503, "too many event streams (%d); retry later" % EVENT_STREAMS)
        return Response(200, b"retry: 2000\n\n", "text/event-stream", headers,
                        stream=functools.partial(self._stream_events, since))

    def _stream_events(self, since: int, write, wait) -> None:
        try:
            quiet_since = next_heartbeat = time.monotonic()
            while True:
                messages, last_seq, ledger_id = ledger_module.read_messages(self.settings.state_dir, since,
                                                                            RESULTS_LIMIT)
                if since > last_seq:  # a seq of another (older) ledger: this one's messages from the start
                    since = 0
                    continue
                now = time.monotonic()
                for body in messages:
                    write(b"id: %d\ndata: %s\n\n" % (body["seq"], json.dumps(body).encode()))
                    since, quiet_since = body["seq"], now
                if now >= next_heartbeat:
                    next_heartbeat = now + self.settings.heartbeat_interval_s
                    _, body = heartbeat_message(ledger=ledger_id, last_seq=last_seq, **self.heartbeat_fields())
                    write(b"data: %s\n\n" % json.dumps(body).encode())
                    quiet_since = now
                elif now - quiet_since >= EVENTS_KEEPALIVE_S:
                    write(b": keepalive\n\n")
                    quiet_since = now
                if len(messages) < RESULTS_LIMIT and wait(EVENTS_POLL_S):
                    return
        finally:
            self._streams.release()

    def _metrics(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(200, body, content_type)


def _finite(seconds: float) -> float | None:
    """Seconds for JSON: None for an infinite wait (no worker)."""
    return round(seconds, 3) if math.isfinite(seconds) else None


def _worker(worker_id: str, info, pid, local: bool, now: float) -> dict:
    return {"id": worker_id, "pid": pid, "host": info.host if info else None, "local": local,
            "alive": info is not None, "busy": asdict(info.busy) if info and info.busy else None,
            "frames_done": info.frames_done if info else 0,
            "last_seen_s": round(now - info.last_seen, 3) if info else None}
