"""The service: wires watcher → ledger → dispatcher → workers → collector → PUB, and runs the one main loop.

:meth:`Service._build` makes every part in one place; :meth:`Service.start` starts them in order; the main
loop moves events between them each tick and runs the periodic tasks (:mod:`.periodic`) it registered.  Its
lifecycle is one state (:class:`Lifecycle`), shown in ``/status``.

The main thread owns the ledger and every ZeroMQ socket.  Other threads (watchdog, the completeness
checker, HTTP) only hand events in through the watcher's queue or the on-demand lane, or read the status
snapshot (:mod:`.status`) and the ledger on their own connections.  SIGTERM/SIGINT (or an EXIT POST from this
host) stop watching and listening, let the frames and queries in flight finish (frames not finished stay in
the ledger for the next start), flush the PUB socket and return 0.

A ledger that refuses writes (a full disk, a read-only folder) does not stop the service: it reports itself
unhealthy (the watchdog is no longer petted), dispatches nothing, keeps the watcher's events and the
workers' reports in memory in order, and retries them until the ledger takes writes again.
"""
from __future__ import annotations

import functools
import enum
import logging
import signal
import sqlite3
import threading
import time

import zmq

from spotfinder_core.nexus import master_of

from . import web
from .collections import TICK_S as COLLECTIONS_EVERY_S, Collections
from .collector import Collector
from .config import Settings, connect_endpoint
from .dispatcher import Dispatcher
from .http import HttpServer
from .ledger import Ledger, LedgerDamaged, LedgerUnwritable, WriteBacklog
from .metrics import Metrics
from .notify import Notifier
from .ondemand import Lane
from .periodic import PeriodicTasks
from .pidfile import PidFile, StateFolderInUse
from .pool import WorkerPool
from .publisher import Publisher, collection_of, image_number_of, readable
from .queries import DataRoots, Queries
from .roll import Loss, Roll
from .status import Status
from .watcher import Event, Watcher

log = logging.getLogger("spotfinder.service")

TICK_S = 0.05
SUPERVISE_EVERY_S = 0.2
PRUNE_EVERY_S = 3600.0


class ServiceError(RuntimeError):
    """The service cannot start (a socket cannot bind, the state folder is in use); message for the user."""


class Lifecycle(enum.Enum):
    STARTING = "starting"  # binding sockets, opening the ledger, starting workers
    PREPARING = "preparing"  # running, but not yet healthy past the PUB settle time: READY not sent yet
    SERVING = "serving"  # READY sent; the watchdog is petted while healthy
    STOPPING = "stopping"  # draining frames and queries in flight
    STOPPED = "stopped"


class Service:
    def __init__(self, *, settings: Settings, notifier: Notifier | None = None):
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.state = Lifecycle.STARTING
        self.stop_requested = threading.Event()
        self.toggle_pause = threading.Event()  # SIGUSR2: maintenance pause of the local workers
        self.pid_file = PidFile(state_dir=settings.state_dir)
        self.tasks = PeriodicTasks()
        self.unrecorded = WriteBacklog()  # watcher events the ledger refused
        self.unsettled = WriteBacklog()  # workers lost, their frames not yet released
        self.ledger_refused = False  # the last supervision pass found the ledger refusing writes

    # ----- start -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        """Make every part, wired to the parts it uses; nothing runs yet."""
        s = self.settings
        try:
            self.ledger = Ledger(state_dir=s.state_dir)
        except LedgerDamaged as exc:  # refused, not moved aside: it holds the record of what was published
            raise ServiceError("%s; move it away to start a new ledger (the watched frames are then analysed "
                               "and published again, under a new ledger id)" % exc) from None
        except (sqlite3.Error, OSError) as exc:
            raise ServiceError("cannot open the ledger in %s: %s (move it away to start afresh)"
                               % (s.state_dir, exc)) from None
        self.metrics = Metrics()
        self.roll = Roll(liveness_s=s.worker_liveness_s)
        self.lane = Lane(capacity=s.ondemand_queue, dispatch_timeout_s=s.dispatch_timeout_s,
                         frame_timeout_s=s.frame_timeout_s)
        self.metrics.watch_lane(self.lane.depth, self.lane.in_flight, self.lane.expected_wait_s,
                                lambda: self.lane.admit_limit(s.ondemand_timeout_s))
        self.context = zmq.Context()
        self.publish_from = time.monotonic() + s.pub_settle_s  # let subscribers (re)connect first
        self.publisher = self._bind("pub", s.pub, lambda: Publisher(
            context=self.context, endpoint=s.pub, hold_until=self.publish_from))
        self.collections = Collections(quiet_s=s.collection_quiet_s, series_facts=_series_facts)
        self.collector = self._bind("results", s.results_endpoint, lambda: Collector(
            context=self.context, endpoint=s.results_endpoint, ledger=self.ledger, publisher=self.publisher,
            frame_timeout_s=s.frame_timeout_s, lane=self.lane, metrics=self.metrics, roll=self.roll,
            on_result=self.collections.take))
        self.dispatcher = self._bind("work", s.work_endpoint, lambda: Dispatcher(
            context=self.context, endpoint=s.work_endpoint, ledger=self.ledger, params=s.params(),
            dispatch_timeout_s=s.dispatch_timeout_s, max_tries=s.max_tries, lane=self.lane, verify_md5=s.verify_md5,
            watch_roots=s.watch, budget_mb=s.worker_memory_mb, budget_s=s.worker_frame_s))
        try:
            host, port = s.http_address
            self.http = HttpServer(host=host, port=port, timeout_s=s.http_timeout_s,
                                   max_connections=s.http_max_connections, max_upload_bytes=s.http_max_upload_bytes)
        except OSError as exc:
            raise ServiceError("cannot listen for HTTP on %s: %s" % (s.http, exc.strerror or exc)) from None
        self.watcher = Watcher(folders=s.watch, polling=s.polling, poll_interval_s=s.poll_interval_s,
                               incomplete_timeout_s=s.incomplete_timeout_s)
        self.pool = WorkerPool(count=s.worker_count, work_endpoint=connect_endpoint(s.work_endpoint),
                               results_endpoint=connect_endpoint(s.results_endpoint),
                               heartbeat_s=s.heartbeat_interval_s, log_level=s.log_level,
                               start_allowance_s=s.worker_liveness_s + s.worker_start_s)
        self.status = Status(settings=s, ledger=self.ledger, roll=self.roll, pool=self.pool, collector=self.collector,
                             lane=self.lane, watcher=self.watcher, metrics=self.metrics, tasks=self.tasks,
                             lifecycle=lambda: self.state.value)
        self.http.observe(self.metrics.request)
        self.status.register(self.http)
        self.collections.register(self.http)
        web.register(self.http)
        Queries(lane=self.lane, startup=s.params(), roots=DataRoots(folders=s.ondemand_roots),
                timeout_s=s.ondemand_timeout_s, stop_service=self.request_stop,
                on_error=self.metrics.error).register(self.http)

    def _register_tasks(self) -> None:
        s, now = self.settings, time.monotonic()
        self.tasks.register(name="supervise", interval_s=SUPERVISE_EVERY_S, action=self._supervise)
        self.tasks.register(name="reconcile", interval_s=s.reconcile_interval_s, action=self._reconcile,
                            first_due=now + s.reconcile_interval_s)
        self.tasks.register(name="prune", interval_s=PRUNE_EVERY_S, action=self._prune, first_due=now + PRUNE_EVERY_S)
        self.tasks.register(name="collections", interval_s=COLLECTIONS_EVERY_S, action=self._collection_messages)
        self.tasks.register(name="heartbeat", interval_s=s.heartbeat_interval_s, action=self._heartbeat,
                            when=lambda: time.monotonic() >= self.publish_from)
        if self.notifier.watchdog_interval_s:
            self.tasks.register(name="watchdog", interval_s=self.notifier.watchdog_interval_s, action=self._watchdog,
                                when=lambda: self.state is Lifecycle.SERVING)

    def _bind(self, what: str, endpoint: str, make):
        try:
            return make()
        except zmq.ZMQError as exc:
            raise ServiceError("cannot bind %s endpoint %s: %s" % (what, endpoint, exc.strerror)) from None

    def start(self) -> None:
        s = self.settings
        try:
            self.pid_file.acquire()
        except StateFolderInUse as exc:
            raise ServiceError(str(exc)) from None
        except OSError as exc:
            raise ServiceError("cannot use state folder %s: %s" % (s.state_dir, exc.strerror or exc)) from None
        self._build()
        if not s.ondemand_roots:
            log.warning("no data_root and no watched folder: every on-demand query will be refused (set --data-root)")
        try:
            requeued = self.ledger.requeue_in_flight()
        except LedgerUnwritable as exc:
            raise ServiceError(str(exc)) from None
        if requeued:
            log.info("re-queued %d frames that were in flight when the service stopped", requeued)
        self.collections.rebuild(s.state_dir)
        for frame in self.ledger.unfinished():
            self.collections.notice(frame.collection, image_number_of(frame))
        self._prune()
        try:
            self.watcher.start()
        except OSError as exc:
            raise ServiceError("cannot watch %s: %s (for inotify limits see fs.inotify.max_user_watches, or "
                               "use polling)" % (", ".join(s.watch), exc.strerror or exc)) from None
        caught_up = self._reconcile()
        if caught_up:
            log.info("catching up on %d frame files that arrived while the service was down", caught_up)
        self.pool.start()
        self._register_tasks()
        self.status.refresh()
        self.http.start()
        self.state = Lifecycle.PREPARING
        log.info("serving: pub %s, http %s, work %s, results %s, %d local workers, state %s",
                 s.pub, s.http, s.work_endpoint, s.results_endpoint, s.worker_count, s.state_dir)
        if s.worker_count:
            log.info("preparing: the workers load the analysis kernels, or compile them on a first start after an "
                     "install or a numba upgrade (~8 s on the 2-core EPYC, more on slower hosts); \"ready\" follows")

    # ----- main loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.collector.socket, zmq.POLLIN)
        poller.register(self.watcher.fileno(), zmq.POLLIN)
        poller.register(self.lane.fileno(), zmq.POLLIN)
        while not self.stop_requested.is_set():
            poller.poll(TICK_S * 1000)
            self.collector.receive_all()
            self._take_watcher_events()
            self.publisher.flush()
            if self.toggle_pause.is_set():
                self.toggle_pause.clear()
                self.pool.pause(not self.pool.paused)
                log.warning("local workers %s", "paused (maintenance)" if self.pool.paused else "resumed")
            now = time.monotonic()
            self.tasks.run_due(now)
            if now >= self.publish_from and not self.ledger.write_error:
                try:
                    self.dispatcher.dispatch(len(self.roll.workers))
                except LedgerUnwritable:  # the job sent stays queued: a second result for it is dropped
                    pass
                if self.state is Lifecycle.PREPARING and self.status.fit_to_run()[0]:
                    self.state = Lifecycle.SERVING
                    self.notifier.ready(self.status.line())
                    log.info("ready")
        return self._shutdown()

    def _take_watcher_events(self) -> None:
        """Record the watcher's events in the ledger, in order; those it refuses wait for the next pass."""
        self.unrecorded.add(*(functools.partial(self._record_event, event) for event in self.watcher.drain()))
        self.unrecorded.retry()
        self._collection_messages(starts_only=True)  # a new collection's start goes out before its frames do

    def _collection_messages(self, starts_only: bool = False) -> None:
        for compose in self.collections.due(starts_only=starts_only):
            self.collector.record(compose)

    def _record_event(self, event: Event) -> None:
        collection = collection_of(master_of(event.path) or event.path)  # a data file alone: its master's series
        self.collections.notice(collection, image_number_of(event))
        of_series = {"frame_index": event.frame_index, "source": event.source, "image_number": event.image_number}
        if event.kind == "seen":
            if self.ledger.see(event.path, collection, event.t_seen, **of_series):
                log.debug("seen %s", event.path)
        elif event.kind == "complete":
            if self.ledger.enqueue(event.path, collection, event.t_seen, event.t_complete, event.identity,
                                   event.created, **of_series):
                log.info("queued %s%s", event.path, "" if event.frame_index is None else " #%d" % event.frame_index)
        else:
            frame = self.ledger.give_up(event.path, event.identity, event.created, event.frame_index)
            if frame is not None:
                self.collector.fail(frame, event.reason)

    # ----- periodic tasks ----------------------------------------------------------------------------------
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
        if self.settings.retention_days and not self.ledger.write_error:
            try:
                pruned = self.ledger.prune(self._retention_cutoff())
            except LedgerUnwritable:
                return
            if pruned:
                log.info("forgot %d frames finished more than %g days ago", pruned, self.settings.retention_days)

    def _supervise(self) -> None:
        """Replace dead workers, settle the frames they held, kill hung workers, re-send overdue frames; then
        refresh the status snapshot."""
        exited = self.pool.reap()
        for worker_id, _pid, code in exited:
            self.roll.died(worker_id, charge=code != 0)
        self.collector.receive_all()  # a dead worker's last messages (its result) before its frames are settled
        for info in self.roll.silent():
            log.warning("worker %s silent for %.0f s: presumed dead", info.id, self.settings.worker_liveness_s)
            self.pool.kill(info.id)  # a local one is hung: the pool starts a fresh one
        for worker_id in self.pool.not_joined(self.roll.workers):
            log.warning("worker %s has not joined %.0f s after it started: killed as hung, a fresh one starts",
                        worker_id, self.settings.worker_liveness_s + self.settings.worker_start_s)
            self.pool.kill(worker_id)
        self._watch_ledger()
        self._write_to_ledger(self._expire)
        held = {worker_id: [readable(f.path) for f in self.ledger.held_by(worker_id)] for worker_id, _, _ in exited}
        self.unsettled.add(*(functools.partial(self._settle_loss, loss) for loss in self.roll.take_losses()))
        self._write_to_ledger(self.unsettled.retry)
        for worker_id, pid, code in exited:
            if code != 0 and not self.pool.stopping:
                frames = held[worker_id]
                self.collector.service_error("worker %s (pid %d) exited with code %s%s" % (
                    worker_id, pid, code, "; its frame was queued again" if frames else ""),
                    worker=worker_id, frames=frames)
        self.status.observe_ledger()
        self.status.refresh()

    def _write_to_ledger(self, action) -> None:
        """Run ``action`` unless the ledger refuses writes; what it has not done by a refusal waits for a pass
        where the ledger takes writes again."""
        if not self.ledger.write_error:
            try:
                action()
            except LedgerUnwritable:
                pass

    def _watch_ledger(self) -> None:
        """Probe a ledger that refused a write when no waiting write retries it, and log each change."""
        if self.ledger.write_error and not self.unrecorded and not self.collector.unwritten:
            self.ledger.check_writable()
        refused = self.ledger.write_error is not None
        if refused and not self.ledger_refused:
            log.error("the ledger refuses writes (%s): nothing is dispatched, new frames and results wait in "
                      "memory until it takes writes again", self.ledger.write_error)
        elif self.ledger_refused and not refused:
            log.warning("the ledger takes writes again: what waited is recorded, dispatching resumes")
        self.ledger_refused = refused

    def _expire(self) -> None:
        """Re-send overdue frames, fail those out of tries, kill the workers that hung on one."""
        expiry = self.dispatcher.expire(time.monotonic())
        self._settle(expiry.exhausted)
        for worker_id in expiry.hung:
            if self.pool.kill(worker_id):
                log.warning("worker %s overran the frame timeout: killed as hung", worker_id)

    def _settle_loss(self, loss: Loss) -> None:
        """Release the frames a lost worker held (one worker per write: a refusal keeps the rest for later)."""
        self._settle(self.dispatcher.worker_lost(loss.worker_id, charge=loss.charge))

    def _settle(self, exhausted) -> None:
        for frame, reason in exhausted:
            self.collector.fail(frame, reason)

    def _heartbeat(self) -> None:
        self.collector.heartbeat(**self.status.heartbeat_fields())

    def _watchdog(self) -> None:
        fit, why = self.status.fit_to_run()
        if fit:
            self.notifier.send(WATCHDOG=1, STATUS=self.status.line())
        else:
            self.notifier.status("unhealthy: %s" % why)

    # ----- stop --------------------------------------------------------------------------------------------
    def request_stop(self, *_signal_args) -> None:
        self.stop_requested.set()

    def _shutdown(self) -> int:
        self.state = Lifecycle.STOPPING
        self.notifier.stopping("stopping: finishing frames in flight")
        log.info("stopping: no longer watching or listening; finishing frames and queries in flight")
        self.pool.stopping = True  # the drain below supervises: it must not start workers again
        self.watcher.stop()
        self.http.stop_listening()
        self.lane.close("the service is stopping", queued_only=True)
        self._take_watcher_events()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while ((self.ledger.counts()["dispatched"] or self.lane.in_flight()) and time.monotonic() < deadline
               and self.roll.workers and not self.ledger.write_error):  # results no ledger takes are done again
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
        self.pid_file.release()
        self.state = Lifecycle.STOPPED
        return 0


def _series_facts(master: str) -> tuple[int, int] | None:
    """An HDF5 master's frame count (nimages x ntrigger) and first image number; None when it cannot be read
    (yet)."""
    from spotfinder_core.image import FrameError
    from spotfinder_core.nexus import open_series

    try:
        series = open_series(master)
    except (FrameError, OSError):  # not written yet, or not readable: the count stays unknown for now
        return None
    except Exception as exc:  # a file no reader foresaw must not stop the main loop: the count stays unknown
        log.warning("cannot read the frame count of %s: %s: %s", readable(master), type(exc).__name__, exc)
        return None
    return series.count, series.image_nr_low


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; the exit code."""
    service = Service(settings=settings)
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
