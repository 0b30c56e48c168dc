"""The collector and the roll in process, on real ZeroMQ sockets and a real ledger: malformed messages cost only
themselves, a result is published whatever follows its commit, a dead worker's last messages are settled."""
from __future__ import annotations

import json
import time

import pytest
import zmq

from spotfinder_daemon.collector import Collector, malformed
from spotfinder_daemon.dispatcher import Dispatcher
from spotfinder_daemon.ledger import Ledger
from spotfinder_daemon.metrics import Metrics
from spotfinder_daemon.ondemand import Lane
from spotfinder_daemon.publisher import Publisher
from spotfinder_daemon.roll import Loss, Roll, new_worker_id


@pytest.fixture
def wired(tmp_path):
    """(collector, a PUSH socket standing in for the workers, a SUB socket on its PUB, the ledger, the roll)."""
    context = zmq.Context()
    ledger = Ledger(str(tmp_path))
    roll = Roll(liveness_s=5.0)
    publisher = Publisher(context, "inproc://pub")
    collector = Collector(context, "inproc://results", ledger, publisher, 20.0, Lane(4, 5.0, 5.0), Metrics(), roll)
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
        push.send(message if isinstance(message, bytes) else json.dumps(message).encode())
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


def test_malformed_messages_are_dropped_and_the_collector_goes_on(wired):
    collector, push, sub, ledger, roll = wired
    frame_id = dispatched_frame(ledger)
    deliver(collector, push, b"not json", [1, 2], {"type": "heartbeat"}, {"type": "nonsense", "worker": "w"},
            {"type": "heartbeat", "worker": "w", "pid": "12"},
            {"type": "result", "worker": "w", "id": frame_id, "result": [1, 2]},
            {"type": "result", "worker": "w", "id": [frame_id], "result": {}},
            {"type": "started", "worker": "w", "id": True})
    assert roll.workers == {} and ledger.get(frame_id).state == "dispatched"
    # a probe that says hello is a worker of the roll like any other, and goes silent like one: no crash
    deliver(collector, push, {"type": "heartbeat", "worker": "monitoring-probe"})
    assert list(roll.workers) == ["monitoring-probe"] and roll.workers["monitoring-probe"].pid is None
    # a result whose odd fields break the metrics is still published: the send comes right after the commit
    deliver(collector, push, {"type": "result", "worker": "w:1", "pid": 7, "id": frame_id,
                              "result": {"status": "ok", "proc_ms": "12"}})
    [message] = published(sub)
    assert message["file"] == "/d/x_00001.cbf" and message["proc_ms"] == "12"
    assert ledger.get(frame_id).state == "done"


@pytest.mark.parametrize("message, why", [
    ([1, 2], "not a JSON object"),
    ({"type": "heartbeat", "worker": ""}, "no worker id"),
    ({"type": "result", "worker": "w", "id": 1, "result": None}, "result is not an object"),
    ({"type": "result", "worker": "w", "id": 1, "result": {}, "text": 5}, "text is not a string"),
    ({"type": "started", "worker": "w", "id": 1, "t_start": "now"}, "bad t_start"),
])
def test_malformed_names_the_problem(message, why):
    assert why in malformed(message)


def test_a_started_message_read_after_its_worker_died_is_a_charged_loss(wired):
    collector, push, _, ledger, roll = wired
    frame_id = dispatched_frame(ledger)
    worker = new_worker_id()
    deliver(collector, push, {"type": "ready", "worker": worker, "pid": 11})
    roll.died(worker)
    assert roll.take_losses() == [Loss(worker, True)]
    deliver(collector, push, {"type": "started", "worker": worker, "pid": 11, "id": frame_id})
    assert roll.take_losses() == [Loss(worker, True)] and [f.id for f in ledger.held_by(worker)] == [frame_id]
    deliver(collector, push, {"type": "heartbeat", "worker": worker, "pid": 11})
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
    ledger = Ledger(str(tmp_path))
    dispatcher = Dispatcher(context, "inproc://work", ledger, {}, 5.0, 3, Lane(4, 5.0, 5.0))
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
