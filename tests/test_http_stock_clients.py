"""DISTL's stock clients, their own modules from the peer venv, against a real service on 127.0.0.1: the liveness
probe, the clients that push a frame's pixels beside its filename (pilatus_client, adsc_client), thin_client's
FRAME and EXIT; and what a 100 MB upload costs the service.

The clients are Python 2 code: they get stand-ins for what they import and Python 3 lacks or cannot run here
(``httplib``, ``six.moves``, libtbx's Timer, cctbx's ``quick_image``, which needs dxtbx), written below.  Their
own functions, and the stock multipart encoder they post with, run unchanged.
"""
from __future__ import annotations

import http.client
import importlib.util
import os
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

from http_helpers import data_root_service, legacy_url, make_data_root, request
from service_helpers import ServiceProcess
from shared_data import PEER_VENV, PROBE, STOCK_CLIENTS
from spotfinder_core.image import read_bytes, read_frame

PROBE_ADDRESS = "localhost:8125"  # where mp_spotfinder_server_is_alive.py sends its probe, fixed in its code
UPLOAD_BYTES = 100 << 20
MiB = 1 << 20

pytestmark = pytest.mark.skipif(STOCK_CLIENTS is None, reason="DISTL's stock clients live in the peer venv %s "
                                "(set DISTL_PEER_VENV); not found" % PEER_VENV)


class Python2Connection(http.client.HTTPConnection):
    """Python 2's ``httplib.HTTPConnection`` as the stock clients call it: one "host:port" string, ``strict``,
    str data sent as the bytes Python 2 sent.  The probe's fixed address is taken to the test's service, and
    every reply is recorded (the clients print bytes, which Python 3 shows as their repr)."""

    routes: dict[str, str] = {}
    replies: list[tuple[int, bytes]] = []

    def __init__(self, host: str, strict: bool | None = None):
        super().__init__(self.routes.get(host, host), timeout=120)

    def send(self, data) -> None:
        super().send(data.encode("latin-1") if isinstance(data, str) else data)

    def getresponse(self) -> types.SimpleNamespace:
        response = super().getresponse()
        body = response.read()
        self.replies.append((response.status, body))
        return types.SimpleNamespace(status=response.status, reason=response.reason, read=lambda: body,
                                     close=response.close)


class Pixels:
    """cctbx's flex.int of the frame's pixels: its size, and a slice as Python 2's byte string."""

    def __init__(self, pixels):
        self.pixels = pixels.ravel().astype("<i4")

    def size(self) -> int:
        return self.pixels.size

    def slice_to_byte_str(self, start: int, stop: int) -> str:
        return self.pixels[start:stop].tobytes().decode("latin-1")


class QuickImage:
    """cctbx's ``quick_image``, with what the pushing clients read of it, from this project's frame reader."""

    def __init__(self, path: str):
        self.filename = path

    def set_beam_center_convention(self, convention: int) -> None:
        self.beam_center_convention = convention

    def read(self) -> None:
        frame, raw = read_frame(self.filename), read_bytes(self.filename)
        g = frame.geometry
        self.vendortype = g.vendortype
        self.beam_center_reference_frame = "instrument"
        self.header = raw[:raw.find(b"--CIF-BINARY-FORMAT-SECTION--")].decode("latin-1")
        self.parameters = {"DISTANCE": g.distance, "PHI": 0.0, "WAVELENGTH": g.wavelength, "TWOTHETA": g.twotheta,
                           "OSC_RANGE": 0.0, "CCD_IMAGE_SATURATION": g.saturation, "OSC_START": 0.0,
                           "DETECTOR_SN": "unknown", "PIXEL_SIZE": g.pixel_size, "SIZE1": g.size_slow,
                           "SIZE2": g.size_fast, "BEAM_CENTER_X": g.beam_x, "BEAM_CENTER_Y": g.beam_y}
        self.linearintdata = Pixels(frame.pixels)


def stand_ins() -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in (
        "httplib", "six", "six.moves", "libtbx", "libtbx.development", "libtbx.development.timers",
        "spotfinder", "spotfinder.servers", "spotfinder.diffraction", "spotfinder.diffraction.imagefiles")}
    modules["httplib"].HTTPConnection = Python2Connection
    modules["six.moves"].range = range
    modules["libtbx.development.timers"].Timer = lambda label: None
    modules["spotfinder.diffraction.imagefiles"].quick_image = QuickImage
    return modules


def load_stock(name: str, patch: pytest.MonkeyPatch) -> types.ModuleType:
    """The stock module ``spotfinder.servers.<name>`` from the peer venv, executed as it is."""
    spec = importlib.util.spec_from_file_location("spotfinder.servers." + name, STOCK_CLIENTS / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    patch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stock():
    """The stand-ins and the stock modules in sys.modules, for this module's tests only."""
    with pytest.MonkeyPatch.context() as patch:
        for name, module in stand_ins().items():
            patch.setitem(sys.modules, name, module)
        load_stock("multipart_encoder", patch)
        yield types.SimpleNamespace(**{name: load_stock(name, patch)
                                       for name in ("thin_client", "pilatus_client", "adsc_client")})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("stock"))


@pytest.fixture(scope="module")
def service(data):
    with data_root_service(data) as running:
        yield running


def last_reply() -> tuple[int, bytes]:
    return Python2Connection.replies[-1]


def thin_client_reply(stock, frame: Path, port: int) -> tuple[int, bytes]:
    stock.thin_client.get_spotfinder_url(str(frame), "127.0.0.1", port)
    return last_reply()


def test_the_liveness_probe_gets_200_at_once(stock, service, monkeypatch, capsys):
    monkeypatch.setitem(Python2Connection.routes, PROBE_ADDRESS, "127.0.0.1:%d" % service.http_port)
    load_stock("mp_spotfinder_server_is_alive", monkeypatch)  # probes on import, as the script does when run
    assert capsys.readouterr().out == "200 OK\n"
    assert last_reply() == (200, b"")


def test_thin_client_gets_distl_short_reply(stock, service, data):
    status, body = thin_client_reply(stock, data / "raster_1_0319.cbf", service.http_port)
    assert status == 200 and body == (PROBE / "resp_post.txt").read_bytes().replace(b"<DIR>", bytes(data))


@pytest.mark.parametrize("client, frame", [("pilatus_client", "omega_scan.cbf"),  # 300K: 1.2 MB of pixels
                                           ("pilatus_client", "thau_3_2_0016.cbf"),  # 6M: 25 MB
                                           ("adsc_client", "omega_scan.cbf")])
def test_clients_pushing_pixels_get_the_same_reply_as_thin_client(stock, service, data, client, frame):
    image = getattr(stock, client).get_labelit_image_object(str(data / frame), 0)
    getattr(stock, client).get_spotfinder_url(image, "127.0.0.1", service.http_port)
    pushed = last_reply()
    assert pushed[0] == 200 and pushed[1].startswith(b"Image: %s\n" % bytes(data / frame)), pushed
    assert pushed == thin_client_reply(stock, data / frame, service.http_port)


def test_a_100_mb_upload_is_streamed_past_not_kept(stock, service, data):
    """An EIGER 16M's worth of pushed pixels: the reply is thin_client's, and the service's peak resident
    memory (VmHWM) stays within a few MiB of its resident memory before the upload."""
    boundary = "upload-boundary"
    head = ("--{0}\r\nContent-Disposition: form-data; name=\"filename\"\r\n\r\n{1}\r\n--{0}\r\n"
            "Content-Disposition: form-data; name=\"adsc_data\"; filename=\"{1}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").format(boundary, data / "omega_scan.cbf").encode()
    tail = ("\r\n--%s--\r\n" % boundary).encode()
    chunk = os.urandom(MiB)

    def body():
        yield head
        for _ in range(UPLOAD_BYTES // MiB):
            yield chunk
        yield tail

    resident_before = memory(service.process.pid, "VmRSS")
    status, headers, reply = request(service.http_port, "POST", "/spotfinder", body(), {
        "Content-Type": "multipart/form-data; boundary=%s" % boundary,
        "Content-Length": str(len(head) + UPLOAD_BYTES + len(tail))})
    growth = memory(service.process.pid, "VmHWM") - resident_before  # a body held whole would add 100 MiB
    assert (status, headers["content-type"]) == (200, "text/plain")
    assert (status, reply) == thin_client_reply(stock, data / "omega_scan.cbf", service.http_port)
    assert growth < 16 * MiB, "the service's peak memory grew by %.1f MiB" % (growth / MiB)


def test_a_body_over_the_limit_gets_a_text_refusal(service):
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=10) as sock:  # headers only: refused
        sock.sendall(b"POST /spotfinder HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: %d\r\n\r\n" % ((256 << 20) + 1))
        reply = sock.makefile("rb").read()  # until the service closes
    assert reply.startswith(b"HTTP/1.1 413 ") and b"Content-Type: text/plain\r\n" in reply
    assert reply.endswith(b"\r\n\r\nSorry: request body larger than 268435456 bytes\n"), reply


def test_a_malformed_value_gets_sorry_text(service, data):
    status, headers, body = request(service.http_port, "GET", legacy_url(
        {"distl.image": str(data / "omega_scan.cbf"), "distl.res.outer": "abc"}))
    assert (status, headers["content-type"]) == (400, "text/plain")
    assert body.startswith(b"Sorry: Bad value for distl.res.outer") and body.endswith(b"\n"), body


def test_thin_client_exit_stops_the_service(stock, tmp_path, monkeypatch):
    monkeypatch.setattr(Python2Connection, "replies", [])
    data = tmp_path / "data"
    (data / "watch").mkdir(parents=True)
    service = ServiceProcess(tmp_path, data / "watch", data_root=[str(data)]).start()
    try:  # the stock client posts EXIT until the connection fails: on a thread, in case it never does
        client = threading.Thread(target=stock.thin_client.get_spotfinder_url,
                                  args=("EXIT", "127.0.0.1", service.http_port), daemon=True)
        client.start()
        client.join(60)
        assert not client.is_alive(), "thin_client still posting EXIT after 60 s"
        assert service.wait(30) == 0
        assert (200, b"") in Python2Connection.replies
        assert b"EXIT received from 127.0.0.1" in service.log.read_bytes()
    finally:
        service.kill_group()


def memory(pid: int, field: str) -> int:
    """A memory figure of the process from /proc (VmRSS: resident now, VmHWM: its peak), in bytes."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no %s for pid %d" % (field, pid))
