"""The Watcher decides one thing: *that* a frame file is complete (or never will be).

watchdog reports files matching ``*.cbf``, ``*.cbf.gz``, ``*.cbf.bz2`` (written in place or renamed into
place); a checker thread then confirms each one is complete with :func:`inspect` (the whole CBF binary
section present, a compressed stream well ended), in bounded time and memory: the service never reads or
inflates a whole frame.  It checks at once after a close-after-write or a rename, and otherwise when the size
has stopped changing, so a growing file is not re-read on every chunk.  A file is given up with its cause as
soon as its writer is done with it (closed after writing, renamed into place) or it cannot become a frame
whatever comes next (not a CBF, corrupt, unreadable) and has settled; otherwise when it has not grown for
``incomplete_timeout_s``, or when it vanishes.  A watched folder deleted and re-created is watched again
within a second (:meth:`Watcher._rewatch_recreated`).

Whether a frame was already analysed is the ledger's business, not the watcher's: it reports every file it
is told about, with the file's ``identity`` (device and inode) and whether it was newly ``created`` (a
create or rename event), so the ledger can tell a file re-created under a known name from the same file.

Events go to the main loop through :meth:`drain`; :meth:`fileno` becomes readable when there are some.
"""
from __future__ import annotations

import errno
import fnmatch
import logging
import os
import queue
import threading
import time
import zlib
from dataclasses import dataclass

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch
from watchdog.observers.polling import PollingObserver

from spotfinder_core.image import (BINARY_SLACK, LINK_LOOP, MAX_FRAME_BYTES, MIME_HEADER_BYTES, FrameError,
                                   binary_section, decompressed_bound, decompressing, open_frame_file)

from .wakeup import Wakeup

log = logging.getLogger("spotfinder.watcher")

PATTERNS = ("*.cbf", "*.cbf.gz", "*.cbf.bz2")
RECHECK_S = 0.1
SETTLE_S = 2.0  # no growth for this long (and no close event): a file that cannot be a frame is reported
REWATCH_EVERY_S = 1.0  # how often the watched folders are checked for having been deleted and re-created
CBF_MAGIC = b"###CBF"  # the first bytes of every CBF file
READ_CHUNK = 2**20
GIVEN_UP_KEPT = 10_000  # files given up on, remembered so that completing one later counts as a new file

COMPLETE, PARTIAL, NOT_A_FRAME = "complete", "partial", "not a frame"


def is_frame_name(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in PATTERNS)


def identity_of(stat: os.stat_result) -> str:
    """Which file a path names: a re-created file gets a new inode, a file written on gets none."""
    return "%d:%d" % (stat.st_dev, stat.st_ino)


def status_of(path: str) -> os.stat_result | None:
    """The file's status, or its link's when the link cannot be followed (a loop: reported once, and known by
    the link's identity afterwards); None when it is gone."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        try:
            return os.lstat(path)
        except OSError:
            return None


def inspect(path: str) -> tuple[str, str]:
    """(state, cause) of a frame file: ``complete``; ``partial`` (more bytes may still make it a frame); or
    ``not a frame`` (no more bytes can).

    Bounded work whatever the file holds: a plain file is read up to its binary section's header; a compressed
    one is streamed through its decompressor with the output counted, not kept, and stops at what its header
    declares, so a decompression bomb costs neither memory nor more than one frame's decoding.
    """
    try:
        raw, size = open_frame_file(path)  # the reader's own opening: without blocking, regular files only
        with raw:
            stream = decompressing(raw, path)
            if stream is None:
                return _judge(raw.read(MIME_HEADER_BYTES), size)
            with stream:
                return _inspect_compressed(stream, size)
    except FrameError as exc:
        return NOT_A_FRAME, str(exc)
    except OSError as exc:
        return NOT_A_FRAME, unreadable(exc)


def unreadable(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return LINK_LOOP
    return "unreadable: %s" % (exc.strerror or exc).lower()


def _judge(head: bytes, size: int) -> tuple[str, str]:
    """The state of a frame whose first (decompressed) bytes are ``head`` and whose length is ``size``."""
    if not head:
        return PARTIAL, "empty file"
    if not CBF_MAGIC.startswith(head[:len(CBF_MAGIC)]):
        return NOT_A_FRAME, "not a CBF file (it does not start with %s)" % CBF_MAGIC.decode()
    section = binary_section(head)
    if section is None:
        if len(head) >= MIME_HEADER_BYTES:
            return NOT_A_FRAME, "no binary section in the first %d KiB" % (MIME_HEADER_BYTES // 1024)
        return PARTIAL, "no binary section (marker or X-Binary-Size missing)"
    if section.size > MAX_FRAME_BYTES:
        return NOT_A_FRAME, "X-Binary-Size %d is larger than any detector's frame" % section.size
    if size - section.start < section.size:
        return PARTIAL, "truncated: binary section has %d of its %d bytes (X-Binary-Size)" % (
            max(0, size - section.start), section.size)
    return COMPLETE, ""


def _inspect_compressed(stream, compressed_size: int) -> tuple[str, str]:
    """A compressed frame is complete when its stream ends cleanly after the whole binary section, within the
    length its header declares (the reader's own bound, :func:`decompressed_bound`)."""
    if compressed_size == 0:
        return PARTIAL, "empty file"
    try:
        head = stream.read(MIME_HEADER_BYTES)
        state, cause = _judge(head, len(head))
        if state == NOT_A_FRAME:
            return state, cause
        section = binary_section(head)
        limit = decompressed_bound(section) if section else MIME_HEADER_BYTES + BINARY_SLACK
        size = len(head)
        while size <= limit and (chunk := stream.read(min(READ_CHUNK, limit + 1 - size))):
            size += len(chunk)
    except EOFError:
        return PARTIAL, "compressed stream ends early"
    except (OSError, zlib.error) as exc:
        if getattr(exc, "errno", None) is not None:  # the file, not its contents (permission, a link loop)
            raise
        return NOT_A_FRAME, "corrupt compression: %s" % exc
    if size > limit:
        return NOT_A_FRAME, "decompresses to more than the %d bytes its header allows (a decompression bomb?)" % limit
    state, cause = _judge(head, size)
    return (NOT_A_FRAME if state == PARTIAL else state), cause  # the stream has ended: nothing more will come


def _frame_files(folder: str):
    """(path, status) of every frame file under ``folder``, in name order within each folder."""
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            stat = status_of(path) if is_frame_name(path) else None
            if stat is not None:
                yield path, stat


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
    written: bool = False  # closed after writing or renamed into place: its writer is done with it
    state: str = PARTIAL  # what the last check found (inspect())
    cause: str = "no complete CBF binary section"


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
        self.watcher.notice(path, written=isinstance(event, (FileClosedEvent, FileMovedEvent)),
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
        self._handler = _Handler(self)
        self._watches: dict[str, tuple[ObservedWatch | None, str]] = {}  # folder -> its watch, the folder's identity
        self._given_up: dict[str, bool] = {}  # the newest GIVEN_UP_KEPT paths given up, in order (checker thread)

    def start(self) -> None:
        for folder in self.folders:
            self._watches[folder] = (self.observer.schedule(self._handler, folder, recursive=True),
                                     identity_of(os.stat(folder)))
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

    def notice(self, path: str, hinted: bool = False, t_seen: float | None = None, created: bool = False,
               written: bool = False) -> None:
        """A frame file to follow until it is complete (from watchdog, or the catch-up scan); ``written``: it
        was closed after writing or renamed into place, so it is checked at once and judged as it is."""
        t_seen = t_seen or time.time()
        hinted = hinted or written
        with self._lock:
            pending = self._pending.get(path)
            if pending is None:
                self._pending[path] = _Pending(t_seen, time.monotonic(), created, written=written)
                self._emit(Event("seen", path, t_seen))
            else:
                pending.hinted = pending.hinted or hinted
                pending.created = pending.created or created
                pending.written = pending.written or written
            if hinted:
                self._lock.notify()

    def catch_up(self, is_known) -> int:
        """Follow the frame files in the folders that ``is_known(path, identity, mtime)`` does not know; how many.

        Run at start (files that arrived while the service was down) and periodically (events lost to an
        inotify overflow, files re-created under a known name).
        """
        found = 0
        for folder in self.folders:
            for path, stat in _frame_files(folder):
                if not is_known(path, identity_of(stat), stat.st_mtime):
                    self.notice(path, hinted=True)
                    found += 1
        return found

    def _rewatch_recreated(self) -> None:
        """Watch again a watched folder that was deleted and re-created (its watch ended with the old folder),
        and follow the frame files written into it before the new watch: new files all, even if an inode is
        reused."""
        watching = {emitter.watch for emitter in self.observer.emitters if emitter.is_alive()}
        for folder, (watch, identity) in list(self._watches.items()):
            try:
                current = identity_of(os.stat(folder))
                if current == identity and watch in watching:  # an inode may be reused: the watch's end tells
                    continue
                if watch is not None:
                    self.observer.unschedule(watch)
                    self._watches[folder] = (None, "")
                self._watches[folder] = (self.observer.schedule(self._handler, folder, recursive=True), current)
            except OSError:
                continue  # gone (again): watched once it is back
            log.warning("the watch on %s ended (the folder was deleted and re-created?): watching it again", folder)
            for path, _stat in _frame_files(folder):
                self.notice(path, hinted=True, created=True)

    def _check_loop(self) -> None:
        next_rewatch = time.monotonic() + REWATCH_EVERY_S
        while not self._stopping.is_set():
            if time.monotonic() >= next_rewatch:
                next_rewatch = time.monotonic() + REWATCH_EVERY_S
                try:
                    self._rewatch_recreated()
                except Exception as exc:  # a bug must cost a re-watch, never the checker thread
                    log.error("watching the re-created folders again raised %s: %s", type(exc).__name__, exc)
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
            if identity:  # a writer may yet complete it (slow, or reopened): then it is a new outcome
                self._given_up[path] = True
                if len(self._given_up) > GIVEN_UP_KEPT:
                    del self._given_up[next(iter(self._given_up))]
            return Event("incomplete", path, pending.t_seen, reason=reason, identity=identity, created=pending.created)

        now = time.monotonic()
        # Read before the file is: a close event that lands while it is inspected must not turn what the
        # inspection saw of the unfinished file into a final verdict (it hints a fresh check instead).
        written = pending.written
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return give_up("file vanished before it was complete", "")
        except OSError as exc:
            link = status_of(path)
            return give_up(unreadable(exc), identity_of(link) if link else "")
        size = stat.st_size
        stable = size == pending.size
        if not stable:
            pending.size, pending.last_change = size, now
        hinted, pending.hinted = pending.hinted, False
        if hinted or (stable and size != pending.checked_size):
            pending.checked_size = size
            pending.state, pending.cause = inspect(path)
            if pending.state == COMPLETE:
                return Event("complete", path, pending.t_seen, t_complete=time.time(), identity=identity_of(stat),
                             created=pending.created or self._given_up.pop(path, False))
        # A file its writer is done with is judged as it is; one that merely stopped growing only once it
        # cannot be a frame whatever comes next, or after the incomplete timeout (a writer may only be slow).
        settled = now - pending.last_change >= SETTLE_S
        if written or (pending.state == NOT_A_FRAME and settled):
            return give_up(pending.cause, identity_of(stat))
        if now - pending.last_change > self.incomplete_timeout_s:
            return give_up("incomplete after %.0f s without growth: %s" % (self.incomplete_timeout_s, pending.cause),
                           identity_of(stat))
        return None
