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

An EIGER HDF5 series (``<name>_master.h5`` and its ``<name>_data_NNNNNN.h5``) is followed as one
(:class:`_Series`): once its master opens, every frame of the series is reported ``seen``, and the frames of
each data file ``complete`` as soon as they can be read (:func:`~spotfinder_core.nexus.complete_frames`: the
file no longer grows, or was closed or renamed into place, and opens with every chunk of those frames
present), data file by data file, frame by frame, never a half-written one.  A data file its writer holds
open in SWMR mode (:func:`~spotfinder_core.nexus.swmr_writing`) is read while it grows, each frame reported as
soon as its chunk is indexed (SWMR writes a chunk before the index entry that points to it); any other data
file only once it stops growing or is closed (read mid-write it could show anything).  Frames whose data file never
comes, or stays short, are given up with their cause after ``incomplete_timeout_s`` without progress (a
data file closed or renamed into place short of its frames at once), naming the missing frames.  A data
file seen before its master waits for it; with no master after ``incomplete_timeout_s`` it is given up
(a data file alone has no geometry), and analysed should its master come later.  A finished series is
remembered with its files' versions, so that a late event of a file unchanged since (a writer's close after its
last frame was reported, a polling snapshot) does not follow the whole series again; so is a frame file
reported complete (a polling snapshot that saw its last write after the checker judged it is not news).

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
import re
import threading
import time
import zlib
from dataclasses import dataclass, field

from watchdog.events import (FileAttribEvent, FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent,
                             FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch
from watchdog.observers.polling import PollingObserver

from spotfinder_core import nexus
from spotfinder_core.image import (BINARY_SLACK, LINK_LOOP, MAX_FRAME_BYTES, MIME_HEADER_BYTES, FrameError,
                                   binary_section, decompressed_bound, decompressing, open_frame_file)

from .wakeup import Wakeup

log = logging.getLogger("spotfinder.watcher")

PATTERNS = ("*.cbf", "*.cbf.gz", "*.cbf.bz2", "*_master.h5", "*_data_[0-9][0-9][0-9][0-9][0-9][0-9].h5")
# A data file being written under a temporary name (``.x_data_000002.h5.part``, rsync's ``.x_data_000002.h5.AbCd``)
TEMPORARY_DATA = re.compile(r"\.*(?P<series>.+)_data_[0-9]{6}\.h5.+")
# The file events the watcher acts on, the only ones watchdog is asked for (with inotify, the only ones the kernel
# queues).  Reading a frame (the completeness check, a worker, a user) opens and closes it, and watchdog reports a
# folder modified beside each create and close: a frame written in 4 chunks and analysed made 15 events, each a
# trip through watchdog's three threads, where these 6 say all there is.  At 25 Hz those threads' CPU went from
# 2.2 to 1.5 ms a frame, the service's from 4.1 to 3.6 (bench_pipeline.py, 2-core EPYC).
FILE_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileAttribEvent, FileClosedEvent, FileMovedEvent]
RECHECK_S = 0.1
SWMR_RECHECK_S = 0.5  # a data file written in SWMR mode is read again at least this often while it is written
SETTLE_S = 2.0  # no growth for this long (and no close event): a file that cannot be a frame is reported
REWATCH_EVERY_S = 1.0  # how often the watched folders are checked for having been deleted and re-created
CBF_MAGIC = b"###CBF"  # the first bytes of every CBF file
READ_CHUNK = 2**20
GIVEN_UP_KEPT = 10_000  # files given up on, remembered so that completing one later counts as a new file
FINISHED_KEPT = 1_000  # finished series, remembered so that a late event of one of their files is not news
COMPLETED_KEPT = 10_000  # frame files reported complete, remembered for the same reason (a polling observer's
# snapshot can see the last write after the checker has judged the file)

COMPLETE, PARTIAL, NOT_A_FRAME = "complete", "partial", "not a frame"


def is_frame_name(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in PATTERNS)


def frame_ranges(indices: list[int]) -> str:
    """0-based frame indices as short ranges for a message: ``frames 0-9, 12``, ``frame 3``."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    listed = ", ".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in spans)
    return ("frame " if len(indices) == 1 else "frames ") + listed


def identity_of(stat: os.stat_result) -> str:
    """Which file a path names: a re-created file gets a new inode, a file written on gets none."""
    return "%d:%d" % (stat.st_dev, stat.st_ino)


def version_of(path: str) -> tuple[str, int, int] | None:
    """(identity, size, mtime_ns) of a file: it changed when this did; None when it is not there."""
    stat = status_of(path)
    return None if stat is None else (identity_of(stat), stat.st_size, stat.st_mtime_ns)


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
    event was seen for it, so it is a new file even if a frame of that name was analysed before.  A frame of
    an HDF5 series is ``path`` (its master) and ``frame_index`` (``image_number`` in the series), its pixels in
    the data file ``source``, whose identity and creation are the frame's.
    """

    kind: str
    path: str
    t_seen: float
    t_complete: float | None = None
    reason: str | None = None
    identity: str | None = None
    created: bool = False
    frame_index: int | None = None
    source: str | None = None
    image_number: int | None = None  # a series frame's: image_nr_low + frame_index


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


@dataclass
class _Hints:
    """What the file events said about a file of a series since its last check."""

    hinted: bool = False
    written: bool = False
    created: bool = False

    def add(self, hinted: bool, written: bool, created: bool) -> None:
        self.hinted, self.written = self.hinted or hinted, self.written or written
        self.created = self.created or created


@dataclass
class _DataFile:
    """A data file of an opened series: its frames ``first_index`` .. ``first_index + count - 1``, of which the
    first ``reported`` were reported complete (or given up)."""

    path: str
    first_index: int
    count: int
    reported: int = 0
    counted: bool = False  # its own frame count was read (the master's guess replaced)
    size: int = -1
    checked: tuple[int, int] = (-1, -1)  # (size, mtime_ns) when it was last read
    checked_at: float = 0.0  # time.monotonic() of that reading
    identity: str = ""
    hints: _Hints = field(default_factory=lambda: _Hints(hinted=True))

    def missing(self) -> list[int]:
        return list(range(self.first_index + self.reported, self.first_index + self.count))


@dataclass
class _Series:
    """An HDF5 series followed from its master; ``hints`` per file (the master's and the data files') are filled
    by :meth:`Watcher.notice` under the watcher's lock and taken by the checker."""

    master: str
    t_seen: float
    last_change: float  # time.monotonic() of the last progress: the master or a data file grew, frames completed
    hints: dict[str, _Hints] = field(default_factory=dict)
    opened: bool = False
    created: bool = False  # the master was created (or renamed into place) while followed
    written: bool = False  # the master was closed after writing or renamed into place
    size: int = -1
    checked_size: int = -1
    cause: str = "the master cannot be opened yet"
    files: list[_DataFile] = field(default_factory=list)
    image_nr_low: int = 1  # the image number of frame 0
    waiting_data: dict[str, float] = field(default_factory=dict)  # data files seen before the master: t_seen


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        """One of FILE_EVENTS."""
        path = event.dest_path if isinstance(event, FileMovedEvent) else event.src_path
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not is_frame_name(path):
            self.watcher.progress(path)
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
        self._series: dict[str, _Series] = {}  # HDF5 series by master path (the checker thread follows them)
        self._lock = threading.Condition()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wakeup = Wakeup()
        self._stopping = threading.Event()
        self._checker = threading.Thread(target=self._check_loop, name="completeness", daemon=True)
        self._handler = _Handler(self)
        self._watches: dict[str, tuple[ObservedWatch | None, str]] = {}  # folder -> its watch, the folder's identity
        self._given_up: dict[str, bool] = {}  # the newest GIVEN_UP_KEPT paths given up, in order (checker thread)
        # the newest FINISHED_KEPT series finished: master -> {file: version_of(file) when it finished} (under the lock)
        self._finished: dict[str, dict[str, tuple | None]] = {}
        # the newest COMPLETED_KEPT frame files reported complete: path -> their version then (under the lock)
        self._completed: dict[str, tuple] = {}

    def start(self) -> None:
        for folder in self.folders:
            self._watches[folder] = (self._watch(folder), identity_of(os.stat(folder)))
        self.observer.start()
        self._checker.start()
        log.info("watching %s (%s)", ", ".join(self.folders) or "nothing",
                 "polling" if isinstance(self.observer, PollingObserver) else "inotify/native events")

    def _watch(self, folder: str) -> ObservedWatch:
        return self.observer.schedule(self._handler, folder, recursive=True, event_filter=FILE_EVENTS)

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
        master = nexus.master_of(path)
        with self._lock:
            if master is not None:
                self._notice_series(master, path, t_seen, hinted, written, created)
                return
            pending = self._pending.get(path)
            if pending is None:
                if not created and path in self._completed and self._completed[path] == version_of(path):
                    return  # a late event of a frame reported complete, unchanged since: nothing new
                self._pending[path] = _Pending(t_seen, time.monotonic(), created, written=written)
                self._emit(Event("seen", path, t_seen))
            else:
                pending.hinted = pending.hinted or hinted
                pending.created = pending.created or created
                pending.written = pending.written or written
            if hinted:
                self._lock.notify()

    def _notice_series(self, master: str, path: str, t_seen: float, hinted: bool, written: bool,
                       created: bool) -> None:
        """A file of an HDF5 series (under the lock): follow the series, and hint the file's next check."""
        series = self._series.get(master)
        if series is None:
            finished = self._finished.get(master)
            if finished is not None and not created and path in finished and finished[path] == version_of(path):
                return  # a late event of a finished series' file, unchanged since it was read: nothing new
            series = self._series[master] = _Series(master, t_seen, time.monotonic())
            hinted = True
        if path != master and not series.opened:  # a data file before its master: it waits, while it grows
            series.waiting_data.setdefault(path, t_seen)
            series.last_change = time.monotonic()
        series.hints.setdefault(path, _Hints()).add(hinted, written, created)
        if hinted:
            self._lock.notify()

    def progress(self, path: str) -> None:
        """A file that is no frame changed: if it is a data file of a followed series being written under a
        temporary name, the series is making progress (its incomplete timeout starts again)."""
        temporary = TEMPORARY_DATA.fullmatch(os.path.basename(path))
        if temporary is None:
            return
        master = os.path.join(os.path.dirname(path), temporary.group("series") + nexus.MASTER_SUFFIX)
        with self._lock:
            series = self._series.get(master)
            if series is not None:
                series.last_change = time.monotonic()

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
                self._watches[folder] = (self._watch(folder), current)
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
                followed = list(self._series.values())
            for series in followed:
                try:
                    events, finished = self._check_series(series)
                except Exception as exc:  # a bug must cost this series' check, never the checker thread
                    log.error("checking the series %s raised %s: %s", series.master, type(exc).__name__, exc)
                    events, finished = [], False
                for event in events:
                    self._emit(event)
                if finished:
                    versions = {path: version_of(path) for path in [series.master] + [d.path for d in series.files]}
                    with self._lock:
                        self._series.pop(series.master, None)
                        self._finished.pop(series.master, None)
                        self._finished[series.master] = versions
                        if len(self._finished) > FINISHED_KEPT:
                            del self._finished[next(iter(self._finished))]
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
                with self._lock:  # as it was before it was inspected: a later change is news
                    self._completed.pop(path, None)
                    self._completed[path] = (identity_of(stat), stat.st_size, stat.st_mtime_ns)
                    if len(self._completed) > COMPLETED_KEPT:
                        del self._completed[next(iter(self._completed))]
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

    # ----- HDF5 series ---------------------------------------------------------------------------------------
    def _check_series(self, series: _Series) -> tuple[list[Event], bool]:
        """(events, finished) of one check of a series: its master opened, frames complete or given up."""
        now = time.monotonic()
        with self._lock:
            hints, series.hints = series.hints, {}
        master_hints = hints.pop(series.master, _Hints())
        series.created = series.created or master_hints.created
        series.written = series.written or master_hints.written
        events = []
        if not series.opened:
            events, given_up = self._open_series(series, master_hints.hinted, now)
            if not series.opened:
                with self._lock:  # what was said of its data files waits for the master
                    for path, said in hints.items():
                        series.hints.setdefault(path, _Hints()).add(**vars(said))
                return events, given_up
        for data in series.files:
            if data.path in hints:
                data.hints.add(**vars(hints[data.path]))
            if data.reported < data.count:
                events.extend(self._check_data_file(series, data, now))
        unfinished = [data for data in series.files if data.reported < data.count]
        if unfinished and now - series.last_change > self.incomplete_timeout_s:
            for data in unfinished:
                events.extend(self._give_up_frames(series, data, self._timed_out(data)))
            unfinished = []
        if not unfinished and now - series.last_change <= self.incomplete_timeout_s:
            # every frame reported, but an SWMR writer still holds a data file open: followed until it closes
            # it, so that its closing is not taken for news of a finished series
            unfinished = [data for data in series.files if nexus.swmr_writing(data.path)]
        return events, not unfinished

    def _open_series(self, series: _Series, hinted: bool, now: float) -> tuple[list[Event], bool]:
        """(events, given up): open the master once it can be (it settled, or its writer is done with it), and
        the series' frames are ``seen``; a master that never opens is given up (one error result), and data
        files whose master never comes are given up one by one."""
        master = series.master
        try:
            stat = os.stat(master)
        except FileNotFoundError:
            if now - series.last_change > self.incomplete_timeout_s:
                return self._give_up_orphans(series), True
            return [], False
        except OSError as exc:
            return self._give_up_master(series, unreadable(exc), ""), True
        if stat.st_size != series.size:
            series.size, series.last_change = stat.st_size, now
        elif hinted or stat.st_size != series.checked_size:
            series.checked_size = stat.st_size
            try:
                opened = nexus.open_series(master)
            except FrameError as exc:
                series.cause = str(exc)
            else:
                return self._announce(series, opened, now), False
        if series.written and series.checked_size == stat.st_size:
            return self._give_up_master(series, series.cause, identity_of(stat)), True
        if now - series.last_change > self.incomplete_timeout_s:
            return self._give_up_master(series, "master incomplete after %.0f s without growth: %s"
                                        % (self.incomplete_timeout_s, series.cause), identity_of(stat)), True
        return [], False

    def _announce(self, series: _Series, opened, now: float) -> list[Event]:
        """The opened series' frames are ``seen``, each with the data file that holds it."""
        series.opened, series.last_change, series.image_nr_low = True, now, opened.image_nr_low
        folder = os.path.dirname(series.master)
        series.files = [_DataFile(os.path.join(folder, data.path), data.first_index, data.count)
                        for data in opened.data_files]
        series.waiting_data.clear()
        log.info("series %s: %d frames in %d data files", series.master, opened.count, len(series.files))
        events = [Event("seen", series.master, series.t_seen, frame_index=index, source=data.path,
                        image_number=series.image_nr_low + index)
                  for data in series.files for index in range(data.first_index, data.first_index + data.count)]
        unlinked = sorted(set(range(opened.count)) - {event.frame_index for event in events})
        reason = "%s links no data file for %s" % (os.path.basename(series.master), frame_ranges(unlinked))
        for index in unlinked:  # the master counts frames no data file of it holds: never coming
            events += [Event("seen", series.master, series.t_seen, frame_index=index,
                             image_number=series.image_nr_low + index),
                       Event("incomplete", series.master, series.t_seen, reason=reason, identity="",
                             frame_index=index, image_number=series.image_nr_low + index)]
        return events

    def _check_data_file(self, series: _Series, data: _DataFile, now: float) -> list[Event]:
        """Report the frames of a data file that became complete; give up the rest if its writer is done with
        it short of them."""
        try:
            stat = os.stat(data.path)
        except OSError:
            return []  # not there (yet): the series' timeout says when it never came
        identity = identity_of(stat)
        if data.identity and identity != data.identity:  # written again under its name: a new file
            data.reported, data.checked = 0, (-1, -1)
            data.hints.add(hinted=True, written=False, created=True)
        data.identity = identity
        version = (stat.st_size, stat.st_mtime_ns)
        growing = stat.st_size != data.size
        if growing:
            data.size, series.last_change = stat.st_size, now
        if not data.hints.hinted:
            if nexus.swmr_writing(data.path):  # readable while written: read when it changed, and now and then
                if version == data.checked and now - data.checked_at < SWMR_RECHECK_S:  # (coarse mtimes)
                    return []
            elif growing or version == data.checked:
                return []  # still growing (checked once it settles), or read as it is
        hints, data.hints = data.hints, _Hints(created=data.hints.created)
        data.checked, data.checked_at = version, now
        complete = nexus.complete_frames(data.path)
        if complete and not data.counted:
            data.counted = self._respread(series, data)
        complete = min(data.count, complete)
        t_complete = time.time()
        events = [Event("complete", series.master, series.t_seen, t_complete=t_complete, identity=identity,
                        created=hints.created or series.created, frame_index=data.first_index + k, source=data.path,
                        image_number=series.image_nr_low + data.first_index + k)
                  for k in range(data.reported, complete)]
        if complete > data.reported:
            data.reported, series.last_change = complete, now
        if hints.written and data.reported < data.count:
            events.extend(self._give_up_frames(series, data, "data file %s was closed with %d of its %d frames "
                                               "complete (truncated or corrupt)" % (data.path, complete, data.count)))
        return events

    @staticmethod
    def _respread(series: _Series, readable: _DataFile) -> bool:
        """Read again where each data file's frames lie, now that ``readable`` can say how many it holds (a
        legacy master does not say it; the reader guesses from the data files there); whether it worked."""
        try:
            opened = nexus.open_series(series.master)
        except FrameError:
            return False
        folder = os.path.dirname(series.master)
        spread = {os.path.join(folder, d.path): d for d in opened.data_files}
        for data in series.files:
            if data.path in spread:
                data.first_index, data.count = spread[data.path].first_index, spread[data.path].count
        return readable.path in spread

    def _timed_out(self, data: _DataFile) -> str:
        if data.size < 0:
            return "data file %s never came" % data.path
        return "data file %s incomplete after %.0f s without progress" % (data.path, self.incomplete_timeout_s)

    def _give_up_frames(self, series: _Series, data: _DataFile, cause: str) -> list[Event]:
        """The frames of a data file not yet reported, given up with ``cause`` and the missing frames named."""
        missing = data.missing()
        reason = "%s: %s of %s missing" % (cause, frame_ranges(missing), os.path.basename(series.master))
        data.reported = data.count
        return [Event("incomplete", series.master, series.t_seen, reason=reason, identity=data.identity,
                      created=data.hints.created or series.created, frame_index=index, source=data.path,
                      image_number=series.image_nr_low + index)
                for index in missing]

    def _give_up_master(self, series: _Series, cause: str, identity: str) -> list[Event]:
        """A master that does not open: one error result for it (``seen`` first, so the ledger has it)."""
        return [Event("seen", series.master, series.t_seen),
                Event("incomplete", series.master, series.t_seen, reason=cause, identity=identity,
                      created=series.created)]

    def _give_up_orphans(self, series: _Series) -> list[Event]:
        """Data files whose master never came: one error result each, numbered by the first image it holds (its
        collection is its master's series, which its frames join should the master come)."""
        events = []
        for path, t_seen in series.waiting_data.items():
            stat = status_of(path)
            reason = ("no master %s within %.0f s: a data file alone has no geometry"
                      % (os.path.basename(series.master), self.incomplete_timeout_s))
            try:
                number = nexus.open_series(path).image_nr_low
            except FrameError:
                number = None
            events += [Event("seen", path, t_seen, image_number=number),
                       Event("incomplete", path, t_seen, reason=reason, identity=identity_of(stat) if stat else "",
                             image_number=number)]
        return events
