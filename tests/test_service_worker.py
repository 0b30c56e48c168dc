"""A worker process on real sockets: jobs in, results out; a bad frame or bad job costs one result, not the worker."""
from __future__ import annotations

import json
import subprocess
import sys

import zmq

from service_helpers import child_env, free_port
from spotfinder_core import Params
from spotfinder_daemon import protocol
from spotfinder_daemon.protocol import WATCH, FrameRef, Job


def job(job_id: int, path: str, index: int | None = None, **params) -> bytes:
    return protocol.encode(Job(lane=WATCH, id=job_id, frame=FrameRef(path=path, index=index), params=Params(params)))


def test_worker_reports_errors_per_frame_and_keeps_going(tmp_path, make_frame):
    good = tmp_path / "good_00001.cbf"
    make_frame(str(good))
    context = zmq.Context()
    jobs, results = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    work_port, results_port = free_port(), free_port()
    jobs.bind("tcp://127.0.0.1:%d" % work_port)
    results.bind("tcp://127.0.0.1:%d" % results_port)
    worker = subprocess.Popen([sys.executable, "-m", "spotfinder_daemon.worker",
                               "--work", "tcp://127.0.0.1:%d" % work_port,
                               "--results", "tcp://127.0.0.1:%d" % results_port], env=child_env())
    try:
        assert results.poll(30000), "worker never said ready"
        assert isinstance(protocol.decode_report(results.recv()), protocol.Ready)
        jobs.send(job(1, str(tmp_path / "missing_00001.cbf")))
        bad_params = json.loads(job(2, str(good)))
        jobs.send(json.dumps(dict(bad_params, params=["not", "a", "mapping"])).encode())
        jobs.send(job(3, str(good), **{"distl.res.outer": 4.0}))
        jobs.send(job(4, str(tmp_path / "master.h5"), index=0))
        jobs.send(json.dumps(dict(json.loads(job(5, str(good))), v=protocol.VERSION + 1)).encode())  # not answered
        jobs.send(job(6, str(good)))
        got = {}
        while 6 not in got:
            assert results.poll(30000), "worker stopped answering"
            report = protocol.decode_report(results.recv())
            if isinstance(report, protocol.Result):
                got[report.id] = report.result
        assert sorted(got) == [1, 2, 3, 4, 6]
        assert got[1]["status"] == "error" and got[1]["error"] == "no such file"
        assert got[2]["status"] == "error" and got[2]["error"].startswith("the job cannot be read: bad params")
        assert got[3]["status"] == "ok"
        assert got[4]["status"] == "error" and got[4]["error"] == "no such file" and got[4]["frame_index"] == 0
        assert got[6]["status"] == "ok"
        assert worker.poll() is None
    finally:
        worker.terminate()
        assert worker.wait(10) == 0
        jobs.close(linger=0)
        results.close(linger=0)
        context.term()
