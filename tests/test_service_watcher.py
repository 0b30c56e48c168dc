"""The Watcher on real folders: a frame is reported complete once, only when all of it is there."""
from __future__ import annotations

import bz2
import gzip
import os
import shutil
import threading
import time

import pytest

from spotfinder_core.image import binary_section
from spotfinder_daemon import watcher as watcher_module
from spotfinder_daemon.watcher import Watcher
from service_helpers import make_service, subscribe, wait_for

__all__ = ["make_service", "subscribe"]  # fixtures used by name


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
    """Files still open for writing: given up only after the incomplete timeout, with the cause, or vanished."""
    data = make_frame(str(tmp_path / "source_00001.cbf"))
    with open(watcher.folder / "cut_00001.cbf", "wb") as cut, open(watcher.folder / "bad_00001.cbf.bz2", "wb") as bad, \
            open(watcher.folder / "gone_00001.cbf", "wb") as gone:
        for fh, part in ((cut, data[:-50]), (bad, bz2.compress(data)[:-30]), (gone, data[:100])):
            fh.write(part)
            fh.flush()
        events(watcher, "seen", 3)
        os.unlink(gone.name)
        reported = {os.path.basename(e.path): e.reason for e in events(watcher, "incomplete", 3)}
    assert "vanished" in reported["gone_00001.cbf"]
    assert reported["cut_00001.cbf"] == "incomplete after 1 s without growth: " + truncated(data[:-50])
    assert reported["bad_00001.cbf.bz2"] == "incomplete after 1 s without growth: compressed stream ends early"


def truncated(cut: bytes) -> str:
    """The cause a frame cut to ``cut`` is reported with."""
    section = binary_section(cut)
    return "truncated: binary section has %d of its %d bytes (X-Binary-Size)" % (section.present, section.size)


def bad_files(folder, data: bytes) -> dict[str, str]:
    """Files that are not frames, written (and closed) at once: name -> the cause they must be reported with."""
    (folder / "text_00001.cbf").write_text("not a frame\n")
    (folder / "empty_00001.cbf").write_bytes(b"")
    (folder / "header_00001.cbf").write_bytes(data[:data.index(b"--CIF-BINARY-FORMAT-SECTION--")])
    (folder / "cut_00001.cbf").write_bytes(data[:-50])
    (folder / "cut_00001.cbf.bz2").write_bytes(bz2.compress(data)[:-30])
    (folder / "junk_00001.cbf.gz").write_bytes(b"not gzip at all")
    locked = folder / "locked_00001.cbf"
    if os.geteuid() == 0:  # root reads anything, except a write-only /proc/sys file
        locked.symlink_to("/proc/sys/vm/compact_memory")
    else:
        hidden = folder / ".locked_00001.cbf"
        hidden.write_bytes(data)
        hidden.chmod(0)
        hidden.rename(locked)
    (folder / "loop_00001.cbf").symlink_to("loop_00001.cbf")
    os.mkfifo(folder / "fifo_00001.cbf")
    return {"text_00001.cbf": "not a CBF file (it does not start with ###CBF)", "empty_00001.cbf": "empty file",
            "header_00001.cbf": "no binary section (marker or X-Binary-Size missing)",
            "cut_00001.cbf": truncated(data[:-50]),
            "cut_00001.cbf.bz2": "compressed stream ends early",
            "junk_00001.cbf.gz": "corrupt compression: Not a gzipped file (b'no')",
            "locked_00001.cbf": "unreadable: permission denied",
            "loop_00001.cbf": "unreadable: symbolic link loop",
            "fifo_00001.cbf": "not a regular file (a device, FIFO or socket)"}  # the reader's own words


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_files_that_cannot_be_frames_are_reported_with_their_cause_without_the_timeout(polling, tmp_path, make_frame):
    """Closed after writing (inotify tells) or unable to become a frame whatever comes next: reported within a
    settle time with the cause the CLI would give, not 30 s later as "incomplete".  Without close events
    (polling) a file that a slow writer may still extend waits for the timeout, and a link loop, which
    watchdog's polling cannot stat, is found by the catch-up scan."""
    data = make_frame(str(tmp_path / "source_00001.cbf"))
    folder = tmp_path / "watch"
    folder.mkdir()
    w = Watcher(folders=(str(folder),), polling=polling, poll_interval_s=0.1, incomplete_timeout_s=30.0)
    w.start()
    try:
        causes = bad_files(folder, data)
        if polling:
            causes = {name: cause for name, cause in causes.items()
                      if name.startswith(("text", "junk", "lock", "loop", "fifo"))}
            assert w.catch_up(lambda path, identity, mtime: not path.endswith("loop_00001.cbf")) == 1
        collected = []
        wait_for(lambda: collected.extend(w.drain()) or len([e for e in collected if e.kind == "incomplete"])
                 >= len(causes), 10, "%d files reported" % len(causes))
        time.sleep(0.5)
        collected.extend(w.drain())
    finally:
        w.stop()
    assert {os.path.basename(e.path): e.reason for e in collected if e.kind == "incomplete"} == causes
    assert not [e for e in collected if e.kind == "complete"]


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


def inotify_masks(folder) -> list[int]:
    """The kernel's event masks of this process's inotify watches on ``folder`` (from /proc/self/fdinfo)."""
    inode = "%x" % os.stat(folder).st_ino
    masks = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "inotify" not in os.readlink("/proc/self/fd/" + fd):
                continue
            with open("/proc/self/fdinfo/" + fd) as fh:
                info = fh.read()
        except OSError:  # a descriptor closed meanwhile (another thread's)
            continue
        fields = [dict(word.split(":", 1) for word in line.split()[1:]) for line in info.splitlines()
                  if line.startswith("inotify ")]
        masks += [int(watch["mask"], 16) for watch in fields if watch["ino"] == inode]
    return masks


def test_reading_frames_wakes_no_watcher_thread(tmp_path):
    """inotify is asked for the writes, closes after writing, creations, renames and attribute changes of the
    watched folders, not for opens and closes after reading: a worker or a user reading a frame in a watched
    folder costs the service nothing (a frame written and analysed made 15 file events, 6 of them news)."""
    wanted = {"IN_MODIFY": 0x2, "IN_ATTRIB": 0x4, "IN_CLOSE_WRITE": 0x8, "IN_MOVED_TO": 0x80, "IN_CREATE": 0x100}
    unwanted = {"IN_ACCESS": 0x1, "IN_CLOSE_NOWRITE": 0x10, "IN_OPEN": 0x20}
    (tmp_path / "sub").mkdir()
    w = Watcher(folders=(str(tmp_path),))
    w.start()
    try:
        for folder in (tmp_path, tmp_path / "sub"):
            (mask,) = wait_for(lambda f=folder: inotify_masks(f) or None, 5.0, "the watch on %s" % folder)
            assert [name for name, bit in wanted.items() if not mask & bit] == []
            assert [name for name, bit in unwanted.items() if mask & bit] == []
    finally:
        w.stop()


def test_a_watched_folder_deleted_and_recreated_is_watched_again_within_seconds(watcher, tmp_path, make_frame):
    """Frames written into the re-created folder, before and after its new watch, are complete in seconds,
    not at the next catch-up scan."""
    data = make_frame(str(tmp_path / "source_00001.cbf"))
    shutil.rmtree(watcher.folder)
    time.sleep(0.5)  # the old watch sees the folder go
    (watcher.folder / "sub").mkdir(parents=True)
    (watcher.folder / "early_00001.cbf").write_bytes(data)  # most likely before the new watch
    time.sleep(2.5)
    (watcher.folder / "sub" / "late_00001.cbf").write_bytes(data)  # certainly after it
    complete = events(watcher, "complete", 2, timeout=5.0)
    assert sorted(os.path.basename(e.path) for e in complete) == ["early_00001.cbf", "late_00001.cbf"]
    assert all(e.created for e in complete)  # new files, even if the file system reuses an inode


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM)."""
    with open("/proc/%d/status" % pid) as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def test_decompression_bombs_cost_the_service_no_memory_and_delay_no_frame(make_service, subscribe, make_frame,
                                                                            tmp_path):
    """A 3.8 kB .cbf.bz2 that inflates to 2 GiB (behind a real frame's header) and a 2 MB .cbf.gz that inflates
    to 2 GiB of zeros: one error result each, the service's peak memory barely moves, good frames beside them
    are analysed at once."""
    service = make_service(workers=1).start()
    subscriber = subscribe(service.pub)
    data = make_frame(str(tmp_path / "source_00001.cbf"))
    peak_before = peak_rss_kib(service.process.pid)
    zeros_bz2 = bz2.compress(bytes(46 << 20))  # 81 bytes
    (service.watch / "bomb_00001.cbf.bz2").write_bytes(bz2.compress(data) + zeros_bz2 * 47)
    zeros_gz = gzip.compress(bytes(64 << 20))  # 64 kB
    (service.watch / "bomb_00002.cbf.gz").write_bytes(zeros_gz * 32)
    for number in (1, 2):
        make_frame(str(service.watch / ("good_%05d.cbf" % number)), seed=number)
    results = {os.path.basename(r["file"]): r for r in subscriber.settled_results(service, 4, 30)}
    assert sorted(results) == ["bomb_00001.cbf.bz2", "bomb_00002.cbf.gz", "good_00001.cbf", "good_00002.cbf"]
    assert "decompression bomb" in results["bomb_00001.cbf.bz2"]["error"]
    assert "not a CBF file" in results["bomb_00002.cbf.gz"]["error"]
    assert all(results["good_%05d.cbf" % n]["status"] == "ok" for n in (1, 2))
    assert max(r["t_done"] for r in results.values()) - min(r["t_seen"] for r in results.values()) < 10
    assert peak_rss_kib(service.process.pid) - peak_before < 50 * 1024


def test_a_file_given_up_and_completed_later_is_complete_as_a_new_file(watcher, tmp_path, make_frame):
    """A writer that closes a frame half-written and later appends the rest: the early verdict is not final,
    the completed file is reported as new (``created``), so the ledger analyses it."""
    data = make_frame(str(tmp_path / "source_00001.cbf"))
    target = watcher.folder / "slow_00001.cbf"
    target.write_bytes(data[:-500])
    assert events(watcher, "incomplete", 1)[0].reason.endswith(truncated(data[:-500]))
    with open(target, "ab") as fh:
        fh.write(data[-500:])
    complete = events(watcher, "complete", 1)
    assert [(e.path, e.created) for e in complete] == [(str(target), True)]


def test_the_service_answers_bad_files_with_their_cause_long_before_the_incomplete_timeout(make_service, subscribe,
                                                                                           make_frame, tmp_path):
    service = make_service(workers=1, incomplete_timeout_s=30.0).start()
    subscriber = subscribe(service.pub)
    causes = bad_files(service.watch, make_frame(str(tmp_path / "source_00001.cbf")))
    make_frame(str(service.watch / "good_00001.cbf"))
    started = time.monotonic()
    results = {os.path.basename(r["file"]): r for r in subscriber.settled_results(service, len(causes) + 1, 20)}
    assert time.monotonic() - started < 10
    assert results.pop("good_00001.cbf")["status"] == "ok"
    assert {name: r["error"] for name, r in results.items()} == causes


def test_a_close_that_lands_while_the_file_is_inspected_does_not_fail_the_frame(tmp_path, make_frame, monkeypatch):
    """The writer finishes while the checker reads the unfinished file: that reading is not the final verdict
    (the close hints a fresh check, which finds the frame complete)."""
    data = make_frame(str(tmp_path / "source_00001.cbf"), shape=(200, 160))
    folder = tmp_path / "watched"
    folder.mkdir()
    path = str(folder / "x_00001.cbf")
    writer = open(path, "wb")
    writer.write(data[: len(data) * 3 // 4])
    writer.flush()
    w = Watcher(folders=(str(folder),))
    w.notice(path, hinted=True)
    real_inspect = watcher_module.inspect

    def inspect_while_the_writer_finishes(inspected: str):
        seen = real_inspect(inspected)
        writer.write(data[len(data) * 3 // 4:])
        writer.close()
        w.notice(path, written=True)  # its close event
        return seen

    monkeypatch.setattr(watcher_module, "inspect", inspect_while_the_writer_finishes)
    assert w._check(path, w._pending[path]) is None
    monkeypatch.setattr(watcher_module, "inspect", real_inspect)
    assert w._check(path, w._pending[path]).kind == "complete"
