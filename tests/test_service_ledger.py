"""The ledger on a real SQLite file: state transitions, exactly-once finish, seq across restarts, tries."""
from __future__ import annotations

import time

from spotfinder_daemon.ledger import Ledger, read_messages
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
    heartbeat_seq = ledger.next_seq()
    one = ledger.finish(first, "done", time.time(), compose_ok)
    assert ledger.finish(first, "done", time.time(), compose_ok) is None  # the duplicate result is dropped
    assert one["body"]["seq"] > heartbeat_seq
    assert one["topic"] == "spotfinder.v1.result./d/x_#####.cbf"
    ledger.close()

    reopened = Ledger(state_dir=str(tmp_path))
    two = reopened.finish(second, "done", time.time(), compose_ok)
    assert two["body"]["seq"] == one["body"]["seq"] + 1
    messages, last = read_messages(str(tmp_path), since=0)
    assert [m["file"] for m in messages] == ["/d/x_00001.cbf", "/d/x_00002.cbf"] and last == two["body"]["seq"]
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
