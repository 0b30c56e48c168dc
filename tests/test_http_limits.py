"""The service never hangs: idle sockets, a burst of concurrent queries, oversized requests, a frame that kills
its workers; every request is answered.  Real service on 127.0.0.1; EXIT from elsewhere is refused."""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from spotfinder_daemon.http import Request
from spotfinder_daemon.legacy import encode_form
from spotfinder_daemon.ondemand import Lane
from spotfinder_daemon.queries import DataRoots, Queries
from http_helpers import legacy_url, make_data_root, reference, request
from service_helpers import ServiceProcess, child_env
from spotfinder_core import Params

HTTP_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = make_data_root(tmp_path_factory.mktemp("limits"))
    (data / "poison_0001.cbf").write_bytes((data / "omega_scan.cbf").read_bytes())
    return data


@pytest.fixture(scope="module")
def service(data):
    """2 workers, a short request deadline, a small connection cap and queue; frames named poison_* kill workers."""
    process = ServiceProcess(data.parent, data / "watch", data_root=[str(data)], http_timeout_s=HTTP_TIMEOUT_S,
                             http_max_connections=40, ondemand_queue=6)
    try:
        yield process.start(env=child_env(SPOTFINDER_TEST_CRASH_ON="poison_*"))
    finally:
        process.kill_group()


def test_100_concurrent_queries_beside_10_idle_sockets_are_all_answered(service, data):
    port = service.http_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    try:
        names = ["thau_3_2_0001.cbf", "omega_scan.cbf"]

        def query(i: int):
            return request(port, "GET", legacy_url({"distl.image": str(data / names[i % 2])}), timeout=60)

        started = time.monotonic()
        with ThreadPoolExecutor(100) as pool:
            replies = list(pool.map(query, range(100)))
        elapsed = time.monotonic() - started
        statuses = [status for status, _, _ in replies]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 6, statuses  # at least a queue's worth got through
        for i, (status, headers, body) in enumerate(replies):
            if status == 200:
                assert body == reference(names[i % 2], "default", data)
            else:
                assert int(headers["retry-after"]) >= 1
        assert elapsed < 60

        status, _, body = request(port, "GET", legacy_url({"distl.image": str(data / "thau_3_2_0016.cbf")}))
        assert status == 200 and body == reference("thau_3_2_0016.cbf", "default", data)
        for sock in idle:  # cut off by the request deadline
            sock.settimeout(HTTP_TIMEOUT_S + 5)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert service.status()["ondemand_queue"] == 0


def test_a_client_trickling_its_request_is_cut_off(service):
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=HTTP_TIMEOUT_S + 1) as sock:
        request_line = b"GET /status HTTP/1.1\r\nHost: x\r\n"
        end = time.monotonic() + HTTP_TIMEOUT_S + 1
        for byte in request_line:  # each byte well within the socket timeout, the whole far beyond the deadline
            if time.monotonic() > end:
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


def test_oversized_and_malformed_requests_are_refused(service):
    port = service.http_port
    assert request(port, "GET", legacy_url({"distl.image": "x" * 9000}))[0] == 414
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # refused before the body is read
        sock.sendall(b"POST /spotfinder HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /spotfinder HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1 extra\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = request(port, "POST", "/spotfinder", b"bin=1", form)
    assert status == 400 and b"filename" in body


def test_a_frame_that_kills_workers_is_resent_once_then_answered_with_an_error(service, data):
    port = service.http_port
    status, _, body = request(port, "GET", legacy_url({"distl.image": str(data / "poison_0001.cbf")}))
    assert status == 500 and b"poison_0001.cbf" in body and b"died on it 2 times" in body, body
    service.wait_status(lambda s: s["workers_alive"] == 2, 30, "replacement workers")
    status, _, body = request(port, "GET", legacy_url({"distl.image": str(data / "omega_scan.cbf")}))
    assert status == 200 and body == reference("omega_scan.cbf", "default", data)


def test_exit_is_refused_unless_it_comes_from_this_host(tmp_path):
    stopped = []
    queries = Queries(lane=Lane(capacity=4, dispatch_timeout_s=10.0, frame_timeout_s=10.0), startup=Params(),
                      roots=DataRoots(folders=(str(tmp_path),)), timeout_s=5.0, stop_service=lambda: stopped.append(1),
                      on_error=lambda kind: None)
    content_type, body = encode_form([("filename", "EXIT"), ("bin", "1")])

    def post(client: str):
        return queries.legacy_post(Request("POST", "/spotfinder", {}, {"content-type": content_type}, body, client))

    refused = post("192.0.2.7")
    assert refused.status == 403 and refused.then is None
    accepted = post("::1")
    assert accepted.status == 200 and accepted.body == b""
    accepted.then()
    assert stopped == [1]
