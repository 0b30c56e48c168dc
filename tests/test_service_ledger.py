"""The ledger on a real SQLite file: state transitions, exactly-once finish, seq across restarts, tries."""
from __future__ import annotations

import base64
import os
import random
import shutil
import time

import pytest

from spotfinder_daemon.ledger import FILE_NAME, Ledger, LedgerDamaged, LedgerUnwritable, read_messages
from spotfinder_daemon.publisher import failure_message, frame_message


def compose_ok(seq, frame):
    return frame_message(seq, frame, {"status": "ok", "spot_total": 1, "proc_ms": 2.0}, "w:1", time.time())


def queued(ledger: Ledger, path: str) -> int:
    ledger.see(path, "/d/x_#####.cbf", time.time())
    assert ledger.enqueue(path, "/d/x_#####.cbf", time.time(), time.time(), "1:%d" % len(path))
    return ledger.find(path).id


def test_a_frame_is_finished_once_and_its_seq_survives_a_restart(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    first, second = queued(ledger, "/d/x_00001.cbf"), queued(ledger, "/d/x_00002.cbf")
    assert not ledger.enqueue("/d/x_00001.cbf", "/d/x_#####.cbf", 0.0, 0.0, "1:14")  # a second event changes nothing
    one = ledger.finish(first, "done", time.time(), compose_ok)
    assert ledger.finish(first, "done", time.time(), compose_ok) is None  # the duplicate result is dropped
    assert one["body"]["seq"] == 1 and one["body"]["ledger"] == ledger.id
    assert one["topic"] == "spotfinder.v1.result./d/x_#####.cbf"
    ledger.close()

    reopened = Ledger(state_dir=str(tmp_path))
    two = reopened.finish(second, "done", time.time(), compose_ok)
    assert two["body"]["seq"] == one["body"]["seq"] + 1
    assert reopened.id == ledger.id  # made once, kept in the ledger
    messages, last, ledger_id = read_messages(str(tmp_path), since=0)
    assert [m["file"] for m in messages] == ["/d/x_00001.cbf", "/d/x_00002.cbf"] and last == two["body"]["seq"]
    assert ledger_id == ledger.id and {m["ledger"] for m in messages} == {ledger.id}
    assert read_messages(str(tmp_path), since=one["body"]["seq"])[0] == [two["body"]]
    assert reopened.counts()["done"] == 2


def test_in_flight_frames_are_requeued_after_a_restart(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    frame_id = queued(ledger, "/d/x_00001.cbf")
    ledger.mark_dispatched(frame_id, time.monotonic() + 10)
    ledger.mark_started(frame_id, "host:12", time.monotonic() + 10)
    ledger.close()
    reopened = Ledger(state_dir=str(tmp_path))
    assert reopened.requeue_in_flight() == 1
    assert [f.path for f in reopened.queued(10)] == ["/d/x_00001.cbf"]
    assert reopened.get(frame_id).tries == 0  # a restart is not the frame's fault


def test_a_frame_whose_workers_keep_dying_runs_out_of_tries(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    frame_id = queued(ledger, "/d/x_00001.cbf")
    outcomes = []
    for attempt in range(3):
        ledger.mark_dispatched(frame_id, time.monotonic() + 10)
        ledger.mark_started(frame_id, "host:%d" % attempt, time.monotonic() + 10)
        assert [f.id for f in ledger.held_by("host:%d" % attempt)] == [frame_id]
        outcomes.append(ledger.release(frame_id, charge=True, max_tries=3))
    assert outcomes == [True, True, False]
    failed = ledger.finish(frame_id, "failed", time.time(),
                           lambda seq, frame: failure_message(seq, frame, "failed: its worker died on it 3 times"))
    assert failed["body"]["status"] == "error" and failed["body"]["image_number"] == 1
    assert ledger.counts()["failed"] == 1


def test_overdue_frames_and_uncharged_release(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    frame_id = queued(ledger, "/d/x_00001.cbf")
    now = time.monotonic()
    ledger.mark_dispatched(frame_id, now + 1)
    assert ledger.overdue(now) == []
    assert [f.id for f in ledger.overdue(now + 2)] == [frame_id]
    assert ledger.release(frame_id, charge=False, max_tries=1)  # lost in transit: no try counted
    assert ledger.get(frame_id).state == "queued" and ledger.get(frame_id).tries == 0


def test_an_uncharged_release_at_the_limit_requeues_and_a_charged_one_fails(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    frame_id = queued(ledger, "/d/x_00001.cbf")
    ledger.mark_dispatched(frame_id, time.monotonic() + 10)
    assert not ledger.release(frame_id, charge=True, max_tries=1)  # killed before it was failed...
    assert ledger.release(frame_id, charge=False, max_tries=1)  # ...or max_tries lowered: it is sent again
    assert ledger.get(frame_id).state == "queued"
    ledger.mark_dispatched(frame_id, time.monotonic() + 10)
    ledger.mark_started(frame_id, "w:1", time.monotonic() + 10)
    assert not ledger.release(frame_id, charge=True, max_tries=1)


def test_counts_keep_finished_totals_and_retention_prunes_old_frames(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    old, new = queued(ledger, "/d/x_00001.cbf"), queued(ledger, "/d/x_00002.cbf")
    ledger.finish(old, "done", time.time() - 100, compose_ok)
    ledger.finish(new, "done", time.time(), compose_ok)
    assert ledger.counts() == {"seen": 0, "queued": 0, "dispatched": 0, "done": 2, "failed": 0}
    assert ledger.prune(time.time() - 50) == 1
    assert [m["file"] for m in read_messages(str(tmp_path), since=0)[0]] == ["/d/x_00002.cbf"]
    assert ledger.counts()["done"] == 2 and not ledger.known("/d/x_00001.cbf", "1:14")


def test_a_file_recreated_under_a_finished_name_reopens_its_frame(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    frame_id = queued(ledger, "/d/x_00001.cbf")
    identity = ledger.get(frame_id).identity
    ledger.finish(frame_id, "done", time.time(), compose_ok)
    assert ledger.known("/d/x_00001.cbf", identity) and not ledger.known("/d/x_00001.cbf", "9:9")
    assert not ledger.enqueue("/d/x_00001.cbf", "/d/x_#####.cbf", 0.0, 0.0, identity)  # the same file again
    assert ledger.enqueue("/d/x_00001.cbf", "/d/x_#####.cbf", 0.0, 0.0, identity, created=True)  # re-created
    assert ledger.get(frame_id).state == "queued"
    ledger.mark_dispatched(frame_id, time.monotonic() + 10)
    assert ledger.give_up("/d/x_00001.cbf", "") is None  # in flight: not given up


def ledger_with_history(state_dir, frames: int = 200) -> Ledger:
    """A ledger of several pages: ``frames`` finished frames and their messages."""
    ledger = Ledger(state_dir=str(state_dir))
    for n in range(1, frames + 1):
        ledger.finish(queued(ledger, "/d/x_%05d.cbf" % n), "done", time.time(), compose_ok)
    return ledger


def copy_as_killed(ledger: Ledger, to) -> None:
    """The files a SIGKILL would leave: the database and its write-ahead log as they are now, not checkpointed."""
    to.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(ledger.path + suffix, to / (FILE_NAME + suffix))


def test_a_ledger_damaged_mid_file_or_emptied_is_refused_at_start(tmp_path):
    ledger_with_history(tmp_path / "a").close()
    damaged = tmp_path / "a" / FILE_NAME
    with open(damaged, "r+b") as fh:  # random bytes over the middle pages
        fh.seek(4 * 4096)
        fh.write(random.Random(1).randbytes(3 * 4096))
    with pytest.raises(LedgerDamaged, match="ledger %s is damaged: " % damaged):
        Ledger(state_dir=str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / FILE_NAME).write_bytes(b"")
    with pytest.raises(LedgerDamaged, match="empty or not a ledger"):
        Ledger(state_dir=str(tmp_path / "b"))
    fresh = Ledger(state_dir=str(tmp_path / "c"))  # a missing ledger is a new one, with an id of its own
    assert fresh.id != ledger_with_history(tmp_path / "d", frames=1).id and fresh.last_seq() == 0


def test_a_write_ahead_log_damaged_after_a_kill_is_refused_not_cut_short(tmp_path):
    ledger = ledger_with_history(tmp_path / "live", frames=60)
    copy_as_killed(ledger, tmp_path / "intact")
    copy_as_killed(ledger, tmp_path / "torn")
    copy_as_killed(ledger, tmp_path / "damaged")
    wal_size = os.path.getsize(ledger.path + "-wal")
    ledger.close()
    with open(tmp_path / "torn" / (FILE_NAME + "-wal"), "ab") as fh:  # a frame cut short by the kill
        fh.write(b"\x00" * 1000)
    with open(tmp_path / "damaged" / (FILE_NAME + "-wal"), "r+b") as fh:
        fh.seek(wal_size // 2)
        fh.write(random.Random(2).randbytes(64))
    for name in ("intact", "torn"):
        kept = Ledger(state_dir=str(tmp_path / name))
        assert kept.last_seq() == 60 and len(read_messages(str(tmp_path / name), since=0)[0]) == 60
        kept.close()
    with pytest.raises(LedgerDamaged, match="write-ahead log .* fails its checksum"):
        Ledger(state_dir=str(tmp_path / "damaged"))


def test_a_refused_write_is_rolled_back_and_noted_until_a_write_commits_again(tmp_path):
    ledger = Ledger(state_dir=str(tmp_path))
    frame_id = queued(ledger, "/d/x_00001.cbf")
    ledger.db.execute("PRAGMA query_only = ON")  # SQLite refuses every write, as on a read-only folder
    with pytest.raises(LedgerUnwritable, match="cannot be written: attempt to write a readonly database"):
        ledger.finish(frame_id, "done", time.time(), compose_ok)
    assert ledger.write_error and not ledger.check_writable()
    assert ledger.get(frame_id).state == "queued" and ledger.last_seq() == 0 and not ledger.db.in_transaction
    ledger.db.execute("PRAGMA query_only = OFF")
    assert ledger.check_writable() and ledger.write_error is None
    assert ledger.finish(frame_id, "done", time.time(), compose_ok)["body"]["seq"] == 1


def test_a_path_that_is_not_utf8_is_kept_exactly(tmp_path):
    """Linux names are bytes: one that is not UTF-8 (a surrogate-escaped str in Python) is stored and read back
    exactly, found and known by that name, and its result published with the exact bytes too."""
    path = os.fsdecode(b"/d/fz_name_\xff\xfe_0001.cbf")
    ledger = Ledger(state_dir=str(tmp_path))
    assert ledger.see(path, "/d/fz_name_\\xff\\xfe_####.cbf", time.time())
    assert not ledger.see(path, "/d/fz_name_\\xff\\xfe_####.cbf", time.time())
    assert ledger.enqueue(path, "/d/fz_name_\\xff\\xfe_####.cbf", time.time(), time.time(), "1:7")
    assert ledger.find(path).path == path and [f.path for f in ledger.queued(10)] == [path]
    assert ledger.find(os.fsdecode(b"/d/fz_name_\xff\xfd_0001.cbf")) is None
    ledger.close()
    reopened = Ledger(state_dir=str(tmp_path))
    frame_id = reopened.find(path).id
    body = reopened.finish(frame_id, "done", time.time(), compose_ok)["body"]
    assert reopened.known(path, "1:7")
    assert body["file"] == "/d/fz_name_\\xff\\xfe_0001.cbf"
    assert os.fsdecode(base64.b64decode(body["file_bytes_b64"])) == path
    assert read_messages(str(tmp_path), since=0)[0] == [body]
