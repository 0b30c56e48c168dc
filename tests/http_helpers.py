"""Helpers for the on-demand HTTP tests: a data root of real frames, DISTL's reference texts, raw requests."""
from __future__ import annotations

import bz2
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote, urlencode

from service_helpers import ServiceProcess, child_env, entry_point_command, free_port, wait_for
from shared_data import PROBE, REAL, REFERENCE, need
# (folder under data/real, frame): a 6M thaumatin frame stored compressed and one stored plain, a 2M and a 300K
FRAMES = (("thaumatin_grid_dls_i24_pilatus3_6m", "thau_3_2_0001.cbf"),
          ("thaumatin_grid_dls_i24_pilatus3_6m", "thau_3_2_0016.cbf"),
          ("l_cysteine_dls_i19_pilatus_2m", "l-cyst_01_00004.cbf"),
          ("blank_dls_i19_pilatus_300k", "omega_scan.cbf"))
SETS = {"default": {}, "res4.9_bins": {"distl.res.outer": "4.9", "distl.bins.verbose": "True"},
        "bins": {"distl.bins.verbose": "True"}}


def make_data_root(root: Path) -> Path:
    """``root/data`` holding plain copies of FRAMES and the probe's raster_1_0319.cbf; skipped without ../shared."""
    need(REAL, REFERENCE, PROBE / "raster_1_0319.cbf", what="real frames, DISTL references and probe replies")
    data = root / "data"
    (data / "watch").mkdir(parents=True)
    for folder, name in FRAMES:
        plain, packed = REAL / folder / name, REAL / folder / (name + ".bz2")
        if packed.is_file():  # DISTL's references were made from the decompressed frame
            with bz2.open(packed, "rb") as src, open(data / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(plain, data / name)
    shutil.copyfile(PROBE / "raster_1_0319.cbf", data / "raster_1_0319.cbf")
    return data


@contextlib.contextmanager
def data_root_service(data: Path, **settings):
    """``spotfinder serve`` (2 workers) with ``data`` as its data root, killed with its workers afterwards."""
    process = ServiceProcess(data.parent, data / "watch", data_root=[str(data)], **settings)
    try:
        yield process.start()
    finally:
        process.kill_group()


def reference(name: str, set_name: str, folder: Path) -> bytes:
    """DISTL's GET reply for a frame and parameter set, with ``<DIR>`` made the frame's folder."""
    return (REFERENCE / ("%s.%s.txt" % (name, set_name))).read_bytes().replace(b"<DIR>", str(folder).encode())


def request(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 90) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, target, body, headers or {})
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def legacy_url(query: dict | list) -> str:
    return "/spotfinder/distl.signal_strength?" + urlencode(query, quote_via=quote)


class LegacyServer:
    """``distl.mp_spotfinder_server_read_file`` as a process (its state under ``tmp``), started in ``cwd``."""

    def __init__(self, tmp: Path, cwd: Path, *words: str, processors: int = 2):
        self.port = free_port()
        self.log = tmp / "mp-server.log"
        command = entry_point_command("distl_mp_spotfinder_server_read_file", "distl.port=%d" % self.port,
                                     "distl.processors=%d" % processors, *words)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                            env=child_env(XDG_STATE_HOME=str(tmp / "state")),
                                            start_new_session=True)
        wait_for(lambda: self._workers() >= processors, 40, "the legacy server and its workers")

    def _workers(self) -> int:
        if self.process.poll() is not None:
            raise AssertionError("server exited with %s:\n%s" % (self.process.returncode, self.log.read_text()))
        try:
            return json.loads(request(self.port, "GET", "/status", timeout=5)[2])["workers_alive"]
        except OSError:
            return -1

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
