"""The service: wires watcher → ledger → dispatcher → workers → collector → PUB, and runs the one main loop.

The main thread owns the ledger and every ZeroMQ socket.  Other threads (watchdog, the completeness
checker, HTTP) only hand events in through the watcher's queue or the on-demand lane, or read a status
snapshot and the ledger on their own connections.  SIGTERM/SIGINT (or an EXIT POST from this host) stop
watching and listening, let the frames and queries in flight finish (frames not finished stay in the
ledger for the next start), flush the PUB socket and return 0.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import sqlite3
import threading
import time

import zmq

from . import ledger as ledger_module
from .collector import Collector
from .config import Settings, connect_endpoint
from .dispatcher import Dispatcher
from .http import HttpServer, Request, Response, error_response, json_response
from .ledger import Ledger
from .metrics import Metrics
from .notify import Notifier
from .ondemand import Lane
from .pool import WorkerPool
from .publisher import Publisher, collection_of
from .queries import DataRoots, Queries
from .roll import Roll
from .watcher import Watcher

log = logging.getLogger("spotfinder.service")

PID_FILE = "spotfinder.pid"
TICK_S = 0.05
SUPERVISE_EVERY_S = 0.2
RESULTS_LIMIT = 1000
PRUNE_EVERY_S = 3600.0


class ServiceError(RuntimeError):
    """The service cannot start (a socket cannot bind, the state folder is in use); message for the user."""


class Service:
    def __init__(self, settings: Settings, notifier: Notifier | None = None):
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.stop_requested = threading.Event()
        self.toggle_pause = threading.Event()  # SIGUSR2: maintenance pause of the local workers
        self.started = time.monotonic()
        self.progress_mark = self.started
        self.ready_sent = False
        self._counts = dict.fromkeys(ledger_module.STATES, 0)
        self._oldest_seen: float | None = None
        self._snapshot: dict = {}
        self._snapshot_lock = threading.Lock()
        self._lock_file = None

    # ----- start -------------------------------------------------------------------------------------------
    def _lock_state_dir(self) -> None:
        path = os.path.join(self.settings.state_dir, PID_FILE)
        try:
            os.makedirs(self.settings.state_dir, exist_ok=True)
            handle = open(path, "a+")
        except OSError as exc:
            raise ServiceError("cannot use state folder %s: %s"
                               % (self.settings.state_dir, exc.strerror or exc)) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "?"
            handle.close()
            raise ServiceError("state folder %s is in use by another service (pid %s)"
                               % (self.settings.state_dir, other)) from None
        handle.seek(0)
        handle.truncate()
        handle.write("%d\n" % os.getpid())
        handle.flush()
        self._lock_file = handle

    def _bind(self, what: str, endpoint: str, make):
        try:
            return make()
        except zmq.ZMQError as exc:
            raise ServiceError("cannot bind %s endpoint %s: %s" % (what, endpoint, exc.strerror)) from None

    def start(self) -> None:
        s = self.settings
        self._lock_state_dir()
        try:
            self.ledger = Ledger(s.state_dir)
        except (sqlite3.Error, OSError) as exc:
            raise ServiceError("cannot open the ledger in %s: %s (move it away to start afresh)"
                               % (s.state_dir, exc)) from None
        self.metrics = Metrics()
        self.roll = Roll(s.worker_liveness_s)
        self.lane = Lane(s.ondemand_capacity, s.dispatch_timeout_s, s.frame_timeout_s)
        self.metrics.watch_lane(self.lane.depth, self.lane.in_flight)
        self.context = zmq.Context()
        self.publish_from = time.monotonic() + s.pub_settle_s  # let subscribers (re)connect first
        self.publisher = self._bind("pub", s.pub, lambda: Publisher(self.context, s.pub, self.publish_from))
        self.collector = self._bind("results", s.results_endpoint, lambda: Collector(
            self.context, s.results_endpoint, self.ledger, self.publisher, s.frame_timeout_s, self.lane, self.metrics,
            self.roll))
        self.dispatcher = self._bind("work", s.work_endpoint, lambda: Dispatcher(
            self.context, s.work_endpoint, self.ledger, s.params().explicit(), s.dispatch_timeout_s, s.max_tries,
            self.lane, s.verify_md5))
        try:
            self.http = HttpServer(*s.http_address, timeout_s=s.http_timeout_s, max_connections=s.http_max_connections)
        except OSError as exc:
            raise ServiceError("cannot listen for HTTP on %s: %s" % (s.http, exc.strerror or exc)) from None
        self.http.observe(self.metrics.request)
        self.http.route("GET", "/status", self._http_status)
        self.http.route("GET", "/results", self._http_results)
        self.http.route("GET", "/metrics", self._http_metrics)
        Queries(self.lane, s.params(), DataRoots(s.ondemand_roots), s.ondemand_timeout_s, self.request_stop,
                self.metrics.error).register(self.http)
        if not s.ondemand_roots:
            log.warning("no data_root and no watched folder: every on-demand query will be refused (set --data-root)")
        requeued = self.ledger.requeue_in_flight()
        if requeued:
            log.info("re-queued %d frames that were in flight when the service stopped", requeued)
        self._prune()
        self.watcher = Watcher(s.watch, s.polling, s.poll_interval_s, s.incomplete_timeout_s)
        try:
            self.watcher.start()
        except OSError as exc:
            raise ServiceError("cannot watch %s: %s (for inotify limits see fs.inotify.max_user_watches, or "
                               "use polling)" % (", ".join(s.watch), exc.strerror or exc)) from None
        caught_up = self._reconcile()
        if caught_up:
            log.info("catching up on %d frame files that arrived while the service was down", caught_up)
        self.pool = WorkerPool(s.worker_count, connect_endpoint(s.work_endpoint),
                               connect_endpoint(s.results_endpoint), s.heartbeat_interval_s, s.log_level)
        self.pool.start()
        self._refresh_snapshot()
        self.http.start()
        log.info("serving: pub %s, http %s, work %s, results %s, %d local workers, state %s",
                 s.pub, s.http, s.work_endpoint, s.results_endpoint, s.worker_count, s.state_dir)

    # ----- main loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.collector.socket, zmq.POLLIN)
        poller.register(self.watcher.fileno(), zmq.POLLIN)
        poller.register(self.lane.fileno(), zmq.POLLIN)
        next_supervise = next_heartbeat = next_watchdog = 0.0
        next_reconcile = time.monotonic() + self.settings.reconcile_interval_s
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not self.stop_requested.is_set():
            poller.poll(TICK_S * 1000)
            self.collector.receive_all()
            self._take_watcher_events()
            self.publisher.flush()
            now = time.monotonic()
            if self.toggle_pause.is_set():
                self.toggle_pause.clear()
                self.pool.pause(not self.pool.paused)
                log.warning("local workers %s", "paused (maintenance)" if self.pool.paused else "resumed")
            if now >= next_supervise:
                next_supervise = now + SUPERVISE_EVERY_S
                self._supervise()
                self._refresh_snapshot()
            if now >= next_reconcile:
                next_reconcile = now + self.settings.reconcile_interval_s
                self._reconcile()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY_S
                self._prune()
            if now >= self.publish_from:
                self.dispatcher.dispatch(len(self.roll.workers))
                if now >= next_heartbeat:
                    next_heartbeat = now + self.settings.heartbeat_interval_s
                    self.collector.heartbeat(**self._heartbeat_fields())
            healthy, why = self.health()
            if not self.ready_sent and healthy and now >= self.publish_from:
                self.ready_sent = True
                self.notifier.ready(self._status_line())
                log.info("ready")
            interval = self.notifier.watchdog_interval_s
            if interval and self.ready_sent and now >= next_watchdog:
                next_watchdog = now + interval
                if healthy:
                    self.notifier.send(WATCHDOG=1, STATUS=self._status_line())
                else:
                    self.notifier.status("unhealthy: %s" % why)
        return self._shutdown()

    def _take_watcher_events(self) -> None:
        for event in self.watcher.drain():
            collection = collection_of(event.path)
            if event.kind == "seen":
                if self.ledger.see(event.path, collection, event.t_seen):
                    log.debug("seen %s", event.path)
            elif event.kind == "complete":
                if self.ledger.enqueue(event.path, collection, event.t_seen, event.t_complete, event.identity,
                                       event.created):
                    log.info("queued %s", event.path)
            else:
                frame = self.ledger.give_up(event.path, event.identity, event.created)
                if frame is not None:
                    self.collector.fail(frame, event.reason)

    def _reconcile(self) -> int:
        """Follow again the frames still waiting to be complete, and catch up on files no event announced;
        how many files were new."""
        for frame in self.ledger.seen_only():
            self.watcher.notice(frame.path, hinted=True, t_seen=frame.t_seen)
        forgotten_before = self._retention_cutoff()
        return self.watcher.catch_up(lambda path, identity, mtime: mtime < forgotten_before
                                     or self.ledger.known(path, identity))

    def _retention_cutoff(self) -> float:
        """Wall time before which finished frames are forgotten (and their files not caught up)."""
        days = self.settings.retention_days
        return time.time() - days * 86400.0 if days else 0.0

    def _prune(self) -> None:
        if self.settings.retention_days:
            pruned = self.ledger.prune(self._retention_cutoff())
            if pruned:
                log.info("forgot %d frames finished more than %g days ago", pruned, self.settings.retention_days)

    def _supervise(self) -> None:
        """Replace dead workers, settle the frames they held, kill hung workers, re-send overdue frames."""
        exited = self.pool.reap()
        for worker_id, _pid, code in exited:
            self.roll.died(worker_id, charge=code != 0)
        self.collector.receive_all()  # a dead worker's last messages (its result) before its frames are settled
        for info in self.roll.silent():
            log.warning("worker %s silent for %.0f s: presumed dead", info.id, self.settings.worker_liveness_s)
            self.pool.kill(info.id)  # a local one is hung: the pool starts a fresh one
        expiry = self.dispatcher.expire(time.monotonic())
        self._settle(expiry.exhausted)
        for worker_id in expiry.hung:
            if self.pool.kill(worker_id):
                log.warning("worker %s overran the frame timeout: killed as hung", worker_id)
        held = {worker_id: [f.path for f in self.ledger.held_by(worker_id)] for worker_id, _, _ in exited}
        for loss in self.roll.take_losses():
            self._settle(self.dispatcher.worker_lost(loss.worker_id, charge=loss.charge))
        for worker_id, pid, code in exited:
            if code != 0 and not self.pool.stopping:
                frames = held[worker_id]
                self.collector.service_error("worker %s (pid %d) exited with code %s%s" % (
                    worker_id, pid, code, "; its frame was queued again" if frames else ""),
                    worker=worker_id, frames=frames)
        self._counts = self.ledger.counts()
        self._oldest_seen = self.ledger.oldest_seen()
        if self._counts["queued"] + self._counts["dispatched"] == 0 or self.collector.last_done > self.progress_mark:
            self.progress_mark = time.monotonic()

    def _settle(self, exhausted) -> None:
        for frame, reason in exhausted:
            self.collector.fail(frame, reason)

    # ----- health and status -------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """Healthy = the watcher runs, some worker is alive when work can arrive, the queue drains and no
        frame waits for completeness past its timeout and a reconciliation."""
        if not self.watcher.alive():
            return False, "the folder watcher stopped"
        if not self.roll.workers and (self.pool.count > 0 or self._counts["queued"]):
            return False, "no live workers"
        stall_s = self.settings.dispatch_timeout_s + self.settings.frame_timeout_s
        if time.monotonic() - self.progress_mark > stall_s:
            return False, "queue not draining for %.0f s" % stall_s
        stuck_s = 2 * self.settings.incomplete_timeout_s + self.settings.reconcile_interval_s
        if self._oldest_seen is not None and time.time() - self._oldest_seen > stuck_s:
            return False, "a frame has waited for completeness for over %.0f s" % stuck_s
        return True, "ok"

    def _status_line(self) -> str:
        snap = self._snapshot
        return "%d workers, queue %d, done %d, failed %d, %.1f frames/s" % (
            snap["workers_alive"], snap["queue_depth"], snap["frames_done"], snap["frames_failed"],
            snap["frames_per_s"])

    def _refresh_snapshot(self) -> None:
        counts = self._counts
        now = time.monotonic()
        registered = dict(self.roll.workers)
        workers = []
        for worker_id, pid in self.pool.running().items():
            workers.append(self._worker_status(worker_id, registered.pop(worker_id, None), pid, local=True, now=now))
        workers.extend(self._worker_status(info.id, info, info.pid, local=False, now=now)
                       for info in registered.values())
        snapshot = {
            "uptime_s": round(now - self.started, 3),
            "workers": workers,
            "workers_alive": len(self.roll.workers),
            "workers_paused": self.pool.paused,
            "queue_depth": counts["queued"],
            "in_flight": counts["dispatched"],
            "waiting_complete": counts["seen"],
            "frames_done": counts["done"],
            "frames_failed": counts["failed"],
            "frames_per_s": self.collector.frames_per_s(),
            "ondemand_queue": self.lane.depth(),
            "ondemand_in_flight": self.lane.in_flight(),
            "last_seq": self.ledger.last_seq(),
            "watcher_alive": self.watcher.alive(),
            "oldest_waiting_s": None if self._oldest_seen is None else round(time.time() - self._oldest_seen, 3),
            "watch": list(self.settings.watch),
            "pub": self.settings.pub,
        }
        snapshot["healthy"], snapshot["health"] = self.health()
        self.metrics.queue.set(counts["queued"])
        self.metrics.in_flight.set(counts["dispatched"])
        self.metrics.workers.set(snapshot["workers_alive"])
        with self._snapshot_lock:
            self._snapshot = snapshot

    @staticmethod
    def _worker_status(worker_id: str, info, pid, local: bool, now: float) -> dict:
        return {"id": worker_id, "pid": pid, "host": info.host if info else None, "local": local,
                "alive": info is not None, "busy": info.busy if info else None,
                "frames_done": info.frames_done if info else 0,
                "last_seen_s": round(now - info.last_seen, 3) if info else None}

    def _heartbeat_fields(self) -> dict:
        snap = self._snapshot
        return {key: snap[key] for key in ("queue_depth", "in_flight", "workers_alive", "frames_per_s",
                                           "frames_done", "frames_failed", "uptime_s", "healthy")}

    def _http_status(self, request: Request) -> Response:
        with self._snapshot_lock:
            return json_response(self._snapshot)

    def _http_results(self, request: Request) -> Response:
        try:
            since = int(request.arg("since", "0"))
            limit = int(request.arg("limit", str(RESULTS_LIMIT)))
        except ValueError:
            return error_response(400, "since and limit must be integers")
        if since < 0:
            return error_response(400, "since must be 0 or more")
        limit = max(1, min(limit, RESULTS_LIMIT))
        messages, last_seq = ledger_module.read_messages(self.settings.state_dir, since, limit)
        return json_response({"since": since, "last_seq": last_seq, "results": messages})

    def _http_metrics(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(200, body, content_type)

    # ----- stop --------------------------------------------------------------------------------------------
    def request_stop(self, *_signal_args) -> None:
        self.stop_requested.set()

    def _shutdown(self) -> int:
        self.notifier.stopping("stopping: finishing frames in flight")
        log.info("stopping: no longer watching or listening; finishing frames and queries in flight")
        self.pool.stopping = True  # the drain below supervises: it must not start workers again
        self.watcher.stop()
        self.http.stop_listening()
        self.lane.close("the service is stopping", queued_only=True)
        self._take_watcher_events()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while ((self.ledger.counts()["dispatched"] or self.lane.in_flight()) and time.monotonic() < deadline
               and self.roll.workers):
            if self.collector.socket.poll(TICK_S * 1000):
                self.collector.receive_all()
            self._supervise()
        left = self.ledger.counts()
        self.pool.stop(timeout=self.settings.drain_timeout_s)
        self.collector.receive_all()
        self.lane.close("the service stopped before the analysis finished")
        log.info("stopped: %d frames handed back to the ledger for the next start (%d queued, %d in flight)",
                 left["queued"] + left["dispatched"], left["queued"], left["dispatched"])
        self.http.stop()  # after the last queries were answered
        self.dispatcher.close()
        self.collector.close()
        self.publisher.close()  # LINGER flushes what is still queued for subscribers
        self.context.term()
        self.ledger.close()
        self._lock_file.close()
        return 0


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; the exit code."""
    service = Service(settings)
    signal.signal(signal.SIGTERM, service.request_stop)  # a stop during start-up is honoured by run()
    signal.signal(signal.SIGINT, service.request_stop)
    signal.signal(signal.SIGUSR2, lambda *_: service.toggle_pause.set())
    try:
        service.start()
        return service.run()
    except ServiceError:
        raise
    except Exception:  # a bug: one clear log line; the ledger keeps every frame for the next start
        log.critical("internal error, service stops", exc_info=True)
        return 1
