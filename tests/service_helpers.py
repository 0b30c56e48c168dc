"""Helpers for the service tests: real frames, free ports, a service process, a PUB subscriber.

Everything runs for real on 127.0.0.1: the service is ``python -m spotfinder_daemon.cli serve`` (the code of the
installed ``spotfinder`` command) in its own process group (killed as a group at teardown), the subscriber a
real SUB socket.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
import zmq

from shared_data import real_files

REPO = Path(__file__).resolve().parents[1]
SMALL_FRAMES = ("small_molecule_dls_i19_pilatus_300k/ximg2700_00001.cbf",
                "small_molecule_dls_i19_pilatus_300k/ximg2701_00001.cbf",
                "blank_dls_i19_pilatus_300k/omega_scan.cbf",
                "blank_dls_i19_pilatus_300k/phi_scan_001.cbf")


def real_frames() -> list[str]:
    """The four PILATUS 300K frames of the shared data set; the test is skipped without them."""
    return real_files(SMALL_FRAMES, "real PILATUS 300K frames")


LARGE_FRAMES = tuple("thaumatin_grid_dls_i24_pilatus3_6m/thau_3_2_%04d.cbf" % n for n in (1, 5, 16))


def large_frames() -> list[str]:
    """The plain PILATUS 6M frames of the shared data set (about 0.1 s of analysis each, so that a worker
    is caught busy); the test is skipped without them."""
    return real_files(LARGE_FRAMES, "real PILATUS 6M frames")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held open together while they are picked, so none repeats."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))


def python_command(*args: str) -> list[str]:
    """``spotfinder ARGS...``: spotfinder_daemon.cli runs as __main__ the main() that [project.scripts] names."""
    return [sys.executable, "-m", "spotfinder_daemon.cli", *args]


def entry_point_command(function: str, *args: str) -> list[str]:
    """The console script whose [project.scripts] target is ``spotfinder_daemon.cli:FUNCTION``, run with ARGS."""
    code = "import sys; from spotfinder_daemon.cli import %s as main; sys.exit(main())" % function
    return [sys.executable, "-c", code, *args]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.update(extra)
    return env


class ServiceProcess:
    """``spotfinder serve`` with its own ports, state folder and config file, in its own process group."""

    def __init__(self, tmp: Path, watch: Path, **settings):
        self.tmp = tmp
        self.watch = watch
        self.pub_port, self.http_port, work_port, results_port = free_ports(4)
        self.settings = {"pub": "tcp://127.0.0.1:%d" % self.pub_port, "http": "127.0.0.1:%d" % self.http_port,
                         "work_endpoint": "tcp://127.0.0.1:%d" % work_port,
                         "results_endpoint": "tcp://127.0.0.1:%d" % results_port,
                         "workers": 2, "watch": [str(watch)], "state_dir": str(tmp / "state"),
                         "incomplete_timeout_s": 2.0, "dispatch_timeout_s": 2.0, "frame_timeout_s": 20.0,
                         "worker_liveness_s": 3.0, "drain_timeout_s": 10.0, "pub_settle_s": 0.3,
                         "log_level": "debug"}
        self.settings.update(settings)
        self.config = tmp / "spotfinder-test.yaml"
        self.config.write_text(yaml.safe_dump(self.settings))
        self.process: subprocess.Popen | None = None
        self.groups: list[int] = []  # every run's process group, so teardown kills restarted ones too
        self.runs = 0

    @property
    def pub(self) -> str:
        return self.settings["pub"]

    def start(self, env: dict | None = None, wait_workers: int | None = None) -> ServiceProcess:
        self.runs += 1
        self.log = self.tmp / ("serve-%d.log" % self.runs)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(python_command("serve", "--config", str(self.config)), stdout=log,
                                            stderr=subprocess.STDOUT, env=env or child_env(), start_new_session=True)
        self.groups.append(self.process.pid)
        wanted = self.settings["workers"] if wait_workers is None else wait_workers
        wait_for(lambda: self._alive_workers() >= wanted, 30, "the service and %d workers" % wanted)
        return self

    def _alive_workers(self) -> int:
        if self.process.poll() is not None:
            raise AssertionError("service exited with %s:\n%s" % (self.process.returncode, self.log.read_text()))
        try:
            return self.status()["workers_alive"]
        except OSError:
            return -1

    def get(self, path: str) -> dict:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.http_port, path), timeout=5) as reply:
            return json.loads(reply.read())

    def status(self) -> dict:
        return self.get("/status")

    def wait_status(self, predicate, timeout: float = 10, what: str = "a status") -> dict:
        """The first /status that satisfies ``predicate`` (the snapshot is refreshed every 0.2 s)."""
        return wait_for(lambda: (lambda status: status if predicate(status) else None)(self.status()), timeout, what)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def results_record(self) -> list[dict]:
        """Every stored result, from /results (paged): the service's record of what it published."""
        record, since = [], 0
        while True:
            page = self.get("/results?since=%d" % since)["results"]
            if not page:
                return [m for m in record if m["type"] == "result"]
            record.extend(page)
            since = page[-1]["seq"]

    def wait_idle(self, timeout: float = 30) -> dict:
        """The first /status with nothing waiting, queued or in flight."""
        return self.wait_status(lambda s: s["queue_depth"] == s["in_flight"] == s["waiting_complete"] == 0, timeout,
                                "nothing queued or in flight")

    def kill_group(self) -> None:
        """Teardown: every run's service and every worker it started, whatever state they are in."""
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            self.process.wait(10)


class Subscriber:
    """A SUB socket on a thread, collecting every message body; survives service restarts (reconnects)."""

    def __init__(self, endpoint: str, topic: str = "spotfinder.v1."):
        self.messages: list[dict] = []
        self.topics: list[str] = []
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.RECONNECT_IVL, 50)
        self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
        self._socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        self._socket.connect(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(50):
                topic, body = self._socket.recv_multipart()
                self.topics.append(topic.decode())
                self.messages.append(json.loads(body))

    def results(self) -> list[dict]:
        return [m for m in list(self.messages) if m["type"] == "result"]

    def wait_results(self, count: int, timeout: float) -> list[dict]:
        wait_for(lambda: len(self.results()) >= count, timeout, "%d results" % count)
        return self.results()

    def settled_results(self, service: ServiceProcess, count: int, timeout: float) -> list[dict]:
        """The results received once ``count`` arrived and the service is idle, checked against its record:
        exactly the stored results, none twice (a resend would be stored and published again)."""
        self.wait_results(count, timeout)
        service.wait_idle(timeout)
        record = service.results_record()
        wait_for(lambda: len(self.results()) >= len(record), 5, "every stored result on PUB")
        assert sorted(m["seq"] for m in self.results()) == [m["seq"] for m in record]
        return self.results()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(linger=0)
        self._context.term()


def assert_exactly_once(results: list[dict], files: list[str]) -> None:
    published = [r["file"] for r in results]
    duplicates = sorted({f for f in published if published.count(f) > 1})
    assert not duplicates, "published more than once: %s" % duplicates
    assert sorted(published) == sorted(files), "missing: %s" % sorted(set(files) - set(published))


def assert_seq_increasing(messages: list[dict]) -> None:
    seqs = [m["seq"] for m in messages]
    assert all(b > a for a, b in zip(seqs, seqs[1:])), "seq not strictly increasing: %s" % seqs


@pytest.fixture
def make_service(tmp_path):
    """Factory of ServiceProcess objects (not started) whose process groups are killed at teardown."""
    made: list[ServiceProcess] = []
    watch = tmp_path / "watch"
    watch.mkdir()

    def make(**settings) -> ServiceProcess:
        made.append(ServiceProcess(tmp_path, watch, **settings))
        return made[-1]

    yield make
    for service in made:
        service.kill_group()


@pytest.fixture
def subscribe():
    """Factory of Subscriber objects, closed at teardown."""
    made: list[Subscriber] = []

    def make(endpoint: str, topic: str = "spotfinder.v1.") -> Subscriber:
        made.append(Subscriber(endpoint, topic))
        return made[-1]

    yield make
    for subscriber in made:
        subscriber.close()


def receiver(address: str) -> socket.socket:
    """A datagram socket bound where a service is told to send its sd_notify messages (NOTIFY_SOCKET)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.1)
    return sock


def received(sock: socket.socket) -> list[str]:
    """The notifications waiting on a receiver (it waits 0.1 s for each)."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out
