"""The contract between the service and its workers (spotfinder_daemon.protocol): every message round-trips, parameters
of every kind cross unchanged, every malformed message is refused with its reason, and a real worker process
speaks it over real ZeroMQ sockets on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zmq

from service_helpers import child_env
from spotfinder_core import Params, analyse
from spotfinder_core.params import PARAMETERS
from spotfinder_core.report import format_body
from spotfinder_daemon import protocol
from spotfinder_daemon.protocol import (QUERY, VERSION, WATCH, Bye, FrameRef, Heartbeat, Job, JobKey, ProtocolError,
                                        Ready, Result, Started)

WORKER = {"worker": "host:0123456789ab", "pid": 4711, "host": "host"}
PARAMS = Params({"distl.res.outer": 2.5, "distl.scanbox_windows": (101, 51, 51)})

MESSAGES = [
    Job(lane=WATCH, id=42, frame=FrameRef(path="/d/x_00001.cbf"), params=PARAMS),
    Job(lane=QUERY, id=1, frame=FrameRef(path="/d/master.h5", index=0), params=Params(), verify_md5=False,
        reply="body"),
    Job(lane=QUERY, id=2, frame=FrameRef(path="/d/x_00002.cbf"), params=Params(), roots=("/d", "/e/f")),
    Ready(**WORKER),
    Ready(worker="monitoring-probe"),
    Started(**WORKER, lane=WATCH, id=42, t_start=1700000000.25),
    Started(**WORKER, lane=QUERY, id=42),
    Result(**WORKER, lane=WATCH, id=42, t_start=1700000000.25, result={"status": "ok", "spot_total": 7}),
    Result(**WORKER, lane=QUERY, id=1, result={"status": "error", "error": "no such file"}, text="DISTL text\n"),
    Heartbeat(**WORKER),
    Heartbeat(**WORKER, busy=JobKey(lane=QUERY, id=3)),
    Bye(**WORKER),
]


def decode(message) -> object:
    data = protocol.encode(message)
    return protocol.decode_job(data) if isinstance(message, Job) else protocol.decode_report(data)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: "%s-%s" % (m.TYPE, getattr(m, "lane", "")))
def test_every_message_round_trips(message):
    assert decode(message) == message


def test_the_wire_form_is_versioned_json_with_lane_id_and_frame():
    job = json.loads(protocol.encode(MESSAGES[0]))
    assert job == {"v": VERSION, "type": "job", "lane": "watch", "id": 42,
                   "frame": {"path": "/d/x_00001.cbf", "index": None},
                   "params": {"distl.res.outer": 2.5, "distl.scanbox_windows": [101, 51, 51]},
                   "verify_md5": True, "reply": None, "roots": None, "budget_mb": None, "budget_s": None}
    heartbeat = json.loads(protocol.encode(MESSAGES[-2]))
    assert heartbeat == {"v": VERSION, "type": "heartbeat", **WORKER, "busy": {"lane": "query", "id": 3}}


def test_numpy_scalars_in_a_result_are_encoded_as_plain_json():
    report = Result(**WORKER, lane=WATCH, id=1, result={"spot_total": np.int64(7), "resolution": np.float32(2.5)})
    assert protocol.decode_report(protocol.encode(report)).result == {"spot_total": 7, "resolution": 2.5}


def test_fields_a_message_does_not_declare_are_ignored():
    data = json.dumps({"v": VERSION, "type": "ready", "worker": "w", "from_the_future": [1]}).encode()
    assert protocol.decode_report(data) == Ready(worker="w")


SAMPLES = {"str": "/d/x_00001.cbf", "bool": True, "int": 7, "float": 2.5, "ints": (99, 41, 21), "floats": (105.2, 98.0)}


def exact(params: Params) -> dict:
    """The explicit values with their types: 2 and 2.0, (1, 2) and [1, 2] must not pass for each other."""
    return {path: (type(value), value) for path, value in params.explicit().items()}


def crossed(params: Params) -> Params:
    """Parameters as a worker gets them: encoded, through JSON text, decoded."""
    return protocol.decode_params(json.loads(json.dumps(protocol.encode_params(params))))


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_parameters_of_every_kind_cross_unchanged(kind):
    path = next(p.path for p in PARAMETERS if p.kind == kind)
    for value in (SAMPLES[kind], None):
        params = Params({path: value})
        assert exact(crossed(params)) == exact(params)


def test_every_parameter_with_its_default_crosses_unchanged_and_an_int_float_stays_an_int():
    everything = Params({p.path: p.default for p in PARAMETERS})
    assert exact(crossed(everything)) == exact(everything) and crossed(everything) == everything
    assert exact(crossed(Params({"distl.res.outer": 2}))) == {"distl.res.outer": (int, 2)}


def wire(**fields) -> bytes:
    return json.dumps({"v": VERSION, **fields}).encode()


def job_wire(**changes) -> bytes:
    body = {"type": "job", "lane": "watch", "id": 3, "frame": {"path": "/d/x_00001.cbf", "index": None},
            "params": {}, "verify_md5": True, "reply": None}
    body.update(changes)
    return wire(**{key: value for key, value in body.items() if value is not ...})


REPORT_REFUSALS = [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"type": "ready", "worker": "w"}).encode(), "no protocol version"),
    (json.dumps({"v": 2, "type": "ready", "worker": "w"}).encode(), "protocol version 2; this end speaks 1"),
    (wire(type="nonsense", worker="w"), "unknown type 'nonsense'"),
    (wire(type="job", worker="w"), "unknown type 'job'"),
    (wire(type="heartbeat"), "heartbeat message without worker"),
    (wire(type="heartbeat", worker=""), "bad worker"),
    (wire(type="heartbeat", worker="w", pid="12"), "bad pid"),
    (wire(type="heartbeat", worker="w", pid=True), "bad pid"),
    (wire(type="heartbeat", worker="w", host=5), "bad host"),
    (wire(type="started", worker="w", id=1), "started message without lane"),
    (wire(type="started", worker="w", lane="watch"), "started message without id"),
    (wire(type="started", worker="w", lane="ondemand", id=1), "bad lane 'ondemand'"),
    (wire(type="started", worker="w", lane="watch", id="ondemand-1"), "bad id"),
    (wire(type="started", worker="w", lane="watch", id=True), "bad id"),
    (wire(type="started", worker="w", lane="watch", id=[1]), "bad id"),
    (wire(type="started", worker="w", lane="watch", id=1, t_start="now"), "bad t_start"),
    (wire(type="result", worker="w", lane="watch", id=1), "result message without result"),
    (wire(type="result", worker="w", lane="watch", id=1, result=None), "bad result"),
    (wire(type="result", worker="w", lane="watch", id=1, result=[1, 2]), "bad result"),
    (wire(type="result", worker="w", lane="watch", id=1, result={}, text=5), "bad text"),
    (wire(type="heartbeat", worker="w", busy=["watch", 1]), "bad busy"),
    (wire(type="heartbeat", worker="w", busy={"lane": "watch"}), "bad busy.id"),
    (wire(type="heartbeat", worker="w", busy={"lane": "elsewhere", "id": 1}), "bad busy.lane"),
]


@pytest.mark.parametrize("data, why", REPORT_REFUSALS)
def test_malformed_reports_are_refused_with_the_reason(data, why):
    with pytest.raises(ProtocolError, match=why):
        protocol.decode_report(data)


JOB_REFUSALS = [
    (job_wire(type="result"), "not a job", False),
    (job_wire(lane="ondemand"), "bad lane", False),
    (job_wire(id="ondemand-3"), "bad id", False),
    (job_wire(frame=...), "job message without frame", True),
    (job_wire(frame="/d/x_00001.cbf"), "bad frame", True),
    (job_wire(frame={"index": None}), "bad frame.path", True),
    (job_wire(frame={"path": "/d/m.h5", "index": -1}), "bad frame.index", True),
    (job_wire(frame={"path": "/d/m.h5", "index": 1.5}), "bad frame.index", True),
    (job_wire(frame={"path": "/d/m.h5", "index": True}), "bad frame.index", True),
    (job_wire(params=["not", "a", "mapping"]), "bad params", True),
    (job_wire(params={"distl.no_such_thing": 1}), "unknown parameter 'distl.no_such_thing'", True),
    (job_wire(params={"distl.bins.N": "7"}), "bad distl.bins.N", True),
    (job_wire(params={"distl.bins.N": 7.0}), "bad distl.bins.N", True),
    (job_wire(params={"distl.res.outer": True}), "bad distl.res.outer", True),
    (job_wire(params={"distl.scanbox_windows": [101, 51.5, 51]}), "bad distl.scanbox_windows", True),
    (job_wire(params={"autoindex_override_beam": 105.2}), "bad autoindex_override_beam", True),
    (job_wire(params={"distl.verbose": 1}), "bad distl.verbose", True),
    (job_wire(verify_md5="yes"), "bad verify_md5", True),
    (job_wire(reply="html"), "bad reply", True),
    (job_wire(roots="/d"), "bad roots", True),
    (job_wire(roots=["d"]), "bad roots", True),
    (job_wire(roots=["/d", None]), "bad roots", True),
]


@pytest.mark.parametrize("data, why, names_the_job", JOB_REFUSALS)
def test_malformed_jobs_are_refused_and_name_the_job_once_lane_and_id_are_read(data, why, names_the_job):
    with pytest.raises(ProtocolError, match=why) as refused:
        protocol.decode_job(data)
    assert refused.value.job == (JobKey(lane="watch", id=3) if names_the_job else None)


def test_a_job_of_another_version_is_refused_without_naming_it():
    data = json.dumps({**json.loads(job_wire()), "v": 2}).encode()
    with pytest.raises(ProtocolError, match="protocol version 2") as refused:
        protocol.decode_job(data)
    assert refused.value.job is None


def test_a_real_worker_process_speaks_the_protocol_on_both_lanes(tmp_path, make_frame):
    """Jobs of both lanes with the same id, one asking for DISTL's text, parameters with a tuple: every report the
    worker sends decodes, and each result answers its own (lane, id)."""
    frame = tmp_path / "synthetic_00001.cbf"
    make_frame(str(frame))
    context = zmq.Context()
    jobs, reports = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    work_port = jobs.bind_to_random_port("tcp://127.0.0.1")
    results_port = reports.bind_to_random_port("tcp://127.0.0.1")
    worker = subprocess.Popen([sys.executable, "-m", "spotfinder_daemon.worker",
                               "--work", "tcp://127.0.0.1:%d" % work_port,
                               "--results", "tcp://127.0.0.1:%d" % results_port, "--heartbeat", "0.2"],
                              env=child_env())

    def receive() -> protocol.Report:
        assert reports.poll(30000), "the worker stopped reporting"
        return protocol.decode_report(reports.recv())

    try:
        ready = receive()
        assert isinstance(ready, Ready) and ready.pid == worker.pid and ready.worker
        sent = [Job(lane=WATCH, id=1, frame=FrameRef(path=str(frame)), params=PARAMS),
                Job(lane=QUERY, id=1, frame=FrameRef(path=str(frame)), params=PARAMS, reply="body",
                    roots=(str(tmp_path),))]  # checked where it is opened: the same result and text
        for job in sent:
            jobs.send(protocol.encode(job))
        started, results, heartbeats = [], {}, []
        while len(results) < len(sent):
            report = receive()
            assert report.worker == ready.worker and report.pid == worker.pid
            if isinstance(report, Started):
                started.append(report.key)
            elif isinstance(report, Result):
                assert report.key in started
                results[report.key] = report
            elif isinstance(report, Heartbeat):
                heartbeats.append(report)
        while not heartbeats:
            report = receive()
            if isinstance(report, Heartbeat):
                heartbeats.append(report)
        assert started == [job.key for job in sent]
        assert {heartbeat.busy for heartbeat in heartbeats} <= {None, *started}
        here = analyse(str(frame), PARAMS)  # the parameters crossed: the worker's answer is ours in process
        expected = {**here.as_dict(), "proc_ms": None}
        watched, queried = results[JobKey(lane=WATCH, id=1)], results[JobKey(lane=QUERY, id=1)]
        assert here.status == "ok" and watched.text is None
        assert {**watched.result, "proc_ms": None} == expected == {**queried.result, "proc_ms": None}
        assert queried.text == format_body(here)
        worker.terminate()
        while not isinstance(report := receive(), Bye):
            assert isinstance(report, Heartbeat)
        assert worker.wait(10) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        jobs.close(linger=0)
        reports.close(linger=0)
        context.term()
