"""Hostile neighbours against a real service on 127.0.0.1: a symlink flipped between the check and the open,
cross-site requests from a browser, slow connections that would fill every slot."""
from __future__ import annotations

import gzip
import json
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import zmq

from http_helpers import data_root_service, legacy_url, request
from service_helpers import ServiceProcess
from spotfinder_core import Params, analyse
from spotfinder_core.report import format_body
from spotfinder_core.simulate import Scene, random_spots, write_cbf
from spotfinder_daemon import protocol
from spotfinder_daemon.dispatcher import Dispatcher
from spotfinder_daemon.ledger import Ledger
from spotfinder_daemon.ondemand import Lane
from spotfinder_daemon.worker import analyse_job

FLIP_QUERIES = 400
FLIP_LIMIT_S = 120.0  # the flipping thread stops by then whatever happens
SLOWLORIS_CONNECTIONS = 600
SLOWLORIS_S = 10


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> dict[str, Path]:
    """``data`` (the data root) with a blank frame, and outside it a frame with 20 spots (a distinct answer)."""
    root = tmp_path_factory.mktemp("security")
    data, outside = root / "data", root / "outside"
    (data / "watch").mkdir(parents=True)
    outside.mkdir()
    write_cbf(str(data / "blank_0001.cbf"), Scene(size=(256, 256), seed=13))
    spotty = Scene(size=(256, 256), seed=11)
    spotty.spots = random_spots(spotty, 20)
    write_cbf(str(outside / "secret_0001.cbf"), spotty)
    return {"data": data, "inside": data / "blank_0001.cbf", "outside": outside / "secret_0001.cbf"}


@pytest.fixture(scope="module")
def service(frames):
    with data_root_service(frames["data"]) as running:
        yield running


def test_a_symlink_flipped_while_queried_never_gets_an_outside_frame_analysed(service, frames):
    """The service checks the link, then a thread flips it outside the root before the worker opens it: the
    worker checks the file it opened, so every reply is the inside frame's analysis or a refusal."""
    link = frames["data"] / "flip_0001.cbf"
    os.symlink(frames["inside"], link)
    inside_text = format_body(analyse(str(frames["inside"]), shown_as=str(link)))
    assert analyse(str(frames["outside"])).spot_total == 20 and analyse(str(frames["inside"])).spot_total == 0
    refused_text = "%s is not a readable file" % link
    stop = threading.Event()

    def flip() -> None:
        spare, end = frames["data"] / "flip.tmp", time.monotonic() + FLIP_LIMIT_S
        while not stop.is_set() and time.monotonic() < end:
            for target in (frames["outside"], frames["inside"]):
                os.symlink(target, spare)
                os.replace(spare, link)

    def query(n: int) -> tuple[str, int, bytes]:
        if n % 2:
            return ("json",) + request(service.http_port, "GET", "/api/v1/analyse?image=%s" % quote(str(link)))[::2]
        return ("legacy",) + request(service.http_port, "GET", legacy_url({"distl.image": str(link)}))[::2]

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(query, range(FLIP_QUERIES)))
    finally:
        stop.set()
        flipper.join(10)
    leaked, answered = [], 0
    for route, status, body in replies:
        if route == "json":
            assert status in (200, 403, 404), body
            if status == 200:
                answered += 1
                if json.loads(body)["spot_total"] != 0:
                    leaked.append(body)
        else:
            assert status == 200 and body.decode() in (inside_text, refused_text), body
            answered += body.decode() == inside_text
    assert not leaked, "%d of %d queries analysed the frame outside the root" % (len(leaked), FLIP_QUERIES)
    assert answered, "no query got through at all: the race was never exercised"


def form(**fields: str) -> tuple[bytes, dict]:
    """A multipart/form-data body as thin_client builds it, and its headers."""
    parts = ['--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % item for item in fields.items()]
    return ("".join(parts) + "--b--\r\n").encode(), {"Content-Type": "multipart/form-data; boundary=b"}


def test_a_web_page_cannot_stop_the_service_or_post_queries_through_a_browser(service, frames):
    """What a browser adds to a request it sends for another site (Origin, Referer, Sec-Fetch-Site) gets a 403 in
    DISTL's text, a text/plain body is no form; the service keeps running and answers DISTL's own POSTs."""
    port = service.http_port
    body, headers = form(filename="EXIT", bin="1")
    for foreign in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": "http://127.0.0.1:%d" % (port + 1)}, {"Referer": "http://evil.example/page.html"},
                    {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://127.0.0.1:%d" % port, "Referer": "http://localhost.evil.example:%d/" % port}):
        status, reply_headers, reply = request(port, "POST", "/spotfinder", body, {**headers, **foreign})
        assert (status, reply_headers["content-type"]) == (403, "text/plain"), (foreign, status, reply)
        assert reply == b"Sorry: cross-site request refused\n"
    status, _, reply = request(port, "POST", "/spotfinder", b"filename=EXIT&bin=1",
                               {"Content-Type": "text/plain;charset=UTF-8"})  # a page's fetch() needs no preflight
    assert status == 400 and b"filename" in reply, reply
    assert request(port, "GET", "/status")[0] == 200 and service.process.poll() is None
    body, headers = form(filename=str(frames["inside"]), bin="1")
    for own in ({}, {"Origin": "http://127.0.0.1:%d" % port}, {"Referer": "http://localhost:%d/status" % port}):
        status, _, reply = request(port, "POST", "/spotfinder", body, {**headers, **own})
        assert status == 200 and reply.startswith(b"Image: %s\n" % bytes(frames["inside"])), (own, reply)


def test_exit_without_a_browser_s_headers_still_stops_the_service(frames, tmp_path):
    process = ServiceProcess(tmp_path, frames["data"] / "watch", data_root=[str(frames["data"])])
    try:
        body, headers = form(filename="EXIT", bin="1")
        status, _, reply = request(process.start().http_port, "POST", "/spotfinder", body, headers)
        assert (status, reply) == (200, b"")
        assert process.wait(30) == 0
    finally:
        process.kill_group()


def test_600_slowloris_connections_from_one_host_leave_status_and_queries_answerable(frames, tmp_path):
    """600 connections from 127.0.0.1 trickle a request a byte a second for 10 s (the cap is 512): each host
    keeps only a few slow readers, so /status probes from the same host are answered throughout, and queries
    work afterwards."""
    process = ServiceProcess(tmp_path, frames["data"] / "watch", data_root=[str(frames["data"])], http_timeout_s=30.0)
    try:
        port = process.start().http_port
        probes: list[int] = []
        attack_over = threading.Event()

        def probe() -> None:
            while not attack_over.wait(0.1):
                try:
                    probes.append(request(port, "GET", "/status", timeout=5)[0])
                except OSError:
                    probes.append(0)

        prober = threading.Thread(target=probe, daemon=True)
        attackers = []
        try:
            prober.start()
            for _ in range(SLOWLORIS_CONNECTIONS):
                try:
                    attackers.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    pass
            line = b"GET /status HTTP/1.1\r\nHost: x\r\n"
            for n in range(SLOWLORIS_S):
                for sock in list(attackers):
                    try:
                        sock.send(line[n:n + 1])
                    except OSError:  # cut by the service
                        sock.close()
                        attackers.remove(sock)
                time.sleep(1.0)
        finally:
            attack_over.set()
            prober.join(10)
            for sock in attackers:
                sock.close()
        assert len(probes) >= 50, probes
        assert probes.count(200) >= 0.95 * len(probes), probes
        status, _, body = request(port, "GET", legacy_url({"distl.image": str(frames["inside"])}))
        assert status == 200 and b"Spot Total :      0" in body, body
        body, headers = form(filename=str(frames["inside"]), bin="1")
        status, _, reply = request(port, "POST", "/spotfinder", body, headers)
        assert status == 200 and reply.startswith(b"Image: %s\n" % bytes(frames["inside"])), reply
    finally:
        process.kill_group()


def test_small_ones_head_huge_since_and_infinite_parameters(service, frames):
    port = service.http_port
    status, headers, body = request(port, "HEAD", "/status")
    assert status == 200 and headers["content-type"] == "application/json" and int(headers["content-length"]) > 0
    assert body == b""
    status, _, body = request(port, "GET", "/results?since=99999999999999999999")
    assert status == 400 and b"since must be" in body, body
    image = quote(str(frames["inside"]))
    for infinite in ("1e999", "-1e999", "inf", "1e999-1e999", "10**400", "9**9**9"):  # the last at once, not in minutes
        status, _, body = request(port, "GET", "/api/v1/analyse?image=%s&res.outer=%s" % (image, infinite))
        assert status == 400 and b"Bad value for distl.res.outer" in body, (infinite, body)
    status, _, body = request(port, "GET", "/api/v1/analyse?image=%s&bins.N=1e999" % image)
    assert status == 400 and b"Bad value for distl.bins.N" in body, body
    finite = [json.loads(request(port, "GET", "/api/v1/analyse?image=%s&res.outer=%s" % (image, value))[2])
              for value in ("1e1", "10")]
    assert {**finite[0], "proc_ms": None} == {**finite[1], "proc_ms": None} and finite[0]["status"] == "ok"


def test_the_worker_analyses_the_file_it_opened_and_refuses_what_lies_elsewhere(frames, tmp_path):
    """The worker's own check (every job of the service names its roots): a compressed frame keeps its suffix,
    a link out of the roots and a FIFO (which a plain open would wait on forever) are refused."""
    root = tmp_path / "root"
    root.mkdir()
    packed = root / "blank_0002.cbf.gz"
    with open(frames["inside"], "rb") as src, gzip.open(packed, "wb") as dst:
        dst.write(src.read())
    os.symlink(frames["outside"], root / "escape_0001.cbf")
    os.mkfifo(root / "fifo_0001.cbf")
    params = Params({"distl.bins.verbose": True})

    def job(name: str, reply: str | None = "body") -> protocol.Job:
        return protocol.Job(lane=protocol.QUERY, id=1, frame=protocol.FrameRef(path=str(root / name)),
                            params=params, reply=reply, roots=(str(root),))

    with tempfile.TemporaryDirectory() as scratch:
        expected = analyse(str(packed), params)
        result, text = analyse_job(job(packed.name), scratch)
        assert expected.status == "ok" and text == format_body(expected)
        assert {**result, "proc_ms": None} == {**expected.as_dict(), "proc_ms": None}
        for name, refusal in (("escape_0001.cbf", "outside"), ("fifo_0001.cbf", "missing"),
                              ("none_0001.cbf", "missing")):
            result, text = analyse_job(job(name), scratch)
            assert (result["status"], result["error"], text) == ("error", protocol.REFUSALS[refusal], None), name
        assert os.listdir(scratch) == []


def test_watched_frames_leave_with_the_watched_folders_as_their_roots(tmp_path):
    """The dispatcher names the watched folders (resolved, as the worker's check sees the opened file) in every
    watched frame's job."""
    watch = tmp_path / "watch"
    watch.mkdir()
    os.symlink(watch, tmp_path / "beamline")
    context = zmq.Context()
    ledger = Ledger(state_dir=str(tmp_path / "state"))
    lane = Lane(capacity=2, dispatch_timeout_s=5.0, frame_timeout_s=5.0)
    dispatcher = Dispatcher(context=context, endpoint="inproc://work", ledger=ledger, params=Params(),
                            dispatch_timeout_s=5.0, max_tries=3, lane=lane,
                            watch_roots=(str(tmp_path / "beamline"),))
    pull = context.socket(zmq.PULL)
    pull.connect("inproc://work")
    try:
        frame = str(tmp_path / "beamline" / "x_00001.cbf")
        ledger.see(frame, "x_#####.cbf", time.time())
        ledger.enqueue(frame, "x_#####.cbf", time.time(), time.time(), "1:1")
        assert dispatcher.dispatch(workers_alive=1) == 1
        assert pull.poll(5000)
        job = protocol.decode_job(pull.recv())
        assert (job.lane, job.frame.path, job.roots) == (protocol.WATCH, frame, (str(watch),))
    finally:
        pull.close(linger=0)
        dispatcher.close()
        ledger.close()
        context.term()
