"""The collector and the roll in process, on real ZeroMQ sockets and a real ledger: malformed messages cost only
themselves, a result is published whatever follows its commit, each lane's reports go to that lane, a dead worker's
last messages are settled."""
from __future__ import annotations

import json
import logging
import time

import pytest
import zmq

from spotfinder_core import Params
from spotfinder_daemon import protocol
from spotfinder_daemon.collector import Collector
from spotfinder_daemon.dispatcher import Dispatcher
from spotfinder_daemon.ledger import Ledger
from spotfinder_daemon.metrics import Metrics
from spotfinder_daemon.ondemand import Lane
from spotfinder_daemon.protocol import QUERY, VERSION, WATCH, Heartbeat, JobKey, Ready, Result, Started
from spotfinder_daemon.publisher import Publisher
from spotfinder_daemon.roll import Loss, Roll, new_worker_id


@pytest.fixture
def wired(tmp_path):
    """(collector, a PUSH socket standing in for the workers, a SUB socket on its PUB, the ledger, the roll)."""
    context = zmq.Context()
    ledger = Ledger(state_dir=str(tmp_path))
    roll = Roll(liveness_s=5.0)
    publisher = Publisher(context=context, endpoint="inproc://pub")
    lane = Lane(capacity=4, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    collector = Collector(context=context, endpoint="inproc://results", ledger=ledger, publisher=publisher,
                          frame_timeout_s=20.0, lane=lane, metrics=Metrics(), roll=roll)
    push, sub = context.socket(zmq.PUSH), context.socket(zmq.SUB)
    push.connect("inproc://results")
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    sub.connect("inproc://pub")
    yield collector, push, sub, ledger, roll
    for sock in (push, sub):
        sock.close(linger=0)
    collector.close()
    publisher.close()
    ledger.close()
    context.term()


def dispatched_frame(ledger: Ledger, name: str = "x_00001.cbf") -> int:
    path = "/d/" + name
    ledger.see(path, "/d/x_#####.cbf", time.time())
    ledger.enqueue(path, "/d/x_#####.cbf", time.time(), time.time(), "1:1")
    frame_id = ledger.find(path).id
    ledger.mark_dispatched(frame_id, time.monotonic() + 10)
    return frame_id


def deliver(collector: Collector, push: zmq.Socket, *messages) -> None:
    for message in messages:
        if isinstance(message, dict):
            message = json.dumps(message).encode()
        push.send(message if isinstance(message, bytes) else protocol.encode(message))
    deadline = time.monotonic() + 5
    handled = 0
    while handled < len(messages) and time.monotonic() < deadline:
        collector.socket.poll(100)
        handled += collector.receive_all()
    assert handled == len(messages)


def published(sub: zmq.Socket) -> list[dict]:
    out = []
    while sub.poll(200):
        out.append(json.loads(sub.recv_multipart()[1]))
    return out


def test_malformed_messages_are_dropped_with_one_warning_and_the_collector_goes_on(wired, caplog):
    collector, push, sub, ledger, roll = wired
    frame_id = dispatched_frame(ledger)
    malformed = [b"not json", b"[1, 2]", {"v": VERSION, "type": "heartbeat"},
                 {"v": VERSION, "type": "nonsense", "worker": "w"},
                 {"type": "ready", "worker": "w"}, {"v": VERSION + 1, "type": "ready", "worker": "w"},
                 {"v": VERSION, "type": "heartbeat", "worker": "w", "pid": "12"},
                 {"v": VERSION, "type": "result", "worker": "w", "lane": WATCH, "id": frame_id, "result": [1, 2]},
                 {"v": VERSION, "type": "result", "worker": "w", "lane": WATCH, "id": [frame_id], "result": {}},
                 {"v": VERSION, "type": "result", "worker": "w", "id": frame_id, "result": {}},
                 {"v": VERSION, "type": "started", "worker": "w", "lane": WATCH, "id": True}]
    with caplog.at_level(logging.WARNING, logger="spotfinder.collector"):
        deliver(collector, push, *malformed)
    assert roll.workers == {} and ledger.get(frame_id).state == "dispatched"
    assert len(caplog.records) == len(malformed)
    assert all(r.getMessage().startswith("dropped a malformed worker message (") for r in caplog.records)
    # a probe that says hello is a worker of the roll like any other, and goes silent like one: no crash
    deliver(collector, push, Heartbeat(worker="monitoring-probe"))
    assert list(roll.workers) == ["monitoring-probe"] and roll.workers["monitoring-probe"].pid is None
    # a result whose odd fields break the metrics is still published: the send comes right after the commit
    deliver(collector, push, Result(worker="w:1", pid=7, lane=WATCH, id=frame_id,
                                    result={"status": "ok", "proc_ms": "12"}))
    [message] = published(sub)
    assert message["file"] == "/d/x_00001.cbf" and message["proc_ms"] == "12"
    assert ledger.get(frame_id).state == "done"


def test_each_lane_gets_its_own_reports_though_their_ids_are_the_same(wired):
    collector, push, sub, ledger, roll = wired
    frame_id = dispatched_frame(ledger)
    query = collector.lane.submit("/d/q_00001.cbf", Params(), None)
    [taken] = collector.lane.take(1)
    collector.lane.dispatched(taken, time.monotonic())
    assert query.id == frame_id == 1
    deliver(collector, push, Ready(worker="w:1", pid=7),
            Started(worker="w:1", pid=7, lane=QUERY, id=query.id, t_start=time.time()))
    assert roll.workers["w:1"].busy == JobKey(lane=QUERY, id=1) and ledger.get(frame_id).worker is None
    deliver(collector, push, Heartbeat(worker="w:1", pid=7, busy=JobKey(lane=WATCH, id=frame_id)))
    assert roll.workers["w:1"].busy == JobKey(lane=WATCH, id=frame_id)
    deliver(collector, push, Result(worker="w:1", pid=7, lane=QUERY, id=query.id, result={"status": "ok"}, text="t"))
    assert query.wait(0).text == "t" and ledger.get(frame_id).state == "dispatched" and published(sub) == []
    deliver(collector, push, Started(worker="w:1", pid=7, lane=WATCH, id=frame_id),
            Result(worker="w:1", pid=7, lane=WATCH, id=frame_id, result={"status": "ok"}))
    assert ledger.get(frame_id).state == "done" and [m["file"] for m in published(sub)] == ["/d/x_00001.cbf"]
    assert roll.workers["w:1"].busy is None and roll.workers["w:1"].frames_done == 2


def test_a_started_message_read_after_its_worker_died_is_a_charged_loss(wired):
    collector, push, _, ledger, roll = wired
    frame_id = dispatched_frame(ledger)
    worker = new_worker_id()
    deliver(collector, push, Ready(worker=worker, pid=11))
    roll.died(worker)
    assert roll.take_losses() == [Loss(worker, True)]
    deliver(collector, push, Started(worker=worker, pid=11, lane=WATCH, id=frame_id))
    assert roll.take_losses() == [Loss(worker, True)] and [f.id for f in ledger.held_by(worker)] == [frame_id]
    deliver(collector, push, Heartbeat(worker=worker, pid=11))
    assert worker not in roll.workers  # a dead worker does not come back


def test_worker_ids_are_unique_and_dead_ones_are_forgotten_after_the_liveness_window():
    assert new_worker_id() != new_worker_id()
    roll = Roll(liveness_s=0.05)
    roll.died("gone")
    assert roll.heard("gone", 1, "h") is None
    time.sleep(0.1)
    assert roll.silent() == [] and not roll.is_dead("gone")


def test_a_hung_worker_is_reported_and_its_frame_requeued(tmp_path):
    context = zmq.Context()
    ledger = Ledger(state_dir=str(tmp_path))
    dispatcher = Dispatcher(context=context, endpoint="inproc://work", ledger=ledger, params=Params(),
                            dispatch_timeout_s=5.0, max_tries=3,
                            lane=Lane(capacity=4, dispatch_timeout_s=5.0, frame_timeout_s=5.0))
    try:
        frame_id = dispatched_frame(ledger)
        ledger.mark_started(frame_id, "w:hung", time.monotonic() - 1)
        expiry = dispatcher.expire(time.monotonic())
        assert expiry.hung == {"w:hung"} and expiry.exhausted == []
        assert ledger.get(frame_id).state == "queued" and ledger.get(frame_id).tries == 1
    finally:
        dispatcher.close()
        ledger.close()
        context.term()


def test_heartbeats_spend_no_seq_and_name_the_newest_with_the_ledger_id(wired):
    collector, push, sub, ledger, roll = wired
    frame_id = dispatched_frame(ledger)
    deliver(collector, push, Ready(worker="w:1", pid=7))
    collector.heartbeat(queue_depth=0)
    deliver(collector, push, Result(worker="w:1", pid=7, lane=WATCH, id=frame_id, result={"status": "ok"}))
    collector.heartbeat(queue_depth=0)
    before, result, after = published(sub)
    assert "seq" not in before and before["last_seq"] == 0 and before["ledger"] == ledger.id
    assert result["seq"] == 1 and result["ledger"] == ledger.id
    assert "seq" not in after and after["last_seq"] == 1 and ledger.last_seq() == 1


def test_reports_the_ledger_refuses_wait_in_order_and_are_published_once_stored(wired):
    collector, push, sub, ledger, roll = wired
    frame_id = dispatched_frame(ledger)
    ledger.db.execute("PRAGMA query_only = ON")  # SQLite refuses every write, as on a full disk
    deliver(collector, push, Started(worker="w:1", pid=7, lane=WATCH, id=frame_id),
            Result(worker="w:1", pid=7, lane=WATCH, id=frame_id, result={"status": "ok"}))
    assert len(collector.unwritten) == 2 and ledger.write_error and published(sub) == []
    assert ledger.get(frame_id).state == "dispatched" and not collector.unwritten.retry()
    ledger.db.execute("PRAGMA query_only = OFF")
    assert collector.unwritten.retry() and not collector.unwritten and ledger.write_error is None
    [message] = published(sub)
    assert message["seq"] == 1 and message["file"] == "/d/x_00001.cbf"
    assert ledger.get(frame_id).state == "done" and ledger.get(frame_id).worker == "w:1"
