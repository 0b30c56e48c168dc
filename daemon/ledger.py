"""The in-flight ledger: the single record of every frame's state, in SQLite (WAL) under the state folder.

States: ``seen`` (file noticed, not yet complete) → ``queued`` → ``dispatched`` (sent; ``worker`` is set
once a worker says it started) → ``done`` | ``failed``.  A frame leaves the ledger's in-flight states only by
:meth:`Ledger.finish`, which assigns the publication ``seq`` and stores the message in the same transaction:
a restart can neither lose nor renumber a result.  Each ledger has an id, made once and stored in it, that
every stored message carries beside its ``seq`` (a new ledger numbers from 1 again).  A damaged ledger is
refused at start (:class:`LedgerDamaged`), never read in part.  Only the service's main thread writes; the HTTP
threads read through :func:`read_messages` on their own connections.

A frame is a file and, for a frame of a multi-frame file (an EIGER HDF5 series, named by its master), its
``frame_index``; such a frame's pixels are in its ``source`` (a data file).  A ledger from before frame
indices is migrated when opened (:func:`_key_by_frame`).  A frame's ``identity`` is the file it was analysed
from (``dev:ino``): a file re-created under a known name re-opens the frame, and :meth:`Ledger.known` tells
the catch-up scan which files are new.  Deadlines are
``time.monotonic()`` values: they only mean something within one run, and a start re-queues what was in flight.
Final frames and stored messages older than the retention are pruned (:meth:`Ledger.prune`).
"""
from __future__ import annotations

import collections
import json
import os
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

FILE_NAME = "ledger.sqlite3"
FINAL = ("done", "failed")
STATES = ("seen", "queued", "dispatched") + FINAL

# A frame is (path, frame_index): frame_index is NULL for a single-frame file (CBF), else the 0-based frame of
# the multi-frame file (an HDF5 series' master) at path; ``source`` is the file its pixels are in (an HDF5 data
# file), whose identity is the frame's, and ``image_number`` its number in the series (a CBF's is in its name).
FRAMES_TABLE = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    collection TEXT NOT NULL,
    state TEXT NOT NULL,
    t_seen REAL NOT NULL,
    t_complete REAL,
    t_done REAL,
    worker TEXT,
    deadline REAL,
    tries INTEGER NOT NULL DEFAULT 0,
    seq INTEGER UNIQUE,
    identity TEXT,
    frame_index INTEGER,
    source TEXT,
    image_number INTEGER
)"""
SCHEMA = FRAMES_TABLE + """;
CREATE UNIQUE INDEX IF NOT EXISTS frames_key ON frames (path, ifnull(frame_index, -1));
CREATE INDEX IF NOT EXISTS frames_source ON frames (source) WHERE source IS NOT NULL;
CREATE INDEX IF NOT EXISTS frames_state ON frames (state, id);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    topic TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('id', lower(hex(randomblob(8))));
INSERT OR IGNORE INTO counters VALUES ('seq', 0);
INSERT OR IGNORE INTO counters SELECT 'done', COUNT(*) FROM frames WHERE state = 'done';
INSERT OR IGNORE INTO counters SELECT 'failed', COUNT(*) FROM frames WHERE state = 'failed';
"""


@dataclass(frozen=True)
class Frame:
    id: int
    path: str
    collection: str
    state: str
    t_seen: float
    t_complete: float | None
    t_done: float | None
    worker: str | None
    deadline: float | None
    tries: int
    seq: int | None
    identity: str | None
    frame_index: int | None = None  # the frame inside a multi-frame file (None: a single-frame file)
    source: str | None = None  # the file holding its pixels when that is not ``path`` (an HDF5 data file)
    image_number: int | None = None  # its number in its series, when its name does not say it (HDF5)


_COLUMNS = ("id, path, collection, state, t_seen, t_complete, t_done, worker, deadline, tries, seq, identity, "
            "frame_index, source, image_number")
_KEY = "path = ? AND frame_index IS ?"  # one frame: the frames_key index

_INSERT_SEEN = ("INSERT OR IGNORE INTO frames (path, collection, state, t_seen, frame_index, source, image_number) "
                "VALUES (?, ?, 'seen', ?, ?, ?, ?)")

# compose(seq, frame) -> (topic, body): the publisher's message for a frame's final state.
Compose = Callable[[int, Frame], tuple[str, dict]]


def _stored_path(path: str | None) -> str | bytes | None:
    """A path as the ledger keeps it: text when it is UTF-8 (every ordinary name), else its exact bytes (a BLOB);
    None (no data file) stays None.

    Linux names are bytes; Python decodes undecodable ones with surrogate escapes, which SQLite text refuses.
    """
    if path is None:
        return None
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def _read_path(stored: str | bytes) -> str:
    """The path :func:`_stored_path` stored, exactly as the file system named it."""
    return os.fsdecode(stored) if isinstance(stored, bytes) else stored


def _frame(row: tuple) -> Frame:
    frame = Frame(row[0], _read_path(row[1]), *row[2:])
    return frame if frame.source is None else replace(frame, source=_read_path(frame.source))


def _key_by_frame(db: sqlite3.Connection, columns: list[str]) -> None:
    """Migrate a ledger from before multi-frame files, whose frames were keyed by path alone: its frames table
    is made again with its rows (SQLite cannot drop a UNIQUE constraint in place), in one transaction."""
    kept = ", ".join(columns)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE frames RENAME TO frames_before_frame_index")
        db.execute(FRAMES_TABLE)
        db.execute("INSERT INTO frames (%s) SELECT %s FROM frames_before_frame_index" % (kept, kept))
        db.execute("DROP TABLE frames_before_frame_index")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def connect(db_path: str) -> sqlite3.Connection:
    db = sqlite3.connect(db_path, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode a commit survives a killed process
    return db


class LedgerDamaged(RuntimeError):
    """The ledger file fails its integrity check; the message says how (for the user, with the file's name)."""


class LedgerUnwritable(RuntimeError):
    """A write failed and was rolled back because the disk is full or the folder read-only: retry it later."""


class WriteBacklog:
    """Ledger writes that must land in order.  While the ledger refuses writes, a write waits here with every
    write added after it, and :meth:`retry` runs them again, oldest first, up to the first still refused."""

    def __init__(self):
        self._waiting: collections.deque[Callable[[], object]] = collections.deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, *writes: Callable[[], object]) -> None:
        self._waiting.extend(writes)

    def retry(self) -> bool:
        """Run the waiting writes in order; True when none is left."""
        while self._waiting:
            try:
                self._waiting[0]()
            except LedgerUnwritable:
                return False
            self._waiting.popleft()
        return True


def _create(path: str) -> None:
    """A new ledger, made under another name and renamed into place: a file at the ledger's name is always a
    whole ledger, so an empty or foreign one there is damage, never a first start cut short."""
    fresh = path + ".new"
    for leftover in (fresh, fresh + "-wal", fresh + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    db = connect(fresh)
    db.executescript(SCHEMA)
    db.close()
    os.replace(fresh, path)


WAL_MAGIC = (0x377F0682, 0x377F0683)  # little- and big-endian checksums
WAL_HEADER, FRAME_HEADER = 32, 24


def _wal_checksum(data: bytes, sums: tuple[int, int], big_endian: bool) -> tuple[int, int]:
    """SQLite's cumulative checksum of the write-ahead log, over 32-bit words taken in pairs."""
    words = struct.unpack("%s%dI" % (">" if big_endian else "<", len(data) // 4), data)
    s0, s1 = sums
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def check_wal(db_path: str) -> None:
    """LedgerDamaged when SQLite would drop committed transactions of the write-ahead log left by a killed
    service: its header is broken, or a commit of its current generation (its salts) lies at or after the
    first frame that fails the checksum.  SQLite stops reading a log there without a word, and the seq
    numbers of what it dropped would be issued again.  Frames of an older generation, and an unfinished
    last transaction, are what a kill leaves behind: SQLite rightly ignores those."""
    wal = db_path + "-wal"
    try:
        with open(wal, "rb") as fh:
            log = fh.read()
    except FileNotFoundError:
        return
    if len(log) < WAL_HEADER:
        return
    magic, _, page_size, _, salt1, salt2, sum1, sum2 = struct.unpack(">8I", log[:WAL_HEADER])
    big_endian = bool(magic & 1)
    if magic not in WAL_MAGIC or _wal_checksum(log[:24], (0, 0), big_endian) != (sum1, sum2):
        if len(log) > WAL_HEADER + FRAME_HEADER:
            raise LedgerDamaged("ledger %s is damaged: its write-ahead log %s has a broken header" % (db_path, wal))
        return
    frame_size = FRAME_HEADER + page_size
    sums, intact = (sum1, sum2), True
    for start in range(WAL_HEADER, len(log) - frame_size + 1, frame_size):
        _, commit, frame_salt1, frame_salt2, check1, check2 = struct.unpack(">6I", log[start:start + FRAME_HEADER])
        current = (frame_salt1, frame_salt2) == (salt1, salt2)
        if intact and current:
            sums = _wal_checksum(log[start:start + 8] + log[start + FRAME_HEADER:start + frame_size], sums, big_endian)
            intact = sums == (check1, check2)
        else:
            intact = False
        if not intact and current and commit:
            raise LedgerDamaged("ledger %s is damaged: its write-ahead log %s fails its checksum at byte %d, "
                                "before committed transactions" % (db_path, wal, start))


def check_intact(db_path: str) -> None:
    """LedgerDamaged unless the file is a ledger that passes SQLite's quick_check: damage found at start stops
    the start, instead of failing queries later and issuing seq numbers again from a ledger read in part."""
    db = sqlite3.connect(db_path, timeout=10.0, isolation_level=None)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        tables, problems = set(), [str(exc)]
    finally:
        db.close()
    if problems != ["ok"]:
        raise LedgerDamaged("ledger %s is damaged: %s" % (db_path, "; ".join(problems)))
    if "frames" not in tables:
        raise LedgerDamaged("ledger %s is damaged: it is empty or not a ledger" % db_path)


class Ledger:
    def __init__(self, *, state_dir: str):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, FILE_NAME)
        if not os.path.exists(self.path):
            _create(self.path)
        check_wal(self.path)  # before SQLite reads the log
        check_intact(self.path)
        self.db = connect(self.path)
        self.write_error: str | None = None  # why the last write failed, until a write succeeds again
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(frames)")}
        if columns and "identity" not in columns:  # a ledger from before identities
            self.db.execute("ALTER TABLE frames ADD COLUMN identity TEXT")
            columns.add("identity")
        if columns and "frame_index" not in columns:  # a ledger from before multi-frame files
            _key_by_frame(self.db, sorted(columns))
        self.db.executescript(SCHEMA)
        self.id = self.db.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def _transaction(self):
        return _Transaction(self)

    def _frames(self, where: str, args: tuple = (), limit: int = -1) -> list[Frame]:
        rows = self.db.execute("SELECT %s FROM frames WHERE %s ORDER BY id LIMIT %d" % (_COLUMNS, where, limit), args)
        return [_frame(row) for row in rows]

    def get(self, frame_id: int) -> Frame | None:
        found = self._frames("id = ?", (frame_id,))
        return found[0] if found else None

    def see(self, path: str, collection: str, t_seen: float, frame_index: int | None = None,
            source: str | None = None, image_number: int | None = None) -> bool:
        """Record a frame noticed (frame ``frame_index`` of ``path``, its pixels in ``source``); False when it
        was already known."""
        with self._transaction():
            cursor = self.db.execute(_INSERT_SEEN, (_stored_path(path), collection, t_seen, frame_index,
                                                    _stored_path(source), image_number))
        return cursor.rowcount == 1

    def enqueue(self, path: str, collection: str, t_seen: float, t_complete: float, identity: str,
                created: bool = False, frame_index: int | None = None, source: str | None = None,
                image_number: int | None = None) -> bool:
        """A complete frame becomes ready for dispatch; False when it was already queued or beyond.

        A finished frame is re-opened when its file is a new one (``created`` by a create or rename event, or
        another ``identity``): a shot re-collected under the same name, or a file completed after it was
        given up.
        """
        with self._transaction():
            self.db.execute(_INSERT_SEEN, (_stored_path(path), collection, t_seen, frame_index,
                                           _stored_path(source), image_number))
            cursor = self.db.execute(
                "UPDATE frames SET state = 'queued', t_seen = ?, t_complete = ?, identity = ?, tries = 0, "
                "worker = NULL, deadline = NULL, source = ifnull(?, source) WHERE " + _KEY + " AND (state = 'seen' "
                "OR (state IN ('done', 'failed') AND (? OR identity IS NOT ?) AND identity IS NOT NULL))",
                (t_seen, t_complete, identity, _stored_path(source), _stored_path(path), frame_index, created,
                 identity))
        return cursor.rowcount == 1

    def give_up(self, path: str, identity: str, created: bool = False, frame_index: int | None = None) -> Frame | None:
        """The frame to fail because its file never completed: one still ``seen``, or a finished one whose file
        is a new one (as in :meth:`enqueue`); None when there is nothing to fail."""
        with self._transaction():
            cursor = self.db.execute(
                "UPDATE frames SET state = 'seen', identity = ?, tries = 0 WHERE " + _KEY + " AND (state = 'seen' OR "
                "(state IN ('done', 'failed') AND (? OR identity IS NOT ?) AND identity IS NOT NULL))",
                (identity, _stored_path(path), frame_index, created, identity))
        return self.find(path, frame_index) if cursor.rowcount == 1 else None

    def queued(self, limit: int) -> list[Frame]:
        return self._frames("state = 'queued'", limit=max(0, int(limit)))

    def mark_dispatched(self, frame_id: int, deadline: float) -> None:
        with self._transaction():
            self.db.execute("UPDATE frames SET state = 'dispatched', deadline = ?, worker = NULL "
                            "WHERE id = ? AND state = 'queued'", (deadline, frame_id))

    def mark_started(self, frame_id: int, worker: str, deadline: float) -> bool:
        """A worker took the frame; a late start of a re-queued frame claims it so it is not sent twice."""
        with self._transaction():
            cursor = self.db.execute("UPDATE frames SET state = 'dispatched', worker = ?, deadline = ? "
                                     "WHERE id = ? AND state IN ('queued', 'dispatched')", (worker, deadline, frame_id))
        return cursor.rowcount == 1

    def overdue(self, now: float) -> list[Frame]:
        return self._frames("state = 'dispatched' AND deadline < ?", (now,))

    def held_by(self, worker: str) -> list[Frame]:
        return self._frames("state = 'dispatched' AND worker = ?", (worker,))

    def release(self, frame_id: int, charge: bool, max_tries: int) -> bool:
        """Put a dispatched frame back in the queue; ``charge`` counts a try against it (its worker died or hung).

        False when a charged try used up the frame's tries: it stays dispatched and the caller must fail it.
        An uncharged release always re-queues, even a frame at its limit (``max_tries`` lowered since, or a
        service killed between a charged release and the failure): the next charged loss fails it.
        """
        with self._transaction():
            row = self.db.execute("SELECT tries FROM frames WHERE id = ? AND state = 'dispatched'",
                                  (frame_id,)).fetchone()
            if row is None:
                return True
            tries = row[0] + (1 if charge else 0)
            if charge and tries >= max_tries:
                self.db.execute("UPDATE frames SET tries = ? WHERE id = ?", (tries, frame_id))
                return False
            self.db.execute("UPDATE frames SET state = 'queued', tries = ?, worker = NULL, deadline = NULL "
                            "WHERE id = ?",
                            (tries, frame_id))
        return True

    def requeue_in_flight(self) -> int:
        """After a restart nothing is in any worker's hands: every dispatched frame goes back to the queue."""
        with self._transaction():
            cursor = self.db.execute("UPDATE frames SET state = 'queued', worker = NULL, deadline = NULL "
                                     "WHERE state = 'dispatched'")
        return cursor.rowcount

    def oldest_seen(self) -> float | None:
        """When the longest-waiting frame still not complete was seen (wall time), None if there is none.

        Frames of an HDF5 series are left out: they are seen when the master is, and wait for their data files
        as long as the collection runs; the watcher gives up a series that stops making progress."""
        return self.db.execute("SELECT MIN(t_seen) FROM frames WHERE state = 'seen' AND frame_index IS NULL"
                               ).fetchone()[0]

    def seen_only(self) -> list[Frame]:
        return self._frames("state = 'seen'")

    def unfinished(self) -> list[Frame]:
        """Every frame not yet done or failed (the collections count them as in flight after a restart)."""
        return self._frames("state NOT IN ('done', 'failed')")

    def find(self, path: str, frame_index: int | None = None) -> Frame | None:
        found = self._frames(_KEY, (_stored_path(path), frame_index))
        return found[0] if found else None

    def known(self, path: str, identity: str) -> bool:
        """Whether the file ``identity`` at ``path`` needs no catch-up: its frame is being followed or in
        flight, or finished from this file (or from a file of a ledger that kept no identities).  A multi-frame
        file (an HDF5 master) is known once its series is recorded; a file holding the pixels of such frames (an
        HDF5 data file) while none of them was finished from another file."""
        row = self.db.execute("SELECT state, identity, frame_index FROM frames WHERE path = ? LIMIT 1",
                              (_stored_path(path),)).fetchone()
        if row is not None:
            return row[2] is not None or row[0] not in FINAL or row[1] is None or row[1] == identity
        rows = self.db.execute("SELECT state, identity FROM frames WHERE source = ?", (_stored_path(path),)).fetchall()
        return bool(rows) and all(state not in FINAL or known is None or known == identity for state, known in rows)

    def _next_seq(self) -> int:
        self.db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
        return self.db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def _store(self, seq: int, topic: str, body: dict) -> dict:
        """Store a message under its seq, stamped with this ledger's id: a seq means something only beside the
        id of the ledger that issued it (a new ledger starts again from 1)."""
        body["ledger"] = self.id
        self.db.execute("INSERT INTO messages VALUES (?, ?, ?, ?)", (seq, body["type"], topic, json.dumps(body)))
        return {"topic": topic, "body": body}

    def finish(self, frame_id: int, state: str, now: float, compose: Compose) -> dict | None:
        """The frame's final state, its seq and its message in one transaction; None if it was already final."""
        assert state in FINAL
        with self._transaction():
            found = self._frames("id = ? AND state NOT IN ('done', 'failed')", (frame_id,))
            if not found:
                return None
            seq = self._next_seq()
            self.db.execute("UPDATE frames SET state = ?, t_done = ?, seq = ? WHERE id = ?",
                            (state, now, seq, frame_id))
            self.db.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (state,))
            return self._store(seq, *compose(seq, self.get(frame_id)))

    def record(self, compose: Callable[[int], tuple[str, dict]]) -> dict:
        """Store a message that concerns no single frame's outcome (service errors)."""
        with self._transaction():
            seq = self._next_seq()
            return self._store(seq, *compose(seq))

    def counts(self) -> dict[str, int]:
        """Frames per state: the unfinished ones counted through the state index, the finished ones kept as
        totals, so the cost does not grow with the history."""
        counts = dict.fromkeys(STATES, 0)
        counts.update(self.db.execute("SELECT state, COUNT(*) FROM frames WHERE state IN ('seen', 'queued', "
                                      "'dispatched') GROUP BY state"))
        counts.update(self.db.execute("SELECT name, value FROM counters WHERE name IN ('done', 'failed')"))
        return counts

    def prune(self, before: float) -> int:
        """Forget frames finished before ``before`` (wall time) and the stored messages up to the newest of
        them; how many frames."""
        with self._transaction():
            newest = self.db.execute("SELECT MAX(seq) FROM frames WHERE state IN ('done', 'failed') AND t_done < ?",
                                     (before,)).fetchone()[0]
            if newest is None:
                return 0
            self.db.execute("DELETE FROM messages WHERE seq <= ?", (newest,))
            cursor = self.db.execute("DELETE FROM frames WHERE state IN ('done', 'failed') AND t_done < ?", (before,))
        return cursor.rowcount

    def check_writable(self) -> bool:
        """Whether a write commits again after a refusal (a write that changes nothing); clears ``write_error``."""
        try:
            with self._transaction():
                self.db.execute("UPDATE counters SET value = value WHERE name = 'seq'")
        except LedgerUnwritable:
            return False
        return True

    def last_seq(self) -> int:
        """The newest seq issued: every seq belongs to a stored message (results, errors), so a gap in what
        /results serves is a loss (or the retention's pruning), never a number spent elsewhere."""
        return self.db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]


_UNWRITABLE = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on an exception (the connection runs in autocommit mode).

    A write the disk or the folder refuses (full, read-only) becomes LedgerUnwritable and is noted in the
    ledger's ``write_error`` until a transaction commits again: the service stays up and retries.
    """

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.db = ledger.db

    def __enter__(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            self._refused(exc)
            raise

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.OperationalError as failed:
                exc = failed
            else:
                self.ledger.write_error = None
                return False
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._refused(exc)
        if exc_type is None:
            raise exc
        return False

    def _refused(self, exc: BaseException) -> None:
        """LedgerUnwritable (from ``exc``) when the disk or the folder refused the write."""
        if isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorname", "").startswith(_UNWRITABLE):
            self.ledger.write_error = str(exc)
            raise LedgerUnwritable("the ledger %s cannot be written: %s" % (self.ledger.path, exc)) from exc


def read_messages(state_dir: str, since: int, limit: int = 1000) -> tuple[list[dict], int, str]:
    """Stored messages (results, errors) with seq > since, oldest first, the last seq issued and the ledger's id.

    For late subscribers; it opens its own read-only connection, so any thread may call it.
    """
    path = os.path.join(state_dir, FILE_NAME)
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10.0, isolation_level=None)
    try:
        db.execute("BEGIN")  # one read snapshot: the rows and the last seq agree
        rows = db.execute("SELECT body FROM messages WHERE seq > ? ORDER BY seq LIMIT ?", (since, limit)).fetchall()
        last = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]
        ledger_id = db.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()[0]
    finally:
        db.close()
    return [json.loads(body) for (body,) in rows], last, ledger_id
