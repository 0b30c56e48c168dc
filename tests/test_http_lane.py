"""The on-demand lane with a real dispatcher, ledger and ZeroMQ sockets, in process: queries go ahead of the
watcher's backlog, the queue is bounded, a lost job is resent once and then answered with an error."""
from __future__ import annotations

import time

import pytest
import zmq

from spotfinder_daemon.dispatcher import Dispatcher
from spotfinder_daemon.ledger import Ledger
from spotfinder_daemon.ondemand import Lane, LaneClosed, LaneFull


@pytest.fixture
def wired(tmp_path):
    """(lane, ledger, dispatcher, a PULL socket standing in for the workers)."""
    context = zmq.Context()
    ledger = Ledger(str(tmp_path))
    lane = Lane(capacity=2, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    dispatcher = Dispatcher(context, "inproc://work", ledger, {}, 5.0, 3, lane)
    pull = context.socket(zmq.PULL)
    pull.connect("inproc://work")
    yield lane, ledger, dispatcher, pull
    pull.close(linger=0)
    dispatcher.close()
    ledger.close()
    context.term()


def received(pull: zmq.Socket) -> list[dict]:
    messages = []
    while pull.poll(200):
        messages.append(pull.recv_json())
    return messages


def test_queries_go_ahead_of_the_backlog_and_the_queue_is_bounded(wired):
    lane, ledger, dispatcher, pull = wired
    for n in range(5):
        ledger.see("/d/x_%05d.cbf" % n, "/d/x_#####.cbf", time.time())
        ledger.enqueue("/d/x_%05d.cbf" % n, "/d/x_#####.cbf", time.time(), time.time(), "1:%d" % n)
    first = lane.submit("/d/q_00001.cbf", {}, "body")
    lane.submit("/d/q_00002.cbf", {}, None)
    with pytest.raises(LaneFull):
        lane.submit("/d/q_00003.cbf", {}, None)
    dispatcher.dispatch(workers_alive=1)  # room for two: both queries, no frame
    assert [m["path"] for m in received(pull)] == ["/d/q_00001.cbf", "/d/q_00002.cbf"]
    assert first.message()["reply"] == "body" and lane.in_flight() == 2 and lane.depth() == 0
    lane.finished(first.id, {"status": "ok"}, "text")
    assert first.wait(0).text == "text"
    dispatcher.dispatch(workers_alive=1)
    assert [m["path"] for m in received(pull)] == ["/d/x_00000.cbf"]


def test_a_lost_job_is_resent_once_then_answered_with_an_error(wired):
    lane, _, dispatcher, pull = wired
    job = lane.submit("/d/poison_00001.cbf", {}, "body")
    for worker in ("w:1", "w:2"):
        dispatcher.dispatch(workers_alive=1)
        assert [m["id"] for m in received(pull)] == [job.id]
        lane.started(job.id, worker, time.monotonic() + 5.0)
        dispatcher.worker_lost(worker, charge=True)
    outcome = job.wait(0)
    assert outcome.result is None and "died on it 2 times" in outcome.error
    dispatcher.dispatch(workers_alive=1)
    assert received(pull) == []


def test_an_abandoned_job_is_not_sent_and_closing_answers_the_rest(wired):
    lane, _, dispatcher, pull = wired
    gone = lane.submit("/d/a_00001.cbf", {}, None)
    waiting = lane.submit("/d/b_00001.cbf", {}, None)
    lane.abandon(gone)
    lane.close("stopping")
    assert waiting.wait(0).error == "stopping" and gone.wait(0) is None
    with pytest.raises(LaneClosed):
        lane.submit("/d/c_00001.cbf", {}, None)
    dispatcher.dispatch(workers_alive=1)
    assert received(pull) == []
