"""Seeded fuzzing through the service: corrupted variants of a real frame land in a watched folder the ways a
detector or a copy tool delivers them (written whole, in chunks, renamed into place, compressed, cut short),
with good frames among them.  Every file must be answered exactly once (ok, or an error with its cause, never
"internal error"), the seqs must run without a gap, the good frames must give exactly what ``analyse`` gives,
and no worker may be lost: the same worker processes serve from the first file to the last.

The corruptions are test_core_fuzz's (its MUTATIONS and base frames), so the library's fuzz test and this one
exercise the same damage.
"""
from __future__ import annotations

import bz2
import gzip
import os
import random
import time

from service_helpers import assert_exactly_once, make_service, subscribe
from spotfinder_core import analyse
from spotfinder_core.result import FIELDS
from test_core_fuzz import MUTATIONS, _base_frames

__all__ = ["make_service", "subscribe"]  # fixtures used by name

SEED = 1313
CORRUPTED = 150
GOOD_EVERY = 25  # a good frame after every this many corrupted ones
BUDGET_S = 60.0  # the whole run: writing the corpus, analysing it, settling
DELIVERIES = ("whole", "whole", "chunks", "renamed")
COMPRESSIONS = (None, None, None, None, "gz", "bz2")
COMPARED = tuple(name for name in FIELDS if name != "proc_ms")  # every result field but the timing


def corrupted(rng: random.Random, data: bytes) -> tuple[bytes, str, str]:
    """(bytes, file suffix, what was done) of one corrupted variant of ``data``: one to three of the library
    fuzz test's mutations, perhaps compressed, perhaps with the compressed stream cut short."""
    whats = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        data, what = rng.choice(MUTATIONS)(rng, data)
        whats.append(what)
    compression = rng.choice(COMPRESSIONS)
    if compression is None:
        return data, ".cbf", "; ".join(whats)
    data = gzip.compress(data, compresslevel=1) if compression == "gz" else bz2.compress(data, compresslevel=1)
    if rng.random() < 0.3:
        data = data[:rng.randrange(len(data))]
        whats.append("compressed stream truncated")
    return data, ".cbf." + compression, "; ".join(whats)


def deliver(rng: random.Random, path: str, data: bytes) -> str:
    """Put ``data`` at ``path`` one of the ways frames arrive; returns how."""
    how = rng.choice(DELIVERIES)
    if how == "renamed":
        hidden = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".part")
        with open(hidden, "wb") as fh:
            fh.write(data)
        os.rename(hidden, path)
    elif how == "chunks":
        with open(path, "wb") as fh:
            for start in range(0, len(data), max(1, len(data) // 3)):
                fh.write(data[start:start + max(1, len(data) // 3)])
                fh.flush()
                time.sleep(0.005)
    else:
        with open(path, "wb") as fh:
            fh.write(data)
    return how


def test_a_seeded_corpus_of_corrupted_frames_is_each_answered_once_and_loses_no_worker(make_service, subscribe,
                                                                                     tmp_path):
    started = time.monotonic()
    bases = _base_frames(tmp_path)
    base = bases[-1]  # the real blank PILATUS 300K when the shared data is present, else the simulated one
    service = make_service(workers=2).start()
    subscriber = subscribe(service.pub)
    workers_before = sorted(w["pid"] for w in service.status()["workers"])
    rng = random.Random(SEED)
    what_of: dict[str, str] = {}
    good: list[str] = []
    for number in range(CORRUPTED):
        if number % GOOD_EVERY == 0:
            path = str(service.watch / ("good_%04d.cbf" % (len(good) + 1)))
            what_of[path] = "good, " + deliver(rng, path, bases[len(good) % len(bases)])
            good.append(path)
        data, suffix, what = corrupted(rng, base)
        path = str(service.watch / ("fuzz_%04d%s" % (number + 1, suffix)))
        what_of[path] = "%s, %s" % (what, deliver(rng, path, data))

    left = BUDGET_S - (time.monotonic() - started)
    results = subscriber.settled_results(service, len(what_of), left)
    assert_exactly_once(results, list(what_of))
    unanswered = ["%s (%s): %s %r" % (os.path.basename(r["file"]), what_of[r["file"]], r["status"], r["error"])
                  for r in results if r["status"] not in ("ok", "error") or (r["status"] == "error" and not r["error"])
                  or "internal error" in (r["error"] or "")]
    assert not unanswered, "answered without a cause:\n" + "\n".join(unanswered)

    stored = sorted(m["seq"] for m in list(subscriber.messages) if "seq" in m)
    assert stored == list(range(1, len(stored) + 1)), "seq gaps: %s" % stored
    by_file = {r["file"]: r for r in results}
    for path in good:
        expected = analyse(path).as_dict()
        assert by_file[path]["status"] == "ok", by_file[path]
        assert {k: by_file[path][k] for k in COMPARED} == {k: expected[k] for k in COMPARED}, path

    errors = [m["error"] for m in list(subscriber.messages) if m["type"] == "error"]
    assert not errors, "service errors: %s" % errors
    status = service.status()
    assert sorted(w["pid"] for w in status["workers"]) == workers_before, "a worker was replaced"
    assert status["workers_alive"] == 2 and status["healthy"], status
    assert "Traceback" not in service.log.read_text()
    assert time.monotonic() - started < BUDGET_S
