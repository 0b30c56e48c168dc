"""A worker process on real sockets: jobs in, results out; a bad frame or bad job costs one result, not the worker."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import zmq

from cbf_helpers import make_frame
from spotfinder_daemon.worker import encode
from service_helpers import child_env, free_port


def test_numpy_scalars_in_a_result_are_encoded_as_plain_json():
    assert json.loads(encode({"spot_total": np.int64(7), "resolution": np.float32(2.5)})) == \
        {"spot_total": 7, "resolution": 2.5}


def test_worker_reports_errors_per_frame_and_keeps_going(tmp_path):
    good = tmp_path / "good_00001.cbf"
    make_frame(str(good))
    context = zmq.Context()
    jobs, results = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    work_port, results_port = free_port(), free_port()
    jobs.bind("tcp://127.0.0.1:%d" % work_port)
    results.bind("tcp://127.0.0.1:%d" % results_port)
    worker = subprocess.Popen([sys.executable, "-m", "spotfinder_daemon.worker", "--work", "tcp://127.0.0.1:%d" % work_port,
                               "--results", "tcp://127.0.0.1:%d" % results_port], env=child_env())
    try:
        assert results.poll(30000), "worker never said ready"
        assert results.recv_json()["type"] == "ready"
        jobs.send_json({"id": 1, "path": str(tmp_path / "missing_00001.cbf"), "params": {}})
        jobs.send_json({"id": 2, "path": str(good), "params": ["not", "a", "mapping"]})
        jobs.send_json({"id": 3, "path": str(good), "params": {"distl.res.outer": 4.0}})
        got = {}
        while len(got) < 3:
            assert results.poll(30000), "worker stopped answering"
            message = results.recv_json()
            if message["type"] == "result":
                got[message["id"]] = message["result"]
        assert got[1]["status"] == "error" and got[1]["error"] == "no such file"
        assert got[2]["status"] == "error" and got[2]["error"].startswith("analysis raised AttributeError")
        assert got[3]["status"] == "ok"
        assert worker.poll() is None
    finally:
        worker.terminate()
        assert worker.wait(10) == 0
        jobs.close(linger=0)
        results.close(linger=0)
        context.term()
