"""The Watcher decides one thing: *that* a frame file is complete (or never will be).

watchdog reports files matching ``*.cbf``, ``*.cbf.gz``, ``*.cbf.bz2`` (written in place or renamed into
place); a checker thread then confirms each one is complete with ``binary_complete`` (the whole CBF binary
section present, compressed files decompress cleanly).  It checks at once after a close-after-write or a
rename, and otherwise when the size has stopped changing, so a growing file is not re-read on every chunk.
A file that stops growing while incomplete for ``incomplete_timeout_s`` or vanishes is reported as such.

Events go to the main loop through :meth:`drain`; :meth:`fileno` becomes readable when there are some.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from spotfinder.image import binary_complete

log = logging.getLogger("spotfinder.watcher")

PATTERNS = ("*.cbf", "*.cbf.gz", "*.cbf.bz2")
RECHECK_S = 0.1


def is_frame_name(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in PATTERNS)


@dataclass(frozen=True)
class Event:
    """``seen``: a frame file appeared; ``complete``: ready to analyse; ``incomplete``: given up (``reason``)."""

    kind: str
    path: str
    t_seen: float
    t_complete: float | None = None
    reason: str | None = None


@dataclass
class _Pending:
    t_seen: float
    last_change: float
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
        self.watcher.notice(path, hinted=isinstance(event, (FileClosedEvent, FileMovedEvent)))


class Watcher:
    def __init__(self, folders: tuple[str, ...], polling: bool = False, poll_interval_s: float = 1.0,
                 incomplete_timeout_s: float = 30.0):
        self.folders = folders
        self.incomplete_timeout_s = incomplete_timeout_s
        self.observer = PollingObserver(timeout=poll_interval_s) if polling else Observer()
        self._pending: dict[str, _Pending] = {}
        self._reported: set[str] = set()
        self._lock = threading.Condition()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
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

    def fileno(self) -> int:
        return self._wake_read

    def drain(self) -> list[Event]:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _emit(self, event: Event) -> None:
        self._events.put(event)
        os.write(self._wake_write, b"!")

    def notice(self, path: str, hinted: bool = False, t_seen: float | None = None) -> None:
        """A frame file to follow until it is complete (from watchdog, or the catch-up scan)."""
        now = time.time()
        with self._lock:
            if path in self._reported:
                return
            pending = self._pending.get(path)
            if pending is None:
                self._pending[path] = _Pending(t_seen=t_seen or now, last_change=now)
                self._emit(Event("seen", path, t_seen or now))
            elif hinted:
                pending.hinted = True
            if hinted:
                self._lock.notify()

    def catch_up(self, is_known) -> int:
        """Follow frame files already in the folders that ``is_known(path)`` does not know; how many."""
        found = 0
        for folder in self.folders:
            for root, _dirs, names in os.walk(folder):
                for name in sorted(names):
                    path = os.path.join(root, name)
                    if is_frame_name(path) and not is_known(path):
                        self.notice(path, hinted=True)
                        found += 1
        return found

    def _check_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._lock.wait(RECHECK_S)
                candidates = list(self._pending.items())
            for path, pending in candidates:
                event = self._check(path, pending)
                if event is not None:
                    with self._lock:
                        self._pending.pop(path, None)
                        self._reported.add(path)
                    self._emit(event)

    def _check(self, path: str, pending: _Pending) -> Event | None:
        now = time.time()
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return Event("incomplete", path, pending.t_seen, reason="file vanished before it was complete")
        except OSError as exc:
            return Event("incomplete", path, pending.t_seen, reason="cannot stat: %s" % (exc.strerror or exc))
        stable = size == pending.size
        if not stable:
            pending.size, pending.last_change = size, now
        hinted, pending.hinted = pending.hinted, False
        if hinted or (stable and size != pending.checked_size):
            pending.checked_size = size
            if size > 0 and binary_complete(path):
                return Event("complete", path, pending.t_seen, t_complete=now)
        if now - pending.last_change > self.incomplete_timeout_s:
            return Event("incomplete", path, pending.t_seen,
                         reason="incomplete: no complete CBF binary section after %.0f s without growth"
                         % self.incomplete_timeout_s)
        return None
