"""The on-demand lane with a real dispatcher, ledger and ZeroMQ sockets, in process: queries go ahead of the
watcher's backlog, the queue is bounded, a lost job is resent once and then answered with an error; a query
is admitted by its expected wait (queries ahead x the lane's own time per frame / workers) against its
deadline, and refused at once with no worker."""
from __future__ import annotations

import math
import time

import pytest
import zmq

from spotfinder_core import Params
from spotfinder_daemon import ondemand, protocol
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


class Clock:
    """A monotonic clock the test moves (the lane times its jobs with it)."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def run_one(lane: Lane, clock: Clock, seconds: float) -> None:
    """Submit, take, start and finish one job that takes ``seconds`` at its worker."""
    job = lane.submit("/d/t_00001.cbf", Params(), None, deadline_s=1e6)
    [taken] = lane.take(1)
    lane.dispatched(taken, clock.now)
    lane.started(job.id, "w:1", clock.now + 60)
    clock.now += seconds
    lane.finished(job.id, {"status": "ok"}, None)


def test_admission_follows_the_expected_wait_against_the_deadline(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ondemand, "time", clock)
    lane = Lane(capacity=1000, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    lane.set_workers(2)
    # the prior (1 s per frame): 0.5 x 10 s leaves 4 frames of wait per worker ahead of a new query's own frame
    assert lane.frame_s() == ondemand.PRIOR_FRAME_S == 1.0 and ondemand.DEADLINE_SHARE == 0.5
    assert lane.admit_limit(10.0) == 9
    jobs = [lane.submit("/d/q_%05d.cbf" % n, Params(), None, deadline_s=10.0) for n in range(9)]
    assert lane.expected_wait_s() == 4.5
    with pytest.raises(LaneFull) as refused:
        lane.submit("/d/q_99999.cbf", Params(), None, deadline_s=10.0)
    assert refused.value.retry_after_s == 1 and "9 queries ahead" in refused.value.reason
    jobs.append(lane.submit("/d/q_99999.cbf", Params(), None, deadline_s=20.0))  # a longer deadline still fits
    for job in jobs:
        lane.abandon(job)
    assert lane.depth() == 0
    # the first measurement replaces the prior, later ones are folded in: quick to rise, slow to fall
    run_one(lane, clock, 0.2)
    assert lane.frame_s() == pytest.approx(0.2)
    run_one(lane, clock, 0.4)
    assert lane.frame_s() == pytest.approx(0.2 + ondemand.FRAME_S_RISE * 0.2) == pytest.approx(0.3)
    run_one(lane, clock, 0.1)
    assert lane.frame_s() == pytest.approx(0.3 - ondemand.FRAME_S_FALL * 0.2) == pytest.approx(0.29)
    assert lane.admit_limit(10.0) == math.floor((5.0 / 0.29 - 1) * 2) + 1
    assert lane.admit_limit(1000.0) == 1000  # the memory bound
    lane.set_workers(1)
    assert lane.admit_limit(0.1) == 1  # an idle lane takes a query however slow the frames are


def test_retry_after_comes_from_the_estimate_and_the_memory_bound_holds():
    lane = Lane(capacity=3, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    lane.set_workers(1)
    for n in range(3):
        lane.submit("/d/q_%05d.cbf" % n, Params(), None, deadline_s=100.0)
    with pytest.raises(LaneFull) as refused:
        lane.submit("/d/q_00003.cbf", Params(), None, deadline_s=100.0)
    assert refused.value.retry_after_s == 1  # one query must go first: one frame at the 1 s prior
    lane = Lane(capacity=100, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    lane.set_workers(1)
    for n in range(20):  # patient queries (a 100 s deadline) fill the lane past what a 10 s one accepts
        lane.submit("/d/q_%05d.cbf" % n, Params(), None, deadline_s=100.0)
    assert lane.admit_limit(10.0) == 5
    with pytest.raises(LaneFull) as refused:
        lane.submit("/d/q_00020.cbf", Params(), None, deadline_s=10.0)
    assert refused.value.retry_after_s == 16  # 16 queries must go first for it to fit: 16 frames at 1 s


def test_with_no_worker_a_query_is_refused_at_once():
    lane = Lane(capacity=10, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    lane.set_workers(0)
    with pytest.raises(LaneFull) as refused:
        lane.submit("/d/q_00001.cbf", Params(), None, deadline_s=120.0)
    assert refused.value.retry_after_s is None and "no worker" in refused.value.reason
    assert lane.expected_wait_s() == math.inf and lane.admit_limit(120.0) == 0 and lane.depth() == 0
