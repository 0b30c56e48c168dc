"""EIGER HDF5 series through the service: the ledger keys frames by (file, index), the watcher follows a series
from its master and dispatches each data file's frames once they are complete, however the files arrive, and
a restart in the middle analyses every frame exactly once; bad series end as one clear error per frame."""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from spotfinder_core import analyse, nexus, read_frame
from spotfinder_daemon.ledger import FILE_NAME, Ledger
from spotfinder_daemon.replay import ReplayError, deliver, play, series_sources, write_swmr
from spotfinder_daemon.watcher import Watcher, frame_ranges
from service_helpers import assert_seq_increasing, child_env, make_service, python_command, subscribe, wait_for
from shared_data import real_files

__all__ = ["make_service", "subscribe"]  # fixtures used by name
THERMOLYSIN = "eiger2_16m_cbf_dls_thermolysin/dlsnxs2cbf_therm_0001.cbf.gz"
# EIGER2 500K-sized (1028 x 512) geometry for the synthetic series of the delivery tests
SMALL_GEOMETRY = {"distance": 0.15, "wavelength": 0.9795, "beam_x": 514.0, "beam_y": 256.0, "count_cutoff": 65535}

OLD_FRAMES_TABLE = """CREATE TABLE frames (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, collection TEXT NOT NULL,
    state TEXT NOT NULL, t_seen REAL NOT NULL, t_complete REAL, t_done REAL, worker TEXT, deadline REAL,
    tries INTEGER NOT NULL DEFAULT 0, seq INTEGER UNIQUE, identity TEXT)"""


def test_a_ledger_keyed_by_path_is_migrated_with_its_frames(tmp_path):
    db = sqlite3.connect(tmp_path / FILE_NAME)
    db.executescript(OLD_FRAMES_TABLE + ";" + "CREATE INDEX frames_state ON frames (state, id);"
                     "INSERT INTO frames (path, collection, state, t_seen, seq, identity) "
                     "VALUES ('/d/x_00001.cbf', '/d/x_#####.cbf', 'done', 1.0, 1, '1:2');")
    db.close()
    ledger = Ledger(state_dir=str(tmp_path))
    old = ledger.find("/d/x_00001.cbf")
    assert (old.state, old.seq, old.identity, old.frame_index) == ("done", 1, "1:2", None)
    assert ledger.known("/d/x_00001.cbf", "1:2") and not ledger.known("/d/x_00001.cbf", "1:3")
    # one master, many frames; each frame once
    for index in range(3):
        assert ledger.see("/d/s_master.h5", "/d/s_master.h5", 2.0, index, "/d/s_data_000001.h5", index + 1)
    assert not ledger.see("/d/s_master.h5", "/d/s_master.h5", 2.0, 1, "/d/s_data_000001.h5", 2)
    assert ledger.oldest_seen() is None  # a series' frames wait for their data files: not a stuck frame
    assert ledger.enqueue("/d/s_master.h5", "/d/s_master.h5", 2.0, 3.0, "1:9", frame_index=1)
    assert not ledger.enqueue("/d/s_master.h5", "/d/s_master.h5", 2.0, 3.0, "1:9", frame_index=1)
    assert [(f.frame_index, f.source, f.image_number) for f in ledger.queued(5)] == [(1, "/d/s_data_000001.h5", 2)]
    assert ledger.known("/d/s_master.h5", "7:7")  # a master is known once its series is recorded
    assert ledger.known("/d/s_data_000001.h5", "1:9")  # its frames are still followed
    assert not ledger.known("/d/s_data_000002.h5", "1:10")  # no frame of it is recorded
    ledger.close()
    reopened = Ledger(state_dir=str(tmp_path))  # migrated once: opens as it is
    assert reopened.find("/d/s_master.h5", 1).state == "queued" and reopened.find("/d/s_master.h5", 0).state == "seen"


def test_series_names_and_missing_frames_in_messages():
    assert nexus.master_of("/d/x_master.h5") == "/d/x_master.h5"
    assert nexus.master_of("/d/x_1_data_000002.h5") == "/d/x_1_master.h5"
    assert nexus.master_of("/d/x_00001.cbf") is None and nexus.master_of("/d/x_data_01.h5") is None
    assert frame_ranges([4, 0, 1, 2, 7, 8]) == "frames 0-2, 4, 7-8" and frame_ranges([3]) == "frame 3"


# ----- series and their delivery --------------------------------------------------------------------------------
def small_series(folder: Path, name: str, count: int, per_file: int, seed: int = 0) -> str:
    """An EIGER2 500K-sized series of noise frames with a few bright spots, written as the FileWriter does."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        pixels = rng.poisson(2.0, (512, 1028)).astype(np.int32)
        for y, x in rng.integers(40, 470, (12, 2)):
            pixels[y:y + 3, 2 * x:2 * x + 3] += 400
        pixels[255:257, :] = -1  # a gap between modules
        frames.append(pixels)
    return nexus.write_series(str(folder), name, frames, nimages_per_file=per_file, geometry=SMALL_GEOMETRY)


def deliver_files(master: str, to: Path, which: slice, *, atomic: bool, master_too: bool = False) -> list[str]:
    """Deliver the master (if asked) and the data files ``which`` of a series into ``to``, as the FileWriter or
    a downloader does (in 3 chunks in place, or under a temporary name renamed into place)."""
    written = []
    if master_too:
        written.append(str(to / os.path.basename(master)))
        deliver(master, written[-1], 1, 0.0, atomic)
    for path, _first, _count in series_sources(master)[which]:
        written.append(str(to / os.path.basename(path)))
        deliver(path, written[-1], 3, 0.15, atomic)
    return written


def frames_of(results: list[dict]) -> list[tuple[str, int | None]]:
    return sorted((os.path.basename(r["file"]), r["frame_index"]) for r in results)


def assert_each_frame_once(results: list[dict], master: str, count: int) -> None:
    name = os.path.basename(master)
    assert frames_of(results) == [(name, index) for index in range(count)]


@pytest.mark.parametrize("atomic", [False, True], ids=["in-place-chunks", "temporary-name-renamed"])
def test_a_series_is_analysed_data_file_by_data_file_exactly_once_across_a_restart(make_service, subscribe, tmp_path,
                                                                                    atomic):
    master = small_series(tmp_path / "source", "grid_1", count=6, per_file=2)
    service = make_service(workers=1).start()
    watch = service.watch
    sub = subscribe(service.pub)
    deliver_files(master, watch, slice(0, 1), atomic=atomic, master_too=True)
    first = sub.wait_results(2, 60)  # the first data file's frames, before the others exist
    assert frames_of(first) == [("grid_1_master.h5", 0), ("grid_1_master.h5", 1)]
    assert all(r["status"] == "ok" and r["image_number"] == r["frame_index"] + 1 for r in first)
    assert {r["collection"] for r in first} == {str(watch / "grid_1_master.h5")}
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    deliver_files(master, watch, slice(1, 2), atomic=atomic)  # while the service is down
    service.start()
    deliver_files(master, watch, slice(2, 3), atomic=atomic)
    wait_for(lambda: len(service.results_record()) >= 6, 60, "the six frames' results")
    service.wait_idle(30)
    record = service.results_record()
    assert_each_frame_once(record, master, 6)
    assert_seq_increasing(record)
    direct = analyse(master, index=3).as_dict()  # the service's fields are the library's
    stored = next(r for r in record if r["frame_index"] == 3)
    assert {k: stored[k] for k in direct if k not in ("file", "proc_ms")} == \
        {k: v for k, v in direct.items() if k not in ("file", "proc_ms")}


def test_bad_series_end_as_one_clear_error_per_frame(make_service, subscribe, tmp_path):
    service = make_service(workers=1, incomplete_timeout_s=2.0).start()
    watch = service.watch
    source = tmp_path / "source"
    gone = small_series(source, "gone", count=4, per_file=2)
    deliver_files(gone, watch, slice(0, 1), atomic=False, master_too=True)  # its second data file never comes
    short = small_series(source, "short", count=2, per_file=2, seed=1)
    deliver(short, str(watch / "short_master.h5"), 1, 0.0, False)
    data = Path(series_sources(short)[0][0]).read_bytes()
    (watch / "short_data_000001.h5").write_bytes(data[:len(data) // 2])  # truncated, closed
    lost = small_series(source / "lost", "lost", count=1, per_file=1)
    shutil.copyfile(series_sources(lost)[0][0], watch / "lost_data_000001.h5")  # no master ever comes
    (watch / "bad_master.h5").write_bytes(b"not HDF5 at all" * 100)
    wait_for(lambda: len(service.results_record()) >= 8, 60, "eight results")
    service.wait_idle(30)
    record = service.results_record()
    by_frame = {(os.path.basename(r["file"]), r["frame_index"]): r for r in record}
    assert len(by_frame) == len(record) == 8  # one result per frame, none twice
    assert [by_frame[("gone_master.h5", i)]["status"] for i in range(4)] == ["ok", "ok", "error", "error"]
    for i in (2, 3):
        error = by_frame[("gone_master.h5", i)]["error"]
        assert "gone_data_000002.h5 never came" in error and "frames 2-3 of gone_master.h5 missing" in error
        assert by_frame[("gone_master.h5", i)]["image_number"] == i + 1
    for i in (0, 1):
        assert "closed with 0 of its 2 frames complete" in by_frame[("short_master.h5", i)]["error"]
    orphan = by_frame[("lost_data_000001.h5", None)]
    assert "no master lost_master.h5" in orphan["error"]
    assert (orphan["collection"], orphan["image_number"]) == (str(watch / "lost_master.h5"), 1)  # its series'
    assert "HDF5" in by_frame[("bad_master.h5", None)]["error"]
    assert all("Traceback" not in (r["error"] or "") for r in record)
    shutil.copyfile(lost, watch / "lost_master.h5")  # the master comes after all: its frame joins its series
    wait_for(lambda: len(service.results_record()) >= 9, 60, "the late master's frame")
    late = service.results_record()[-1]
    assert (os.path.basename(late["file"]), late["frame_index"], late["status"]) == ("lost_master.h5", 0, "ok")
    assert (late["collection"], late["image_number"]) == (orphan["collection"], 1)


def test_a_series_from_real_eiger2_16m_pixels_gives_the_cbf_fields_through_the_service(make_service, subscribe,
                                                                                      tmp_path):
    (cbf,) = real_files((THERMOLYSIN,), "the thermolysin EIGER2 16M frame")
    plain = tmp_path / "therm_0001.cbf"
    with gzip.open(cbf) as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    pixels = read_frame(str(plain), verify_md5=False).pixels
    frames = [pixels, np.where(pixels > 0, pixels * 2, pixels)]  # the frame, and its counts doubled
    (tmp_path / "source").mkdir()
    master = nexus.write_series(str(tmp_path / "source"), "therm", frames, nimages_per_file=2,
                                geometry=nexus.cbf_geometry(str(plain)), dtype=np.uint32)
    service = make_service(workers=1, frame_timeout_s=120.0).start()
    deliver_files(master, service.watch, slice(0, 1), atomic=True, master_too=True)
    wait_for(lambda: len(service.results_record()) >= 2, 120, "two results")
    record = sorted(service.results_record(), key=lambda r: r["frame_index"])
    assert_each_frame_once(record, master, 2)
    ignored = ("file", "image_number", "frame_index", "proc_ms")
    expected = analyse(str(plain)).as_dict()
    assert record[0]["status"] == "ok" and record[0]["spot_total"] > 0
    assert {k: record[0][k] for k in expected if k not in ignored} == \
        {k: v for k, v in expected.items() if k not in ignored}  # HDF5 frame 0 = its CBF
    doubled = analyse(master, index=1).as_dict()
    assert {k: record[1][k] for k in doubled if k not in ignored} == \
        {k: v for k, v in doubled.items() if k not in ignored}


def test_replay_writes_cbf_frames_as_an_hdf5_series_and_delivers_a_series_master_first(tmp_path, make_frame):
    sources = [str(tmp_path / ("shot_%05d.cbf" % n)) for n in (1, 2, 3)]
    for seed, path in enumerate(sources):
        make_frame(path, shape=(64, 48), seed=seed)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(python_command("replay", *sources, "--to", str(out), "--hdf5", "shot", "--per-file", "2",
                                         "--atomic", "--rate", "50"),
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(os.path.basename(r["file"]), r.get("frames")) for r in lines] == [
        ("shot_master.h5", None), ("shot_data_000001.h5", [0, 2]), ("shot_data_000002.h5", [2, 3])]
    assert sorted(os.listdir(out)) == ["shot_data_000001.h5", "shot_data_000002.h5", "shot_master.h5"]
    series = nexus.open_series(str(out / "shot_master.h5"))
    for index, path in enumerate(sources):
        assert np.array_equal(series.read(index).pixels, read_frame(path, verify_md5=False).pixels)
    again = tmp_path / "again"
    again.mkdir()
    done = subprocess.run(python_command("replay", str(out / "shot_master.h5"), "--to", str(again), "--chunks", "3"),
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0 and sorted(os.listdir(again)) == sorted(os.listdir(out)), done.stderr
    (out / "shot_data_000002.h5").unlink()
    done = subprocess.run(python_command("replay", str(out / "shot_master.h5"), "--to", str(again)),
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 2 and "its data file" in done.stderr and "is missing" in done.stderr


@contextlib.contextmanager
def watching(tmp_path, **options):
    """(the folder ``tmp_path/watch``, a started Watcher of it with ``options``); stopped at the end."""
    watch = tmp_path / "watch"
    watch.mkdir()
    watcher = Watcher(folders=(str(watch),), **options)
    watcher.start()
    try:
        yield watch, watcher
    finally:
        watcher.stop()


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_the_watcher_reports_each_frame_complete_once_its_data_file_is(tmp_path, polling):
    """Data files arriving before their master (a downloader's order) and after it, in place and renamed: each
    frame complete exactly once, with the data file that holds it."""
    master = small_series(tmp_path / "source", "w", count=5, per_file=2)
    with watching(tmp_path, polling=polling, poll_interval_s=0.1, incomplete_timeout_s=5.0) as (watch, watcher):
        deliver_files(master, watch, slice(1, 2), atomic=True)  # before the master
        deliver_files(master, watch, slice(0, 1), atomic=False, master_too=True)
        deliver_files(master, watch, slice(2, 3), atomic=False)
        seen: list = []

        def complete():
            seen.extend(watcher.drain())
            done = [e for e in seen if e.kind == "complete"]
            return done if len(done) >= 5 else None
        done = wait_for(complete, 20, "five frames complete")
        time.sleep(1.0)  # nothing more comes
        seen.extend(watcher.drain())
        done = [e for e in seen if e.kind == "complete"]
        assert sorted(e.frame_index for e in done) == [0, 1, 2, 3, 4]
        assert {(e.frame_index, os.path.basename(e.source)) for e in done} >= {(2, "w_data_000002.h5"),
                                                                             (4, "w_data_000003.h5")}
        assert all(e.path == str(watch / "w_master.h5") and e.image_number == e.frame_index + 1 for e in done)
        assert not [e for e in seen if e.kind == "incomplete"]


def test_a_data_file_written_slowly_under_a_temporary_name_is_progress_not_a_missing_file(tmp_path):
    master = small_series(tmp_path / "source", "slow", count=2, per_file=2)
    with watching(tmp_path, incomplete_timeout_s=1.5) as (watch, watcher):
        deliver(master, str(watch / "slow_master.h5"), 1, 0.0, False)
        (data, _first, _count), = series_sources(master)
        deliver(data, str(watch / "slow_data_000001.h5"), 12, 4.0, True)  # 4 s under .slow_data_000001.h5.part
        seen: list = []
        wait_for(lambda: seen.extend(watcher.drain()) or len([e for e in seen if e.kind == "complete"]) == 2, 10,
                 "both frames complete")
        assert not [e for e in seen if e.kind == "incomplete"]


def test_a_real_eiger_master_whose_data_file_never_comes_is_one_error_naming_it(make_service, subscribe):
    (master,) = real_files(("eiger_9m_master/dectris_eiger_master.h5",), "the real EIGER 9M master")
    service = make_service(workers=1, incomplete_timeout_s=2.0).start()
    shutil.copyfile(master, service.watch / "dectris_eiger_master.h5")
    (result,) = wait_for(service.results_record, 30, "its result")
    assert (result["status"], result["frame_index"], result["image_number"]) == ("error", 0, 1)
    assert result["error"] == ("data file %s never came: frame 0 of dectris_eiger_master.h5 missing"
                               % (service.watch / "dectris_eiger_data_000001.h5"))


# ----- SWMR writers: frames dispatched while the writer holds the file open --------------------------------------
class SwmrWriter:
    """The data files of a series written by an SWMR writer (``replay.write_swmr``) in a thread, one frame per
    ``release()``; each wait is bounded, so a test that stops releasing ends the writer instead of hanging."""

    def __init__(self, master: str, to: Path):
        self.files = [(path, str(to / os.path.basename(path))) for path, _first, _count in series_sources(master)]
        self.allowed = threading.Semaphore(0)
        self.written: list[int] = []  # the position in its file of each frame flushed
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for source, target in self.files:
            write_swmr(source, target, due=self._due, done=self.written.append)

    def _due(self, _position: int) -> None:
        if not self.allowed.acquire(timeout=120):
            raise TimeoutError("the test released no frame for 120 s")

    def release(self, frames: int = 1) -> None:
        for _ in range(frames):
            self.allowed.release()

    def wait_written(self, frames: int) -> None:
        wait_for(lambda: len(self.written) >= frames, 30, "%d frames written" % frames)


def test_an_swmr_writer_s_frames_are_analysed_while_it_writes_exactly_once_across_a_restart(make_service, subscribe,
                                                                                            tmp_path):
    master = small_series(tmp_path / "source", "swmr", count=6, per_file=3)
    service = make_service(workers=1).start()
    watch = service.watch
    sub = subscribe(service.pub)
    deliver(master, str(watch / "swmr_master.h5"), 1, 0.0, False)
    writer = SwmrWriter(master, watch)
    first_file, second_file = (target for _source, target in writer.files)
    writer.release(2)
    first = sub.wait_results(2, 60)  # published while the writer still holds the file open for frame 2
    assert frames_of(first) == [("swmr_master.h5", 0), ("swmr_master.h5", 1)]
    assert all(r["status"] == "ok" and r["image_number"] == r["frame_index"] + 1 for r in first)
    assert {r["collection"] for r in first} == {str(watch / "swmr_master.h5")}
    assert nexus.swmr_writing(first_file) and writer.thread.is_alive()
    writer.release(2)  # frame 2 closes the first data file; frame 3 begins the second
    sub.wait_results(4, 60)  # frames 2 and 3
    assert nexus.swmr_writing(second_file)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    writer.release()  # frame 4, while the service is down and the writer holds the second file open
    writer.wait_written(5)
    service.start()
    wait_for(lambda: 4 in [r["frame_index"] for r in service.results_record()], 60, "frame 4's result")
    assert nexus.swmr_writing(second_file) and writer.thread.is_alive()  # before the writer closed it
    writer.release()
    writer.thread.join(30)
    assert not writer.thread.is_alive() and not nexus.swmr_writing(second_file)
    wait_for(lambda: len(service.results_record()) >= 6, 60, "the six frames' results")
    service.wait_idle(30)
    time.sleep(0.5)  # nothing more comes
    record = service.results_record()
    assert_each_frame_once(record, master, 6)
    assert_seq_increasing(record)
    assert all(r["status"] == "ok" for r in record)
    direct = analyse(master, index=4).as_dict()  # the frame read mid-write = the library's on the whole series
    stored = next(r for r in record if r["frame_index"] == 4)
    assert {k: stored[k] for k in direct if k not in ("file", "proc_ms")} == \
        {k: v for k, v in direct.items() if k not in ("file", "proc_ms")}


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_the_watcher_reports_an_swmr_written_frame_before_its_file_is_closed(tmp_path, polling):
    """`spotfinder replay --swmr` writes each data file frame by frame at --rate, holding it open: the watcher
    reports every frame complete exactly once, the first frame of each file before the writer closes it."""
    master = small_series(tmp_path / "source", "live", count=4, per_file=2)
    with watching(tmp_path, polling=polling, poll_interval_s=0.1, incomplete_timeout_s=10.0) as (watch, watcher):
        done = subprocess.run(python_command("replay", master, "--to", str(watch), "--swmr", "--rate", "1"),
                              capture_output=True, text=True, env=child_env(), timeout=60)
        assert done.returncode == 0, done.stderr
        time.sleep(1.0)  # nothing more comes
        events = watcher.drain()
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["kind"], r.get("frame")) for r in lines] == [("master", None), ("frame", 0), ("frame", 1),
                                                            ("data", None), ("frame", 2), ("frame", 3), ("data", None)]
    closed = {os.path.basename(r["file"]): r["t_complete"] for r in lines if r["kind"] == "data"}
    complete = [e for e in events if e.kind == "complete"]
    assert sorted(e.frame_index for e in complete) == [0, 1, 2, 3]
    assert not [e for e in events if e.kind == "incomplete"]
    for index in (0, 2):  # written 1 s before its file is closed
        event = next(e for e in complete if e.frame_index == index)
        assert event.t_complete < closed[os.path.basename(event.source)]


def test_an_swmr_file_s_growing_shape_is_not_taken_for_its_frame_count(tmp_path):
    """A legacy master does not say nimages_per_file: the reader takes it from a data file's image_nr_high, else
    its shape; the shape of a data file an SWMR writer is still growing says nothing (its bound would)."""
    master = small_series(tmp_path / "source", "grow", count=4, per_file=2)
    (first, _a, _b), (second, _c, _d) = series_sources(master)
    import h5py

    with h5py.File(first, "r+") as h5:  # a writer that sets no image_nr_high
        del h5["/entry/data/data"].attrs["image_nr_high"]
    shutil.copyfile(master, tmp_path / "grow_master.h5")
    shutil.copyfile(second, tmp_path / "grow_data_000002.h5")
    target = tmp_path / "grow_data_000001.h5"
    writer = subprocess.Popen(  # another process: HDF5 shares a file opened twice in one process
        [sys.executable, "-c", "import sys; from spotfinder_daemon.replay import write_swmr; write_swmr(sys.argv[1], "
         "sys.argv[2], due=lambda position: position == 1 and sys.stdin.readline())", first, str(target)],
        stdin=subprocess.PIPE, text=True, env=child_env())
    try:
        wait_for(lambda: nexus.complete_frames(str(target)) == 1, 30, "the first frame written")
        assert nexus.swmr_writing(str(target))
        series = nexus.open_series(str(tmp_path / "grow_master.h5"))  # its shape says 1 frame so far
        assert [(d.first_index, d.count) for d in series.data_files] == [(0, 2), (2, 2)]
        assert series.image_nr_low == 1 and series.read(0).image_number == 1
    finally:
        writer.communicate("\n", timeout=30)
    assert writer.returncode == 0
    assert not nexus.swmr_writing(str(target)) and nexus.complete_frames(str(target)) == 2


def test_replay_refuses_swmr_where_it_means_nothing(tmp_path, make_frame):
    frame = str(tmp_path / "shot_00001.cbf")
    make_frame(frame, shape=(64, 48))
    master = small_series(tmp_path / "source", "r", count=1, per_file=1)
    with pytest.raises(ReplayError, match="--swmr writes the data files of an HDF5 series"):
        play([frame], str(tmp_path), swmr=True)
    with pytest.raises(ReplayError, match="not with --atomic"):
        play([master], str(tmp_path), swmr=True, atomic=True)
    assert not (tmp_path / "r_master.h5").exists()  # refused before anything was written
