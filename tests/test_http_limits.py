"""The service never hangs: idle sockets, a burst of concurrent queries, oversized requests, a frame that kills
its workers; every request is answered.  Real service on 127.0.0.1; EXIT from elsewhere is refused."""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from spotfinder_daemon.http import Request
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


def test_an_upload_must_keep_moving_but_may_outlast_the_request_deadline(service, data):
    """A form upload's deadline is about progress: each MiB must arrive within it, not the whole body."""
    head = ('--b\r\nContent-Disposition: form-data; name="filename"\r\n\r\n%s\r\n--b\r\n'
            'Content-Disposition: form-data; name="adsc_data"; filename="x"\r\n\r\n'
            % (data / "omega_scan.cbf")).encode()
    tail, chunks = b"\r\n--b--\r\n", 4
    headers = {"Content-Type": "multipart/form-data; boundary=b",
               "Content-Length": str(len(head) + chunks * (1 << 20) + len(tail))}

    def slow_body():
        yield head
        for _ in range(chunks):
            yield bytes(1 << 20)
            time.sleep(HTTP_TIMEOUT_S * 0.4)
        yield tail

    started = time.monotonic()
    status, _, reply = request(service.http_port, "POST", "/spotfinder", slow_body(), headers)
    assert time.monotonic() - started > HTTP_TIMEOUT_S
    assert status == 200 and reply.startswith(b"Image: %s\n" % bytes(data / "omega_scan.cbf")), reply
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=HTTP_TIMEOUT_S + 5) as sock:
        sock.sendall(b"POST /spotfinder HTTP/1.1\r\nHost: x\r\n%s\r\n%s%s" % (
            b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()), head, bytes(1 << 19)))
        try:  # half a MiB, then a stall: cut off without a reply
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


def test_oversized_and_malformed_requests_are_refused(service):
    port = service.http_port
    status, headers, body = request(port, "GET", legacy_url({"distl.image": "x" * 9000}))
    assert (status, headers["content-type"]) == (414, "text/plain") and body.startswith(b"Sorry: URL longer")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # refused before the body is read
        sock.sendall(b"POST /spotfinder HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
        reply = sock.makefile("rb").read()  # until the service closes
        assert reply.startswith(b"HTTP/1.1 413 ") and reply.endswith(b"\r\n\r\nSorry: request body larger than "
                                                                  b"1048576 bytes\n"), reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # the JSON API keeps JSON errors
        sock.sendall(b"PUT /status HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
        reply = sock.makefile("rb").read()  # until the service closes
        assert reply.startswith(b"HTTP/1.1 413 ") and b'"error"' in reply, reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /spotfinder HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1 extra\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = request(port, "POST", "/spotfinder", b"bin=1", form)
    assert status == 400 and body.startswith(b"Sorry: ") and b"filename" in body


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
    def post(client: str):
        return queries.legacy_post(Request("POST", "/spotfinder", {}, {}, b"", client,
                                           form={"filename": "EXIT", "bin": "1"}))

    refused = post("192.0.2.7")
    assert refused.status == 403 and refused.then is None
    accepted = post("::1")
    assert accepted.status == 200 and accepted.body == b""
    accepted.then()
    assert stopped == [1]


def test_forms_too_many_parts_or_malformed_get_a_legacy_text_400(service, data):
    """The streamed form parser refuses what is not worth reading on, in DISTL's text, and the service goes on."""
    field = '--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n'
    too_many = ("".join(field % n for n in range(300)) + "--b--\r\n").encode()
    malformed = b"--b\r\nthis line is no header\r\n\r\nx\r\n--b--\r\n"
    for body in (too_many, malformed):
        status, headers, reply = request(service.http_port, "POST", "/spotfinder", body,
                                         {"Content-Type": "multipart/form-data; boundary=b"})
        assert (status, headers["content-type"]) == (400, "text/plain") and reply.startswith(b"Sorry: "), reply
    form = ('--b\r\nContent-Disposition: form-data; name="filename"\r\n\r\n%s\r\n--b--\r\n'
            % (data / "omega_scan.cbf")).encode()
    status, _, reply = request(service.http_port, "POST", "/spotfinder", form,
                               {"Content-Type": "multipart/form-data; boundary=b"})
    assert status == 200 and reply.startswith(b"Image: %s\n" % bytes(data / "omega_scan.cbf")), reply
