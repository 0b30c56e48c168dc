"""On-demand queries queue like Apache's: admitted by their expected wait, refused at once (503 with a Retry-After
from the estimate) only when they could not be answered in time, and at once with no worker.  Real services on
127.0.0.1, real PILATUS 6M frames, and the stock cctbx client example itself (from the peer venv)."""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import socket
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest

from http_helpers import SETS, legacy_url, make_data_root, reference, request
from service_helpers import ServiceProcess
from shared_data import PEER_VENV, STOCK_CLIENTS

FRAME = "thau_3_2_0001.cbf"  # a PILATUS 6M frame with DISTL's reference texts
REFERENCE_SET = "res4.9_bins"  # the references were made at distl.res.outer=4.9 (the example's own is 3.3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("admission"))


@pytest.fixture
def make_service(data, tmp_path):
    """Factory of started ``spotfinder serve`` processes (2 workers unless told) whose data root is the data
    folder; killed at teardown."""
    made: list[ServiceProcess] = []

    def make(**settings) -> ServiceProcess:
        made.append(ServiceProcess(tmp_path, data / "watch", data_root=[str(data)], **settings))
        return made[-1].start(wait_workers=settings.get("workers", 2))

    yield make
    for service in made:
        service.kill_group()


def six_stand_in() -> dict[str, types.ModuleType]:
    """What the example imports from ``six`` (not installed here): ``six.moves.range`` and ``six.moves.urllib``."""
    six, moves = types.ModuleType("six"), types.ModuleType("six.moves")
    moves.range, moves.urllib = range, urllib
    six.moves = moves
    return {"six": six, "six.moves": moves}


def load_client_example(monkeypatch, replies: Path) -> types.ModuleType:
    """The stock example as it is installed, its logic untouched; only its console is a stand-in that keeps each
    reply in a file of its own (48 processes print at once, and a reply is bytes)."""
    path = STOCK_CLIENTS / "general_client_example.py" if STOCK_CLIENTS else None
    if path is None or not path.is_file():
        pytest.skip("the stock cctbx client example is not in the peer venv %s (set DISTL_PEER_VENV)" % PEER_VENV)
    for name, module in six_stand_in().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("general_client_example", path)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # the pool's forked callers find its functions by name
    spec.loader.exec_module(example)

    def console(reply) -> None:
        kind = "reply" if isinstance(reply, bytes) else "error"
        with open(replies / ("%d-%d.%s" % (os.getpid(), time.monotonic_ns(), kind)), "wb") as out:
            out.write(reply if isinstance(reply, bytes) else str(reply).encode())

    example.print = console
    return example


def test_the_stock_client_example_48_callers_get_all_100_answers(make_service, data, tmp_path, monkeypatch):
    service = make_service()
    frames = data / "clients"
    for idx in range(1, 101):  # its template names one frame per index: each a link to the same 6M frame
        (frames / ("c%04d" % idx)).mkdir(parents=True)
        os.link(data / FRAME, frames / ("c%04d" % idx) / FRAME)
    replies = tmp_path / "replies"
    replies.mkdir()
    example = load_client_example(monkeypatch, replies)
    example.ABS_DATA_TEMPLATE = str(frames / "c%04d" / FRAME)
    example.HOST, example.PORT = "127.0.0.1", str(service.http_port)
    example.N_CLIENT_THREADS = 48
    example.IMAGE_RANGE = range(1, 101)
    example.DISTL_OPTIONS = ["%s=%s" % item for item in SETS[REFERENCE_SET].items()]
    example.SERVER_TYPE = "Apache"  # no delay between requests
    example.TIME_DELAY = 0.10
    default_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(180)  # the example waits forever: a hang fails the test instead
    try:
        started = time.monotonic()
        example.multi_thread()
        elapsed = time.monotonic() - started
    finally:
        socket.setdefaulttimeout(default_timeout)
        gc.collect()  # the example leaves its pool open: its idle callers are ended here
    errors = sorted(path.read_text() for path in replies.glob("*.error"))
    assert errors == []
    answers = sorted(path.read_bytes() for path in replies.glob("*.reply"))
    expected = sorted(reference(FRAME, REFERENCE_SET, frames / ("c%04d" % idx)) for idx in range(1, 101))
    assert len(answers) == 100 and answers == expected
    status = service.wait_status(lambda s: s["ondemand_queue"] == s["ondemand_in_flight"] == 0, 5, "an idle lane")
    assert 0 < status["ondemand_frame_s"] < 5
    print("48 callers x 100 requests: 100/100 answered in %.1f s (%.3f s per frame at a worker)"
          % (elapsed, status["ondemand_frame_s"]))


class Load:
    """Open-loop load: one request every ``1/rate`` s (each on its own thread, so a slow reply never slows the
    arrivals), and a /status poller beside it."""

    def __init__(self, port: int, target: str, rate: float, duration_s: float):
        self.port, self.target, self.rate, self.duration_s = port, target, rate, duration_s
        self.replies: list[tuple[int, dict, bytes, float]] = []
        self.status_s: list[float] = []  # how long each /status took
        self.snapshots: list[dict] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    def _one(self) -> None:
        started = time.monotonic()
        try:
            status, headers, body = request(self.port, "GET", self.target, timeout=60)
        except OSError as exc:
            status, headers, body = -1, {}, repr(exc).encode()
        with self._lock:
            self.replies.append((status, headers, body, time.monotonic() - started))

    def _poll_status(self) -> None:
        while not self._done.wait(0.25):
            started = time.monotonic()
            status, _, body = request(self.port, "GET", "/status", timeout=10)
            self.status_s.append(time.monotonic() - started if status == 200 else math.inf)
            self.snapshots.append(json.loads(body))

    def run(self) -> None:
        poller = threading.Thread(target=self._poll_status, daemon=True)
        poller.start()
        callers = []
        begin = time.monotonic()
        for n in range(int(self.rate * self.duration_s)):
            time.sleep(max(0.0, begin + n / self.rate - time.monotonic()))
            callers.append(threading.Thread(target=self._one, daemon=True))
            callers[-1].start()
        for caller in callers:
            caller.join(90)
        self._done.set()
        poller.join(15)


def test_three_times_the_workers_capacity_is_answered_in_time_or_refused_at_once(data, make_service):
    deadline_s = 8.0
    # one worker: three times its capacity stays within what this host can send (~90 requests/s) while a
    # frame takes 33 ms or more; with two, frames of 45 ms needed 130/s, and the capped load was absorbed
    workers = 1
    service = make_service(ondemand_timeout_s=deadline_s, workers=workers)
    target = legacy_url({"distl.image": str(data / FRAME)})
    for _ in range(12):  # warm the worker up (the first frame loads its kernels) until its frame time settles
        assert request(service.http_port, "GET", target)[0] == 200
    frame_s = service.status()["ondemand_frame_s"]
    rate = min(3 * workers / frame_s, 90.0)  # three times what the workers do, within what this host can send
    load = Load(service.http_port, target, rate, duration_s=12.0)
    load.run()
    statuses = [status for status, _, _, _ in load.replies]
    assert len(statuses) == int(rate * 12.0) and set(statuses) <= {200, 503}, sorted(set(statuses))
    expected = reference(FRAME, "default", data)
    for status, headers, body, seconds in load.replies:
        if status == 200:
            assert body == expected and seconds < deadline_s
        else:
            assert seconds < 2.0 and int(headers["retry-after"]) >= 1
    assert statuses.count(200) >= workers * 12.0 / frame_s / 3  # the workers were kept busy
    assert statuses.count(503) > 0
    assert max(load.status_s) < 2.0  # /status answered throughout
    peak = max(s["ondemand_queue"] + s["ondemand_in_flight"] for s in load.snapshots)
    assert peak <= max(s["ondemand_admit_limit"] for s in load.snapshots) <= 256  # the memory bound held
    assert max(s["ondemand_expected_wait_s"] for s in load.snapshots) > 0
    metrics = request(service.http_port, "GET", "/metrics")[2].decode()
    assert "spotfinder_ondemand_expected_wait_seconds " in metrics and "spotfinder_ondemand_admit_limit " in metrics
    print("offered %.1f/s for 12 s against ~%.1f/s: %d answered 200, %d refused 503 (p100 %.2f s), status p100 %.2f s"
          % (rate, 2 / frame_s, statuses.count(200), statuses.count(503),
             max(s for st, _, _, s in load.replies if st == 503), max(load.status_s)))


def test_with_no_worker_a_query_is_refused_at_once_and_the_service_is_unhealthy(data, make_service):
    service = make_service(workers=0)
    status = service.wait_status(lambda s: s["health"] != "ok", 5, "the health of a service with no worker")
    assert not status["healthy"] and "workers: 0" in status["health"]
    assert status["ondemand_expected_wait_s"] is None and status["ondemand_admit_limit"] == 0
    started = time.monotonic()
    legacy = request(service.http_port, "GET", legacy_url({"distl.image": str(data / FRAME)}), timeout=10)
    api = request(service.http_port, "GET", "/api/v1/analyse?image=%s" % (data / FRAME), timeout=10)
    assert time.monotonic() - started < 2.0
    assert legacy[0] == 503 and b"no worker is running" in legacy[2]
    assert api[0] == 503 and "no worker is running" in api[2].decode()
    metrics = request(service.http_port, "GET", "/metrics")[2].decode()
    assert "spotfinder_ondemand_expected_wait_seconds +Inf" in metrics


def test_status_and_metrics_answer_when_every_connection_is_taken(data, make_service):
    service = make_service(http_max_connections=4)
    held = [socket.create_connection(("127.0.0.1", service.http_port)) for _ in range(4)]
    try:
        time.sleep(0.2)  # let the accepting thread take them
        assert request(service.http_port, "GET", "/status", timeout=5)[0] == 200
        assert request(service.http_port, "GET", "/metrics", timeout=5)[0] == 200
        status, headers, body = request(service.http_port, "GET", legacy_url({"distl.image": str(data / FRAME)}),
                                        timeout=5)
        assert status == 503 and headers["retry-after"] == "1" and b"too many connections" in body
    finally:
        for sock in held:
            sock.close()
    assert math.isfinite(service.status()["ondemand_expected_wait_s"])
