"""The worker's budget per frame, with real worker processes: a frame past the memory budget is one error result
and the worker goes on (the same one when the frame's arrays were freed, a fresh one when a numba kernel kept
them); a frame past the time budget is one error result in bounded time, never sent again, and a fresh worker
takes the next frame.  Workers run in a real pool (one worker), as the service runs them."""
from __future__ import annotations

import json
import os
import time

import pytest
import zmq

from service_helpers import child_env, free_ports, make_service, subscribe, wait_for
from shared_data import real_files
from spotfinder_core import Params
from spotfinder_daemon import protocol
from spotfinder_daemon.config import ConfigError, validate
from spotfinder_daemon.dispatcher import Dispatcher
from spotfinder_daemon.ledger import Ledger
from spotfinder_daemon.ondemand import Lane
from spotfinder_daemon.pool import WorkerPool
from spotfinder_daemon.protocol import WATCH, FrameRef, Job
from spotfinder_daemon.worker import STALL_HOOK

__all__ = ["make_service", "subscribe"]  # fixtures used by name

DEFAULTS = validate({})
REAL_LARGE = ("thaumatin_grid_dls_i24_pilatus3_6m/thau_3_2_0001.cbf",
              "eiger2_16m_cbf_dls_thermolysin/dlsnxs2cbf_therm_0001.cbf.gz")


class Endpoints:
    """The service's two sockets for workers: jobs out, reports in."""

    def __init__(self):
        work_port, results_port = free_ports(2)
        self.work, self.results_endpoint = "tcp://127.0.0.1:%d" % work_port, "tcp://127.0.0.1:%d" % results_port
        self.context = zmq.Context()
        self.jobs, self.results = self.context.socket(zmq.PUSH), self.context.socket(zmq.PULL)
        self.jobs.bind(self.work)
        self.results.bind(self.results_endpoint)

    def next_report(self, timeout_s: float) -> protocol.Report:
        assert self.results.poll(timeout_s * 1000), "no word from a worker in %g s" % timeout_s
        return protocol.decode_report(self.results.recv())

    def wait_ready(self) -> int:
        """The pid of the next worker to say it is ready."""
        while True:
            report = self.next_report(60)
            if isinstance(report, protocol.Ready):
                return report.pid

    def run(self, job_id: int, path: str, timeout_s: float = 60, **budget) -> protocol.Result:
        """Send one job and return its result (the workers' other reports are skipped)."""
        self.jobs.send(protocol.encode(Job(lane=WATCH, id=job_id, frame=FrameRef(path=path), params=Params(),
                                           **budget)))
        end = time.monotonic() + timeout_s
        while True:
            report = self.next_report(max(0.1, end - time.monotonic()))
            if isinstance(report, protocol.Result):
                assert report.id == job_id
                return report

    def assert_no_result(self, quiet_s: float) -> None:
        while self.results.poll(quiet_s * 1000):
            assert not isinstance(protocol.decode_report(self.results.recv()), protocol.Result)

    def close(self) -> None:
        self.jobs.close(linger=0)
        self.results.close(linger=0)
        self.context.term()


@pytest.fixture
def endpoints():
    made = Endpoints()
    yield made
    made.close()


@pytest.fixture
def start_pool(endpoints):
    """Starts a pool of one worker on ``endpoints``, as the service does; stopped at teardown."""
    pools: list[WorkerPool] = []

    def start() -> WorkerPool:
        pools.append(WorkerPool(count=1, work_endpoint=endpoints.work, results_endpoint=endpoints.results_endpoint))
        pools[-1].start()
        return pools[-1]

    yield start
    for pool in pools:
        pool.stop()


def replaced(pool: WorkerPool, endpoints: Endpoints, exited_pid: int) -> int:
    """The pid of the worker the pool started after ``exited_pid`` left with exit code 0."""
    exited = wait_for(pool.reap, 10, "the worker to leave")
    assert [(pid, code) for _, pid, code in exited] == [(exited_pid, 0)]
    # reap() starts the fresh one (after a back-off), called again and again as the service's supervision does
    wait_for(lambda: pool.reap() == [] and pool.running(), 10, "a fresh worker")
    return endpoints.wait_ready()


def worker_data_mb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        return next(int(line.split()[1]) >> 10 for line in status if line.startswith("VmData:"))


def test_a_frame_past_the_memory_budget_is_one_error_and_the_worker_goes_on(tmp_path, make_frame, endpoints,
                                                                               start_pool):
    big, small = str(tmp_path / "big_00001.cbf"), str(tmp_path / "small_00001.cbf")
    make_frame(big, shape=(4096, 4096))  # 16 MB of file, 64 MB of pixels, ~550 MB at its peak
    make_frame(small)
    start_pool()
    pid = endpoints.wait_ready()
    budget_mb = worker_data_mb(pid) + 40  # room to read the file, none for its pixels: numpy's MemoryError

    over = endpoints.run(1, big, budget_mb=budget_mb)
    assert over.result["status"] == "error"
    assert over.result["error"] == "out of memory (budget %d MB)" % budget_mb
    fine = endpoints.run(2, small, budget_mb=budget_mb)
    assert fine.result["status"] == "ok"
    unlimited = endpoints.run(3, big)  # the limit is the job's: a job without a budget is not held to the last one
    assert unlimited.result["status"] == "ok"
    assert over.pid == fine.pid == unlimited.pid == pid


def test_a_worker_leaves_when_a_kernel_kept_the_arrays_of_a_frame_past_the_budget(tmp_path, make_frame, endpoints,
                                                                                  start_pool):
    big, small = str(tmp_path / "big_00001.cbf"), str(tmp_path / "small_00001.cbf")
    make_frame(big, shape=(4096, 4096))  # past 512 MB inside a numba kernel, which does not free what it allocated
    make_frame(small)
    pool = start_pool()
    pid = endpoints.wait_ready()

    over = endpoints.run(1, big, budget_mb=512)
    assert over.result["status"] == "error" and over.result["error"] == "out of memory (budget 512 MB)"
    fresh = replaced(pool, endpoints, pid)
    assert fresh != pid
    fine = endpoints.run(2, small, budget_mb=512)
    assert fine.result["status"] == "ok" and fine.pid == fresh


def test_the_default_budget_leaves_real_large_frames_untouched(endpoints, start_pool):
    frames = real_files(REAL_LARGE, "real PILATUS 6M and EIGER2 16M frames")
    start_pool()
    pid = endpoints.wait_ready()
    for job_id, path in enumerate(frames * 2):
        report = endpoints.run(job_id, path, budget_mb=DEFAULTS.worker_memory_mb, budget_s=DEFAULTS.worker_frame_s)
        assert report.result["status"] == "ok", report.result.get("error")
        assert report.result["spot_total"] > 0 and report.pid == pid


def test_a_frame_past_the_time_budget_is_answered_once_and_a_fresh_worker_goes_on(tmp_path, make_frame, endpoints,
                                                                                  start_pool, monkeypatch):
    stall, good = str(tmp_path / "stall_00001.cbf"), str(tmp_path / "good_00001.cbf")
    make_frame(stall)
    make_frame(good)
    monkeypatch.setenv(STALL_HOOK, "stall_*")  # the pool's workers inherit it
    pool = start_pool()
    pid = endpoints.wait_ready()

    started = time.monotonic()
    report = endpoints.run(1, stall, timeout_s=10, budget_s=1.0)
    assert time.monotonic() - started < 1.0 + 3.0
    assert report.result["status"] == "error"
    assert report.result["error"] == "took longer than the budget of 1 s"
    fresh = replaced(pool, endpoints, pid)
    endpoints.assert_no_result(0.5)  # the frame was answered once
    fine = endpoints.run(2, good, budget_s=1.0)
    assert fine.result["status"] == "ok" and fine.pid == fresh


def test_a_frame_within_its_time_budget_is_answered_by_the_analysis(tmp_path, make_frame, endpoints, start_pool):
    good = str(tmp_path / "good_00001.cbf")
    make_frame(good)
    pool = start_pool()
    pid = endpoints.wait_ready()
    for job_id in range(3):  # the watch must forget each finished frame, or it would fire during the next
        report = endpoints.run(job_id, good, budget_s=0.5)
        assert report.result["status"] == "ok" and report.pid == pid
        time.sleep(0.6)
    assert pool.running() == {pool.ids[0]: pid}


@pytest.mark.parametrize("field, value", [("budget_mb", 0), ("budget_mb", 1.5), ("budget_mb", True),
                                          ("budget_s", 0), ("budget_s", -1.0), ("budget_s", "30")])
def test_a_job_with_a_bad_budget_is_refused_by_name(field, value):
    body = json.loads(protocol.encode(Job(lane=WATCH, id=7, frame=FrameRef(path="/d/x_00001.cbf"), params=Params())))
    with pytest.raises(protocol.ProtocolError, match="bad %s" % field) as refused:
        protocol.decode_job(json.dumps(dict(body, **{field: value})).encode())
    assert refused.value.job == protocol.JobKey(lane=WATCH, id=7)  # answerable with an error result


def test_the_service_sends_its_budget_and_a_frame_past_the_time_budget_is_published_once(make_service, subscribe,
                                                                                       make_frame):
    service = make_service(workers=1, worker_frame_s=1.0, worker_memory_mb=2048, max_tries=3)
    subscriber = subscribe(service.pub)
    service.start(env=child_env(**{STALL_HOOK: "stall_*"}))
    written = time.monotonic()
    make_frame(str(service.watch / "stall_00001.cbf"))
    (stalled,) = subscriber.wait_results(1, 15)
    assert time.monotonic() - written < 1.0 + 8.0  # completeness check, dispatch, budget, a little slack
    assert stalled["status"] == "error" and stalled["error"] == "took longer than the budget of 1 s"
    make_frame(str(service.watch / "good_00001.cbf"))  # for the fresh worker
    results = {os.path.basename(r["file"]): r for r in subscriber.settled_results(service, 2, 30)}
    assert sorted(results) == ["good_00001.cbf", "stall_00001.cbf"]
    assert results["good_00001.cbf"]["status"] == "ok"
    log = service.log.read_text()  # the stalled frame was answered, not re-sent (a good frame may be, for free,
    assert not [line for line in log.splitlines() if "stall_00001" in line and "queued again" in line]  # under load)
    assert "exited with code" not in log


def test_the_dispatcher_sends_the_budget_with_frames_and_queries(tmp_path):
    context = zmq.Context()
    ledger = Ledger(state_dir=str(tmp_path))
    lane = Lane(capacity=2, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    lane.set_workers(1)
    dispatcher = Dispatcher(context=context, endpoint="inproc://work", ledger=ledger, params=Params(),
                            dispatch_timeout_s=5.0, max_tries=3, lane=lane, budget_mb=768, budget_s=12.5)
    pull = context.socket(zmq.PULL)
    pull.connect("inproc://work")
    try:
        ledger.see("/d/x_00001.cbf", "x_#####.cbf", time.time())
        ledger.enqueue("/d/x_00001.cbf", "x_#####.cbf", time.time(), time.time(), "1:1")
        lane.submit("/d/q_00001.cbf", Params(), "body")
        assert dispatcher.dispatch(workers_alive=1) == 2
        jobs = []
        while len(jobs) < 2 and pull.poll(5000):
            jobs.append(protocol.decode_job(pull.recv()))
        assert sorted((job.lane, job.budget_mb, job.budget_s) for job in jobs) == [
            (protocol.QUERY, 768, 12.5), (WATCH, 768, 12.5)]
    finally:
        pull.close(linger=0)
        dispatcher.close()
        ledger.close()
        context.term()


def test_the_budget_settings_are_checked_and_may_be_turned_off():
    assert (DEFAULTS.worker_memory_mb, DEFAULTS.worker_frame_s) == (1024, 30.0)
    assert validate({"worker_memory_mb": None, "worker_frame_s": None}).worker_memory_mb is None
    with pytest.raises(ConfigError, match="worker_memory_mb: must be at least 512"):
        validate({"worker_memory_mb": 100})
    with pytest.raises(ConfigError, match="worker_frame_s: expected a number"):
        validate({"worker_frame_s": "30 s"})
