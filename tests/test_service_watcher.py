"""The Watcher on real folders: a frame is reported complete once, only when all of it is there."""
from __future__ import annotations

import bz2
import os
import threading
import time

import pytest

from spotfinder_daemon.watcher import Watcher
from service_helpers import wait_for


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def watcher(request, tmp_path):
    folder = tmp_path / "watch"
    (folder / "sub").mkdir(parents=True)
    w = Watcher(folders=(str(folder),), polling=request.param, poll_interval_s=0.1, incomplete_timeout_s=1.0)
    w.start()
    w.folder = folder
    w.collected = []
    yield w
    w.stop()


def events(watcher, kind: str, count: int, timeout: float = 10.0):
    def enough():
        watcher.collected.extend(watcher.drain())
        found = [e for e in watcher.collected if e.kind == kind]
        return found if len(found) >= count else None
    return wait_for(enough, timeout, "%d %s events" % (count, kind))


def test_a_frame_written_in_slow_chunks_is_complete_only_at_the_end(watcher, tmp_path, make_frame):
    data = make_frame(str(tmp_path / "source_00001.cbf"), shape=(200, 160))
    target = watcher.folder / "sub" / "x_00001.cbf"
    step = len(data) // 4 + 1
    chunks = [data[start:start + step] for start in range(0, len(data), step)]
    with open(target, "wb") as fh:
        for chunk in chunks[:-1]:
            fh.write(chunk)
            fh.flush()
            time.sleep(0.3)
            assert not [e for e in watcher.drain() if e.kind == "complete"], "reported before the last chunk"
        fh.write(chunks[-1])
    complete = events(watcher, "complete", 1)
    assert [e.path for e in complete] == [str(target)]
    assert complete[0].t_complete >= complete[0].t_seen
    time.sleep(0.5)
    assert len([e for e in watcher.collected + watcher.drain() if e.kind == "complete"]) == 1


def test_renamed_and_compressed_frames_and_other_files(watcher, tmp_path, make_frame):
    data = make_frame(str(tmp_path / "source_00001.cbf"))
    hidden = watcher.folder / ".x_00001.cbf.part"
    hidden.write_bytes(data)
    os.rename(hidden, watcher.folder / "x_00001.cbf")
    (watcher.folder / "y_00001.cbf.bz2").write_bytes(bz2.compress(data))
    (watcher.folder / "notes.txt").write_text("not a frame")
    complete = events(watcher, "complete", 2)
    assert sorted(os.path.basename(e.path) for e in complete) == ["x_00001.cbf", "y_00001.cbf.bz2"]


def test_incomplete_and_vanished_files_are_reported(watcher, tmp_path, make_frame):
    data = make_frame(str(tmp_path / "source_00001.cbf"))
    (watcher.folder / "cut_00001.cbf").write_bytes(data[:-50])
    (watcher.folder / "bad_00001.cbf.bz2").write_bytes(bz2.compress(data)[:-30])
    gone = watcher.folder / "gone_00001.cbf"
    gone.write_bytes(data[:100])
    events(watcher, "seen", 3)
    gone.unlink()
    reported = {os.path.basename(e.path): e.reason for e in events(watcher, "incomplete", 3)}
    assert "vanished" in reported["gone_00001.cbf"]
    assert "incomplete" in reported["cut_00001.cbf"] and "incomplete" in reported["bad_00001.cbf.bz2"]


def test_catch_up_follows_unknown_files_only(tmp_path, make_frame):
    folder = tmp_path / "watch"
    folder.mkdir()
    make_frame(str(folder / "a_00001.cbf"))
    make_frame(str(folder / "a_00002.cbf"))
    w = Watcher(folders=(str(folder),), incomplete_timeout_s=1.0)
    w.start()
    try:
        assert w.catch_up(lambda path, identity, mtime: path.endswith("00001.cbf")) == 1
        collected = []
        wait_for(lambda: collected.extend(w.drain()) or any(e.kind == "complete" for e in collected), 5, "catch-up")
        assert [e.path for e in collected if e.kind == "complete"] == [str(folder / "a_00002.cbf")]
    finally:
        w.stop()


def test_a_flood_of_events_never_blocks_the_thread_that_reports_them(tmp_path):
    """70,000 files noticed before the main loop drains once: more wake-ups than a pipe holds."""
    w = Watcher(folders=(str(tmp_path),))
    done = threading.Event()
    thread = threading.Thread(target=lambda: [w.notice(str(tmp_path / ("f_%05d.cbf" % n))) for n in range(70_000)]
                              and done.set(), daemon=True)
    thread.start()
    assert done.wait(30), "notice() blocked on a full wake-up pipe"
    assert len(w.drain()) == 70_000 and w.drain() == []
