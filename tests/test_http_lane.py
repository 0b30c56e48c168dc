"""The on-demand lane with a real dispatcher, ledger and ZeroMQ sockets, in process: queries go ahead of the
watcher's backlog, the queue is bounded, a lost job is resent once and then answered with an error."""
from __future__ import annotations

import time

import pytest
import zmq

from spotfinder_core import Params
from spotfinder_daemon import protocol
from spotfinder_daemon.dispatcher import Dispatcher
from spotfinder_daemon.ledger import Ledger
from spotfinder_daemon.ondemand import Lane, LaneClosed, LaneFull


@pytest.fixture
def wired(tmp_path):
    """(lane, ledger, dispatcher, a PULL socket standing in for the workers)."""
    context = zmq.Context()
    ledger = Ledger(state_dir=str(tmp_path))
    lane = Lane(capacity=2, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    dispatcher = Dispatcher(context=context, endpoint="inproc://work", ledger=ledger, params=Params(),
                            dispatch_timeout_s=5.0, max_tries=3, lane=lane)
    pull = context.socket(zmq.PULL)
    pull.connect("inproc://work")
    yield lane, ledger, dispatcher, pull
    pull.close(linger=0)
    dispatcher.close()
    ledger.close()
    context.term()


def received(pull: zmq.Socket) -> list[protocol.Job]:
    jobs = []
    while pull.poll(200):
        jobs.append(protocol.decode_job(pull.recv()))
    return jobs


def test_queries_go_ahead_of_the_backlog_and_the_queue_is_bounded(wired):
    lane, ledger, dispatcher, pull = wired
    for n in range(5):
        ledger.see("/d/x_%05d.cbf" % n, "/d/x_#####.cbf", time.time())
        ledger.enqueue("/d/x_%05d.cbf" % n, "/d/x_#####.cbf", time.time(), time.time(), "1:%d" % n)
    first = lane.submit("/d/q_00001.cbf", Params({"distl.res.outer": 3.0}), "body")
    lane.submit("/d/q_00002.cbf", Params(), None)
    with pytest.raises(LaneFull):
        lane.submit("/d/q_00003.cbf", Params(), None)
    dispatcher.dispatch(workers_alive=1)  # room for two: both queries, no frame
    queries = received(pull)
    assert [(job.lane, job.id, job.frame.path) for job in queries] == [("query", 1, "/d/q_00001.cbf"),
                                                                      ("query", 2, "/d/q_00002.cbf")]
    assert queries[0] == first.message(verify_md5=True) and queries[0].reply == "body"
    assert queries[0].params == Params({"distl.res.outer": 3.0})
    assert lane.in_flight() == 2 and lane.depth() == 0
    lane.finished(first.id, {"status": "ok"}, "text")
    assert first.wait(0).text == "text"
    dispatcher.dispatch(workers_alive=1)
    [frame] = received(pull)
    assert (frame.lane, frame.id, frame.frame, frame.reply) == ("watch", 1, protocol.FrameRef(path="/d/x_00000.cbf"),
                                                                None)


def test_a_lost_job_is_resent_once_then_answered_with_an_error(wired):
    lane, _, dispatcher, pull = wired
    job = lane.submit("/d/poison_00001.cbf", Params(), "body")
    for worker in ("w:1", "w:2"):
        dispatcher.dispatch(workers_alive=1)
        assert [m.key for m in received(pull)] == [protocol.JobKey(lane="query", id=job.id)]
        lane.started(job.id, worker, time.monotonic() + 5.0)
        dispatcher.worker_lost(worker, charge=True)
    outcome = job.wait(0)
    assert outcome.result is None and "died on it 2 times" in outcome.error
    dispatcher.dispatch(workers_alive=1)
    assert received(pull) == []


def test_an_abandoned_job_is_not_sent_and_closing_answers_the_rest(wired):
    lane, _, dispatcher, pull = wired
    gone = lane.submit("/d/a_00001.cbf", Params(), None)
    waiting = lane.submit("/d/b_00001.cbf", Params(), None)
    lane.abandon(gone)
    lane.close("stopping")
    assert waiting.wait(0).error == "stopping" and gone.wait(0) is None
    with pytest.raises(LaneClosed):
        lane.submit("/d/c_00001.cbf", Params(), None)
    dispatcher.dispatch(workers_alive=1)
    assert received(pull) == []
