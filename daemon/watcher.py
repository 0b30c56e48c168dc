"""The Watcher decides one thing: *that* a frame file is complete (or never will be).

watchdog reports files matching ``*.cbf``, ``*.cbf.gz``, ``*.cbf.bz2`` (written in place or renamed into
place); a checker thread then confirms each one is complete with ``binary_complete`` (the whole CBF binary
section present, compressed files decompress cleanly).  It checks at once after a close-after-write or a
rename, and otherwise when the size has stopped changing, so a growing file is not re-read on every chunk.
A file that stops growing while incomplete for ``incomplete_timeout_s`` or vanishes is reported as such.

Whether a frame was already analysed is the ledger's business, not the watcher's: it reports every file it
is told about, with the file's ``identity`` (device and inode) and whether it was newly ``created`` (a
create or rename event), so the ledger can tell a file re-created under a known name from the same file.

Events go to the main loop through :meth:`drain`; :meth:`fileno` becomes readable when there are some.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from spotfinder_core.image import binary_complete

from .wakeup import Wakeup

log = logging.getLogger("spotfinder.watcher")

PATTERNS = ("*.cbf", "*.cbf.gz", "*.cbf.bz2")
RECHECK_S = 0.1


def is_frame_name(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in PATTERNS)


def identity_of(stat: os.stat_result) -> str:
    """Which file a path names: a re-created file gets a new inode, a file written on gets none."""
    return "%d:%d" % (stat.st_dev, stat.st_ino)


@dataclass(frozen=True)
class Event:
    """``seen``: a frame file appeared; ``complete``: ready to analyse; ``incomplete``: given up (``reason``).

    ``identity`` is ``dev:ino`` of the file checked ("" when it vanished); ``created``: a create or rename
    event was seen for it, so it is a new file even if a frame of that name was analysed before.
    """

    kind: str
    path: str
    t_seen: float
    t_complete: float | None = None
    reason: str | None = None
    identity: str | None = None
    created: bool = False


@dataclass
class _Pending:
    t_seen: float
    last_change: float  # time.monotonic() of the last growth
    created: bool = False
    size: int = -1
    checked_size: int = -1
    hinted: bool = True  # check at the next pass regardless of size stability (close, rename, catch-up)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = event.dest_path if isinstance(event, FileMovedEvent) else event.src_path
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if event.event_type in ("opened", "closed_no_write", "deleted") or not is_frame_name(path):
            return
        self.watcher.notice(path, hinted=isinstance(event, (FileClosedEvent, FileMovedEvent)),
                            created=event.event_type in ("created", "moved"))


class Watcher:
    def __init__(self, *, folders: tuple[str, ...], polling: bool = False, poll_interval_s: float = 1.0,
                 incomplete_timeout_s: float = 30.0):
        self.folders = folders
        self.incomplete_timeout_s = incomplete_timeout_s
        self.observer = PollingObserver(timeout=poll_interval_s) if polling else Observer()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Condition()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wakeup = Wakeup()
        self._stopping = threading.Event()
        self._checker = threading.Thread(target=self._check_loop, name="completeness", daemon=True)

    def start(self) -> None:
        handler = _Handler(self)
        for folder in self.folders:
            self.observer.schedule(handler, folder, recursive=True)
        self.observer.start()
        self._checker.start()
        log.info("watching %s (%s)", ", ".join(self.folders) or "nothing",
                 "polling" if isinstance(self.observer, PollingObserver) else "inotify/native events")

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify()
        self.observer.stop()
        self.observer.join(timeout=5.0)
        self._checker.join(timeout=5.0)

    def alive(self) -> bool:
        """Both threads (file events, completeness checks) still run."""
        return self.observer.is_alive() and self._checker.is_alive()

    def fileno(self) -> int:
        return self._wakeup.fileno()

    def drain(self) -> list[Event]:
        self._wakeup.clear()
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _emit(self, event: Event) -> None:
        self._events.put(event)
        self._wakeup.notify()

    def notice(self, path: str, hinted: bool = False, t_seen: float | None = None, created: bool = False) -> None:
        """A frame file to follow until it is complete (from watchdog, or the catch-up scan)."""
        t_seen = t_seen or time.time()
        with self._lock:
            pending = self._pending.get(path)
            if pending is None:
                self._pending[path] = _Pending(t_seen, time.monotonic(), created)
                self._emit(Event("seen", path, t_seen))
            else:
                pending.hinted = pending.hinted or hinted
                pending.created = pending.created or created
            if hinted:
                self._lock.notify()

    def catch_up(self, is_known) -> int:
        """Follow the frame files in the folders that ``is_known(path, identity, mtime)`` does not know; how many.

        Run at start (files that arrived while the service was down) and periodically (events lost to an
        inotify overflow, files re-created under a known name).
        """
        found = 0
        for folder in self.folders:
            for root, _dirs, names in os.walk(folder):
                for name in sorted(names):
                    path = os.path.join(root, name)
                    if not is_frame_name(path):
                        continue
                    try:
                        stat = os.stat(path)
                    except OSError:
                        continue
                    if not is_known(path, identity_of(stat), stat.st_mtime):
                        self.notice(path, hinted=True)
                        found += 1
        return found

    def _check_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._lock.wait(RECHECK_S)
                candidates = list(self._pending.items())
            for path, pending in candidates:
                try:
                    event = self._check(path, pending)
                except Exception as exc:  # a bug must cost this file, never the checker thread
                    log.error("checking %s raised %s: %s", path, type(exc).__name__, exc)
                    event = Event("incomplete", path, pending.t_seen, identity="", created=pending.created,
                                  reason="completeness check raised %s: %s" % (type(exc).__name__, exc))
                if event is not None:
                    with self._lock:
                        self._pending.pop(path, None)
                    self._emit(event)

    def _check(self, path: str, pending: _Pending) -> Event | None:
        def give_up(reason: str, identity: str) -> Event:
            return Event("incomplete", path, pending.t_seen, reason=reason, identity=identity, created=pending.created)

        now = time.monotonic()
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return give_up("file vanished before it was complete", "")
        except OSError as exc:
            return give_up("cannot stat: %s" % (exc.strerror or exc), "")
        size = stat.st_size
        stable = size == pending.size
        if not stable:
            pending.size, pending.last_change = size, now
        hinted, pending.hinted = pending.hinted, False
        if hinted or (stable and size != pending.checked_size):
            pending.checked_size = size
            if size > 0 and binary_complete(path):
                return Event("complete", path, pending.t_seen, t_complete=time.time(), identity=identity_of(stat),
                             created=pending.created)
        if now - pending.last_change > self.incomplete_timeout_s:
            return give_up("incomplete: no complete CBF binary section after %.0f s without growth"
                           % self.incomplete_timeout_s, identity_of(stat))
        return None
