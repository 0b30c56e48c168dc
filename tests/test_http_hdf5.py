"""Frames of EIGER HDF5 series over HTTP: ``distl.image=x_master.h5&distl.range=N`` on DISTL's legacy route gives
the CLI's text for that frame, ``image=...&frame=N`` on the JSON API its fields; a series written from the real
EIGER2 16M thermolysin frame gives what its CBF gives (and the CBF what the real DISTL gives); every bad frame
name, index or file is one clear error."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
import pytest

from spotfinder_core import analyse, nexus, read_frame
from http_helpers import legacy_url, reference, request
from service_helpers import ServiceProcess, child_env, entry_point_command
from shared_data import REFERENCE, need, real_files

THERMOLYSIN = "eiger2_16m_cbf_dls_thermolysin/dlsnxs2cbf_therm_0001.cbf.gz"
IGNORED = ("file", "image_number", "frame_index", "proc_ms")  # how a frame is named, and how long it took


def fields(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in IGNORED}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A data root with the thermolysin CBF, the HDF5 series ``therm`` of it and its counts doubled (one data
    file of 2 frames), a series whose data file is missing and one whose data file is truncated; the service."""
    (cbf,) = real_files((THERMOLYSIN,), "the thermolysin EIGER2 16M frame")
    need(REFERENCE / "dlsnxs2cbf_therm_0001.cbf.default.txt", what="the real DISTL's text on the thermolysin frame")
    tmp = tmp_path_factory.mktemp("hdf5-http")
    data = tmp / "data"
    (data / "watch").mkdir(parents=True)
    plain = data / "dlsnxs2cbf_therm_0001.cbf"
    with gzip.open(cbf) as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    pixels = read_frame(str(plain), verify_md5=False).pixels
    geometry = nexus.cbf_geometry(str(plain))
    frames = [pixels, np.where(pixels > 0, pixels * 2, pixels)]
    master = nexus.write_series(str(data), "therm", frames, nimages_per_file=2, geometry=geometry, dtype=np.uint32)
    small = [np.where(pixels[:512, :1028] > 0, 1, pixels[:512, :1028])] * 2
    missing = nexus.write_series(str(data), "missing", small, nimages_per_file=1, geometry=geometry)
    (data / "missing_data_000002.h5").unlink()
    truncated = nexus.write_series(str(data), "cut", small, nimages_per_file=2, geometry=geometry)
    whole = (data / "cut_data_000001.h5").read_bytes()
    (data / "cut_data_000001.h5").write_bytes(whole[:len(whole) // 2])
    service = ServiceProcess(tmp, data / "watch", data_root=[str(data)], frame_timeout_s=120.0)
    try:
        service.start()
        yield {"port": service.http_port, "cbf": plain, "master": Path(master), "missing": Path(missing),
               "cut": Path(truncated), "data": data}
    finally:
        service.kill_group()


def api(port: int, **query) -> tuple[int, dict]:
    status, _headers, body = request(port, "GET", "/api/v1/analyse?" + urlencode(query, quote_via=quote))
    return status, json.loads(body)


def legacy(port: int, **query) -> str:
    status, _headers, body = request(port, "GET", legacy_url(query))
    assert status == 200
    return body.decode()


def cli_text(master: Path, index: int) -> str:
    """``distl.signal_strength x_master.h5 distl.range=N``'s text after its parameter block."""
    done = subprocess.run(entry_point_command("distl_signal_strength", str(master), "distl.range=%d" % index),
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("#phil __OFF__\n\n", 1)[1]


def test_the_legacy_route_gives_the_cli_text_of_each_frame_and_the_real_distl_text_of_its_cbf(served):
    port, master = served["port"], served["master"]
    texts = [legacy(port, **{"distl.image": str(master), "distl.range": str(index)}) for index in (0, 1)]
    for index, text in enumerate(texts):
        assert text == cli_text(master, index)
    assert texts[0] != texts[1]
    cbf_text = legacy(port, **{"distl.image": str(served["cbf"])})
    assert cbf_text == reference("dlsnxs2cbf_therm_0001.cbf", "default", served["data"]).decode()
    # the HDF5 frame 0 and its CBF differ only in how DISTL names the frame: by its file (a name without a frame
    # number, which DISTL echoes first) and its index
    renamed = cbf_text.replace("File : dlsnxs2cbf_therm_0001.cbf", "File : therm_master.h5")
    renamed = renamed.replace("on image #1 within", "on image #0 within")
    assert texts[0] == "therm_master.h5\n" + renamed


def test_the_json_api_names_a_frame_by_index_and_gives_the_cbf_fields(served):
    port, master = served["port"], served["master"]
    status, first = api(port, image=str(master), frame="0")
    assert status == 200 and first["status"] == "ok" and first["frame_index"] == 0 and first["image_number"] == 1
    status, cbf = api(port, image=str(served["cbf"]))
    assert status == 200 and fields(first) == fields(cbf) and cbf["frame_index"] is None
    status, second = api(port, image=str(master), frame="1")
    assert status == 200 and second["frame_index"] == 1 and second["image_number"] == 2
    assert fields(second) == fields(analyse(str(master), index=1).as_dict())
    status, ranged = api(port, image=str(master), **{"distl.range": "1"})  # DISTL's name for it works too
    assert status == 200 and fields(ranged) == fields(second)


@pytest.mark.parametrize("query, code, message", [
    ({"frame": "2"}, 422, "frame index 2 is out of range: therm_master.h5 holds frames 0 to 1"),
    ({"frame": "-1"}, 400, "bad frame '-1': expected a frame number from 0"),
    ({"frame": "one"}, 400, "bad frame 'one'"),
    ({}, 422, "an HDF5 file of 2 frames needs a frame index"),
    ({"distl.range": "0,2"}, 400, "distl.range=0,2 names 2 frames; a query answers one"),
])
def test_bad_frame_indices_are_one_clear_error(served, query, code, message):
    status, body = api(served["port"], image=str(served["master"]), **query)
    assert status == code, body
    assert message in (body.get("error") or ""), body


def test_bad_hdf5_files_are_one_clear_error_on_both_routes(served):
    port = served["port"]
    cases = [(served["missing"], 1, "data file missing_data_000002.h5 of frame index 1 is missing"),
             (served["cut"], 0, "cut_data_000001.h5"),
             (served["cbf"], 0, "a frame index names a frame of an HDF5 file")]
    for path, index, message in cases:
        status, body = api(port, image=str(path), frame=str(index))
        assert status == 422 and message in body["error"] and body["frame_index"] == index, body
        text = legacy(port, **{"distl.image": str(path), "distl.range": str(index)})
        assert text.startswith("Sorry, can't process %s." % path) and message in text and "Traceback" not in text
    status, body = api(port, image=str(served["missing"]), frame="0")  # its other frame is there
    assert status == 200 and body["status"] == "ok"
    text = legacy(port, **{"distl.image": str(served["master"]), "distl.range": "5"})
    assert text.startswith("Sorry, can't process") and "frame index 5 is out of range" in text
    # DISTL's route knows DISTL's keys only: frame= is the JSON API's
    assert legacy(port, **{"distl.image": str(served["master"]), "frame": "0"}).startswith("Unknown")
