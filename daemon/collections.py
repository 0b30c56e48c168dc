"""Collections: what the service knows per sweep or grid, and the ``collection`` messages that say it.

A collection is every frame of one folder + file template (``/data/visit/thau_3_2_#####.cbf``, the
``collection`` field of every result) or of one HDF5 series (keyed by its master).  Control software may
announce one before its first frame (``POST /api/v1/collections``: template or master, first image number,
count, optionally a grid and a ``dcid`` to echo); unannounced ones are found from their frames.

Per collection the service keeps the frames noticed but not finished, each finished frame's numbers (for the
plots and the heat map) and its best frame, and publishes, stored in the ledger like the results (same
envelope, ``seq`` and ``/results?since=``):

* ``start`` when it is announced or its first frame is noticed (so before its first result);
* ``summary`` at most every ``SUMMARY_EVERY_S`` while results arrive;
* ``end`` once every expected frame is finished (``reason: complete``), or after ``collection_quiet_s``
  without a new frame and with none in flight (``reason: quiet``).  A frame after the end opens it again.

All three carry the counts, the completeness, the missing numbers (as ``[first, last]`` ranges), the best
frame and, for a grid, the best frame's cell and the centre of mass of the good Bragg candidates.  The state
is rebuilt from the ledger's stored messages at start (:meth:`Collections.rebuild`), so a restart keeps the
completeness and sends ``end`` once.  The main thread changes the state; HTTP threads read it under the lock.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import ledger as ledger_module
from .http import HttpServer, Request, Response, error_response, json_response
from .publisher import envelope, readable, topic

SUMMARY_EVERY_S = 2.0  # at most one summary per collection this often while its results arrive
TICK_S = 0.25  # the periodic task's interval: starts, summaries and ends are due at most this late
MAX_ENDED = 50  # ended collections kept in memory, per-frame numbers and all (the oldest are forgotten; the
# ledger keeps their messages for /results)
MAX_GRID_CELLS = 1_000_000
MAX_COUNT = 10_000_000
SERIES_LOOK_S = 1.0  # how often a master whose frame count is unknown is read again
PREFIX = "/api/v1/collections"
COMPRESSED = (".gz", ".bz2")


def collection_id(key: str) -> str:
    """A short, stable id for URLs: the same key gives the same id across restarts."""
    return hashlib.sha1(os.fsencode(key)).hexdigest()[:12]


class AnnouncementError(ValueError):
    """A bad announcement; the message is for the client."""


@dataclass(frozen=True)
class Grid:
    """A raster scan: frames in acquisition order fill ``rows`` x ``cols`` cells along the fast axis
    (``fast: "col"``: along a row, left to right, then the next row; ``"row"``: down a column), every other
    line reversed when ``snaked``.  Rows and columns are 0-based; cell numbers (MXCuBE's) are 1-based in
    acquisition (snake) order."""

    rows: int
    cols: int
    snaked: bool = True
    fast: str = "col"

    def place(self, k: int) -> tuple[int, int] | None:
        """(row, col) of the ``k``-th frame of the scan (0-based), None outside the grid."""
        if not 0 <= k < self.rows * self.cols:
            return None
        if self.fast == "col":
            row, col = divmod(k, self.cols)
            if self.snaked and row % 2:
                col = self.cols - 1 - col
        else:
            col, row = divmod(k, self.rows)
            if self.snaked and col % 2:
                row = self.rows - 1 - row
        return row, col

    def as_dict(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "snaked": self.snaked, "fast": self.fast}


@dataclass(frozen=True)
class Announcement:
    key: str
    first: int
    count: int | None
    grid: Grid | None
    dcid: object


def _integer(data: dict, name: str, default: int | None, minimum: int, maximum: int) -> int | None:
    value = data.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise AnnouncementError("%s: expected an integer from %d to %d, got %r" % (name, minimum, maximum, value))
    return value


def template_key(template: str) -> str:
    """The collection key of an announced file template: ``#`` runs (or a ``%05d``) for the number, a .gz/.bz2
    suffix dropped (frames of one template are one collection however they are compressed)."""
    template = re.sub(r"%0?(\d+)d", lambda m: "#" * int(m.group(1)), template)
    for suffix in COMPRESSED:
        if template.endswith(suffix):
            template = template[:-len(suffix)]
    if "#" not in os.path.basename(template):
        raise AnnouncementError("template: the file name needs a run of # (or %%05d) for the image number")
    return os.path.normpath(template)


def parse_announcement(body: bytes) -> Announcement:
    """The announcement in a POST body (JSON); AnnouncementError with the reason."""
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise AnnouncementError("the body is not JSON: %s" % exc) from None
    if not isinstance(data, dict):
        raise AnnouncementError("the body must be a JSON object")
    unknown = set(data) - {"template", "master", "first", "count", "grid", "dcid"}
    if unknown:
        raise AnnouncementError("unknown fields: %s" % ", ".join(sorted(unknown)))
    template, master = data.get("template"), data.get("master")
    if (template is None) == (master is None):
        raise AnnouncementError("give either template (folder + file name with ####) or master (an HDF5 master)")
    path = template if master is None else master
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise AnnouncementError("%s: expected an absolute path" % ("template" if master is None else "master"))
    key = template_key(path) if master is None else readable(os.path.normpath(path))
    first = _integer(data, "first", 1, 0, 1 << 31)
    count = _integer(data, "count", None, 1, MAX_COUNT)
    dcid = data.get("dcid")
    if not isinstance(dcid, (int, str, type(None))) or isinstance(dcid, bool) or len(str(dcid)) > 200:
        raise AnnouncementError("dcid: expected an integer or a short string")
    grid = data.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or set(grid) - {"rows", "cols", "snaked", "fast"}:
            raise AnnouncementError("grid: expected {rows, cols, snaked, fast}")
        rows = _integer(grid, "rows", 0, 1, MAX_GRID_CELLS)
        cols = _integer(grid, "cols", 0, 1, MAX_GRID_CELLS)
        snaked, fast = grid.get("snaked", True), grid.get("fast", "col")
        if not isinstance(snaked, bool) or fast not in ("col", "row"):
            raise AnnouncementError('grid: snaked is true or false, fast is "col" (along rows) or "row"')
        if rows * cols > MAX_GRID_CELLS:
            raise AnnouncementError("grid: at most %d cells" % MAX_GRID_CELLS)
        grid = Grid(rows, cols, snaked, fast)
        count = count or rows * cols
    return Announcement(key, first, count, grid, dcid)


@dataclass(slots=True)
class Row:
    """A finished frame's numbers for the plots."""

    seq: int
    ok: bool
    spots: int | None
    bragg: int | None
    resolution: float | None
    file: str


def _row(body: dict) -> Row:
    resolution = body.get("method2_resolution")
    if resolution is None:
        resolution = body.get("method1_resolution")
    return Row(body["seq"], body.get("status") == "ok", body.get("spot_total"), body.get("good_bragg_candidates"),
               resolution, body.get("file") or "")


def _number(number: int | None) -> int:
    """A frame's image number; a file without one counts as image 1 of its own collection."""
    return 1 if number is None else int(number)


def _ranges(numbers: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


class Collection:
    def __init__(self, key: str, now: float):
        self.key = key
        self.id = collection_id(key)
        self.hdf5 = key.endswith((".h5", ".nxs", ".hdf5"))
        self.announced: Announcement | None = None
        self.rows: dict[int, Row] = {}
        self.pending: set[int] = set()  # noticed, not finished
        self.best: int | None = None
        self.open = True
        self.started = False  # its start message is stored
        self.end_reason: str | None = None
        self.changed = False  # results since the last summary
        self.last_summary = 0.0
        self.last_activity = now
        self.expected_count: int | None = None  # from an HDF5 master, when known
        self.series_first: int | None = None  # an HDF5 series' first image number, when known
        self.next_look = 0.0  # when to read a master whose count is not known yet again

    # ----- what it knows -----------------------------------------------------------------------------------
    @property
    def grid(self) -> Grid | None:
        return self.announced.grid if self.announced else None

    @property
    def count(self) -> int | None:
        return self.announced.count if self.announced and self.announced.count else self.expected_count

    def first_number(self) -> int | None:
        if self.announced:
            return self.announced.first
        if self.series_first is not None:
            return self.series_first
        numbers = list(self.rows) + list(self.pending)
        return min(numbers) if numbers else None

    def expected_numbers(self) -> range:
        """The image numbers the collection should have: announced or known, else the span seen so far."""
        first = self.first_number()
        if first is None:
            return range(0)
        if self.count:
            return range(first, first + self.count)
        last = max(list(self.rows) + list(self.pending))
        return range(first, last + 1)

    def missing(self) -> list[int]:
        return [n for n in self.expected_numbers() if n not in self.rows and n not in self.pending]

    def complete(self) -> bool:
        # asked every tick of every open collection: the count decides most of them without the scan
        return (bool(self.count) and not self.pending and len(self.rows) >= self.count
                and all(n in self.rows for n in self.expected_numbers()))

    def place(self, number: int) -> dict | None:
        grid, first = self.grid, self.first_number()
        if grid is None or first is None:
            return None
        spot = grid.place(number - first)
        return None if spot is None else {"row": spot[0], "col": spot[1], "cell": number - first + 1}

    def centre_of_mass(self) -> dict | None:
        """Of the good Bragg candidates over the grid's cells (0-based row, col; None when there are none)."""
        if self.grid is None:
            return None
        total = row_sum = col_sum = 0.0
        for number, row in self.rows.items():
            cell = self.place(number)
            if cell is not None and row.bragg:
                total += row.bragg
                row_sum += row.bragg * cell["row"]
                col_sum += row.bragg * cell["col"]
        return None if not total else {"row": round(row_sum / total, 3), "col": round(col_sum / total, 3)}

    def summary(self) -> dict:
        """The counts, completeness, missing numbers, best frame and grid facts (messages and the list)."""
        done = sum(1 for row in self.rows.values() if row.ok)
        expected = self.expected_numbers()
        numbers = list(self.rows) + list(self.pending)
        best = None
        if self.best is not None:
            row = self.rows[self.best]
            best = {"image_number": self.best, "good_bragg_candidates": row.bragg, "spot_total": row.spots,
                    "resolution": row.resolution, "file": row.file, "seq": row.seq}
            if self.grid is not None:
                best["cell"] = self.place(self.best)
        missing = self.missing()
        out = {"id": self.id, "kind": "hdf5" if self.hdf5 else "files",
               ("master" if self.hdf5 else "template"): self.key,
               "dcid": self.announced.dcid if self.announced else None, "announced": self.announced is not None,
               "state": "open" if self.open else "ended", "end_reason": self.end_reason,
               "first_image": min(numbers) if numbers else None, "last_image": max(numbers) if numbers else None,
               "n_expected": self.count, "n_seen": len(self.rows) + len(self.pending), "n_done": done,
               "n_failed": len(self.rows) - done, "n_pending": len(self.pending),
               "completeness": round(done / len(expected), 6) if len(expected) else None,
               "n_missing": len(missing), "missing": _ranges(missing),
               "failed": _ranges(sorted(n for n, row in self.rows.items() if not row.ok)), "best": best,
               "grid": self.grid.as_dict() if self.grid else None, "centre_of_mass": self.centre_of_mass()}
        if self.announced:
            out["image_range"] = [expected.start, expected.stop - 1] if len(expected) else None
        return out

    def detail(self) -> dict:
        """The summary plus the per-frame arrays (by image number) and, for a grid, the heat map rows x cols
        in un-snaked order (``None`` for a cell without a result)."""
        out = self.summary()
        numbers = sorted(self.rows)
        rows = [self.rows[n] for n in numbers]
        out["frames"] = {"image_number": numbers, "seq": [r.seq for r in rows],
                         "status": ["ok" if r.ok else "error" for r in rows], "spot_total": [r.spots for r in rows],
                         "good_bragg_candidates": [r.bragg for r in rows], "resolution": [r.resolution for r in rows]}
        if self.grid is not None:
            out["heatmap"] = self.heatmap()
        return out

    def heatmap(self) -> dict:
        grid = self.grid
        bragg = [[None] * grid.cols for _ in range(grid.rows)]
        resolution = [[None] * grid.cols for _ in range(grid.rows)]
        cells = [[None] * grid.cols for _ in range(grid.rows)]
        first = self.first_number()
        for k in range(grid.rows * grid.cols):
            r, c = grid.place(k)
            cells[r][c] = k + 1
            row = self.rows.get(first + k)
            if row is not None:
                bragg[r][c], resolution[r][c] = row.bragg, row.resolution
        return {"rows": grid.rows, "cols": grid.cols, "good_bragg_candidates": bragg, "resolution": resolution,
                "cell": cells}

    # ----- changes -----------------------------------------------------------------------------------------
    def reopen(self, now: float) -> None:
        if not self.open:
            self.open, self.started, self.end_reason = True, False, None
        self.last_activity = now

    def end(self, reason: str | None) -> None:
        self.open, self.end_reason, self.changed = False, reason, False

    def take(self, body: dict, now: float) -> None:
        number = _number(body.get("image_number"))
        self.reopen(now)
        self.pending.discard(number)
        row = self.rows[number] = _row(body)
        if row.bragg is not None and (self.best is None or (row.bragg, -number) > (self.rows[self.best].bragg,
                                                                                  -self.best)):
            self.best = number  # of equals, the lowest image number, in whatever order the frames finished
        elif self.best == number:  # the best frame analysed again, and worse: look again
            scored = [(r.bragg, -n) for n, r in self.rows.items() if r.bragg is not None]
            self.best = -max(scored)[1] if scored else None
        self.changed = True


class Collections:
    """Every collection the service knows; main thread writes, any thread reads (under the lock)."""

    def __init__(self, *, quiet_s: float,
                 series_facts: Callable[[str], tuple[int, int] | None] = lambda master: None):
        self.quiet_s = quiet_s
        self.series_facts = series_facts  # an HDF5 master's (frame count, first image number); None when unknown
        self._by_key: dict[str, Collection] = {}
        self._by_id: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def _get(self, key: str, now: float) -> Collection:
        found = self._by_key.get(key)
        if found is None:
            found = self._by_key[key] = self._by_id[collection_id(key)] = Collection(key, now)
            self._forget_old()
        if found.hdf5 and found.expected_count is None and now >= found.next_look:
            found.next_look = now + SERIES_LOOK_S  # a master not readable yet: look again a little later
            facts = self.series_facts(key)
            if facts is not None:
                found.expected_count, found.series_first = facts
        return found

    def _forget_old(self) -> None:
        ended = [c for c in self._by_key.values() if not c.open]
        for old in sorted(ended, key=lambda c: c.last_activity)[:max(0, len(ended) - MAX_ENDED)]:
            del self._by_key[old.key], self._by_id[old.id]

    # ----- main thread -------------------------------------------------------------------------------------
    def notice(self, key: str, number: int | None) -> None:
        """A frame file of the collection was noticed (not finished yet)."""
        now = time.monotonic()
        with self._lock:
            collection = self._get(key, now)
            collection.reopen(now)
            number = _number(number)
            if number not in collection.rows:
                collection.pending.add(number)

    def take(self, body: dict) -> None:
        """A stored message (a frame's result, or a collection message on rebuild)."""
        now = time.monotonic()
        with self._lock:
            collection = self._get(body["collection"], now)
            if body["type"] == "result":
                collection.take(body, now)
            elif body["type"] == "collection":
                self._replay(collection, body, now)

    def _replay(self, collection: Collection, body: dict, now: float) -> None:
        """A stored collection message, at rebuild: its announcement and whether it ended."""
        if body["event"] == "start":
            collection.reopen(now)
            collection.started = True
            if body.get("announced"):
                grid = body.get("grid")
                first = body["image_range"][0] if body.get("image_range") else 1
                collection.announced = Announcement(collection.key, first, body.get("n_expected"),
                                                    Grid(**grid) if grid else None, body.get("dcid"))
        elif body["event"] == "end":
            collection.end(body.get("end_reason"))

    def announce(self, announcement: Announcement) -> dict:
        """An announced collection (a known one takes the announcement and starts again)."""
        now = time.monotonic()
        with self._lock:
            collection = self._get(announcement.key, now)
            collection.announced = announcement
            collection.reopen(now)
            collection.started = False  # announced again: a new start
            return collection.summary()

    def rebuild(self, state_dir: str) -> int:
        """The state after a restart, from the ledger's stored messages, oldest first; how many were read.
        Frames still in flight are noticed again by the service (they are in the ledger's frames)."""
        since, read = 0, 0
        while True:
            messages, _, _ = ledger_module.read_messages(state_dir, since, 5000)
            if not messages:
                return read
            for body in messages:
                if body.get("type") in ("result", "collection") and body.get("collection"):
                    self.take(body)
            read += len(messages)
            since = messages[-1]["seq"]

    def due(self, starts_only: bool = False) -> list[Callable[[int], tuple[str, dict]]]:
        """The collection messages due now (starts, summaries, ends), as compose(seq) for the ledger."""
        now = time.monotonic()
        out = []
        with self._lock:
            for collection in self._by_key.values():
                if not collection.open:
                    continue
                if not collection.started:
                    collection.started = True
                    out.append(self._compose(collection, "start"))
                if starts_only:
                    continue
                if collection.complete():
                    reason = "complete"
                elif not collection.pending and now - collection.last_activity >= self.quiet_s:
                    reason = "quiet"
                else:
                    if collection.changed and now - collection.last_summary >= SUMMARY_EVERY_S:
                        collection.changed, collection.last_summary = False, now
                        out.append(self._compose(collection, "summary"))
                    continue
                collection.end(reason)
                out.append(self._compose(collection, "end"))
        return out

    def _compose(self, collection: Collection, event: str) -> Callable[[int], tuple[str, dict]]:
        fields = collection.summary()  # taken now, under the lock

        def compose(seq: int) -> tuple[str, dict]:
            body = envelope("collection", seq, collection.key)
            body["event"] = event
            body.update(fields)
            return topic("collection", collection.key), body
        return compose

    # ----- any thread --------------------------------------------------------------------------------------
    def listing(self) -> list[dict]:
        with self._lock:
            return [c.summary() for c in self._by_key.values()]

    def detail(self, collection_id_: str) -> dict | None:
        with self._lock:
            found = self._by_id.get(collection_id_)
            return None if found is None else found.detail()

    def heatmap(self, collection_id_: str) -> dict | None:
        with self._lock:
            found = self._by_id.get(collection_id_)
            return None if found is None or found.grid is None else found.heatmap()

    def register(self, http: HttpServer) -> None:
        http.route("GET", PREFIX, self._list)
        http.route("POST", PREFIX, self._announce)
        http.route("GET", PREFIX + "/", self._one, prefix=True)

    def _list(self, request: Request) -> Response:
        return json_response({"collections": self.listing()})

    def _announce(self, request: Request) -> Response:
        try:
            announcement = parse_announcement(request.body)
        except AnnouncementError as exc:
            return error_response(400, str(exc))
        return json_response(self.announce(announcement), 201)

    def _one(self, request: Request) -> Response:
        rest = request.path[len(PREFIX) + 1:]
        wanted, _, what = rest.partition("/")
        if what == "heatmap.png":
            heat = self.heatmap(wanted)
            if heat is None:
                return error_response(404, "no grid collection %s" % wanted)
            by = request.arg("by", "good_bragg_candidates")
            if by not in ("good_bragg_candidates", "resolution"):
                return error_response(400, "by: good_bragg_candidates or resolution")
            return Response(200, heatmap_png(heat, by), "image/png", {"Cache-Control": "no-store"})
        found = self.detail(wanted) if not what else None
        if found is None:
            return error_response(404, "no such collection: %s" % rest)
        return json_response(found)


# ----- the heat map as a PNG ------------------------------------------------------------------------------
_STOPS = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
          (1.0, (253, 231, 37)))  # a viridis-like ramp: dark = few, yellow = many (readable when greyed)
NO_RESULT = (200, 200, 200)


def colour(fraction: float) -> tuple[int, int, int]:
    """The ramp's colour at ``fraction`` (0..1); the page uses the same stops (web/app.js)."""
    fraction = min(1.0, max(0.0, fraction))
    for (f0, c0), (f1, c1) in zip(_STOPS, _STOPS[1:]):
        if fraction <= f1:
            t = (fraction - f0) / (f1 - f0)
            return tuple(round(a + (b - a) * t) for a, b in zip(c0, c1))
    return _STOPS[-1][1]


def cell_fractions(values: list[list[float | None]], invert: bool) -> list[list[float | None]]:
    """Each cell's place on the colour scale; for resolution (``invert``) the smallest d is the brightest."""
    present = [v for row in values for v in row if v is not None]
    if not present:
        return [[None] * len(row) for row in values]
    low, high = min(present), max(present)
    if not invert:
        low = 0.0
    span = (high - low) or 1.0
    return [[None if v is None else ((high - v) if invert else (v - low)) / span for v in row] for row in values]


def heatmap_png(heat: dict, by: str) -> bytes:
    """The grid drawn one square per cell (at most 1000 pixels wide), Pillow imported only here."""
    from PIL import Image

    rows, cols = heat["rows"], heat["cols"]
    size = max(1, min(40, 1000 // max(rows, cols)))
    fractions = cell_fractions(heat[by], invert=by == "resolution")
    small = Image.new("RGB", (cols, rows))
    small.putdata([NO_RESULT if f is None else colour(f) for row in fractions for f in row])
    image = small.resize((cols * size, rows * size), Image.NEAREST)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
