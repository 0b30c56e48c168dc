"""On-demand queries against real running services on 127.0.0.1: DISTL's legacy URLs byte for byte, its
POST protocol, the JSON API, the path checks, the old way of starting and stopping, and /metrics."""
from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from http_helpers import (FRAMES, PROBE, SETS, LegacyServer, data_root_service, legacy_url, make_data_root, reference,
                          request)
from service_helpers import child_env, entry_point_command

THIN_CLIENT = entry_point_command("distl_thin_client")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("ondemand"))


@pytest.fixture(scope="module")
def service(data):
    """``spotfinder serve`` with 2 workers, no start-up parameters, the data folder as its data root."""
    with data_root_service(data) as running:
        yield running


def get(service, query) -> tuple[int, dict, bytes]:
    return request(service.http_port, "GET", legacy_url(query))


def test_legacy_get_is_byte_identical_to_distl(service, data):
    cases = [(name, set_name) for _, name in FRAMES for set_name in SETS]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda case: get(service, {"distl.image": str(data / case[0]), **SETS[case[1]]}),
                                cases))
    for (name, set_name), (status, headers, body) in zip(cases, replies):
        assert status == 200 and headers["content-type"] == "text/plain", (name, set_name, status)
        assert body == reference(name, set_name, data), "%s %s differs from DISTL's reply" % (name, set_name)
    # the stock server's own captured reply (peer/probe/resp_get.txt), headers included
    status, headers, body = get(service, {"distl.image": str(data / "raster_1_0319.cbf"), **SETS["res4.9_bins"]})
    assert body == (PROBE / "resp_get.txt").read_bytes().replace(b"<DIR>", str(data).encode())
    assert headers["content-length"] == str(len(body))


def test_unique_suffixes_and_the_first_of_repeated_keys(service, data):
    expected = reference("omega_scan.cbf", "res4.9_bins", data)
    short = [("image", str(data / "omega_scan.cbf")), ("outer", "4.9"), ("bins.verbose", "true")]
    assert get(service, short)[2] == expected
    repeated = [("distl.image", str(data / "omega_scan.cbf")), ("distl.res.outer", "4.9"), ("distl.res.outer", "3.0"),
                ("distl.bins.verbose", "True"), ("distl.bins.verbose", "False")]
    assert get(service, repeated)[2] == expected
    os.symlink(data / "omega_scan.cbf", data / "watch" / "link_0001.cbf")  # a symlink inside the roots is fine
    status, _, body = get(service, {"image": str(data / "watch" / "link_0001.cbf")})
    assert status == 200 and b"File : link_0001.cbf" in body


def test_legacy_errors_keep_distl_texts(service, data, tmp_path):
    outside = tmp_path / "secret_0001.cbf"
    outside.write_bytes((data / "omega_scan.cbf").read_bytes())
    os.symlink(outside, data / "escape_0001.cbf")
    frame = str(data / "omega_scan.cbf")
    cases = [
        ({"distl.image": frame, "verbose": "True"}, 200, b"Unknown file or keyword: verbose=True"),
        ({"distl.image": frame, "distl.res.outr": "2"}, 200, b"Unknown file or keyword: distl.res.outr=2"),
        ({"distl.image": str(data / "missing_0001.cbf")}, 200,
         b"%s/missing_0001.cbf is not a readable file" % bytes(data)),
        # outside the roots: the same text whether the file exists or not, so nothing leaks
        ({"distl.image": str(outside)}, 200, b"%s is not a readable file" % bytes(outside)),
        ({"distl.image": str(tmp_path / "none.cbf")}, 200, b"%s/none.cbf is not a readable file" % bytes(tmp_path)),
        ({"distl.image": "%s/../%s/secret_0001.cbf" % (data, tmp_path.name)}, 200, b"is not a readable file"),
        ({"distl.image": str(data / "escape_0001.cbf")}, 200, b"escape_0001.cbf is not a readable file"),
        ({"distl.image": str(data / "watch")}, 200, b"watch is not a readable file"),
        # the old server dropped the connection on these
        ({"distl.res.outer": "4.9"}, 400, b"Missing distl.image"),
        ({"distl.image": frame, "distl.res.outer": "abc"}, 400, b"Bad value for distl.res.outer"),
    ]
    for query, status, text in cases:
        got_status, headers, body = get(service, query)
        assert (got_status, headers["content-type"]) == (status, "text/plain"), query
        assert text in body, (query, body)
    assert get(service, cases[0][0])[2] == b"Unknown file or keyword: verbose=True"  # no newline, as DISTL


def test_json_api_has_status_codes(service, data, tmp_path):
    port = service.http_port
    legacy = get(service, {"distl.image": str(data / "thau_3_2_0016.cbf")})[2].decode()
    status, headers, body = request(port, "GET", "/api/v1/analyse?image=%s" % (data / "thau_3_2_0016.cbf"))
    result = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json" and result["status"] == "ok"
    assert "Spot Total : %6d" % result["spot_total"] in legacy
    assert "Method 1 Resolution : %6.2f" % result["method1_resolution"] in legacy
    same = request(port, "GET", legacy_url({"distl.image": str(data / "thau_3_2_0016.cbf"), "format": "json"}))
    assert json.loads(same[2])["spot_total"] == result["spot_total"]
    overridden = json.loads(request(port, "GET", "/api/v1/analyse?image=%s&res.outer=4.9"
                                    % (data / "thau_3_2_0001.cbf"))[2])
    assert (overridden["method2_resolution"], overridden["in_resolution_total"]) == (4.9, 63)
    (tmp_path / "x_0001.cbf").write_bytes(b"")
    for target, code in [("/api/v1/analyse?image=%s&verbose=True" % (data / "omega_scan.cbf"), 400),
                         ("/api/v1/analyse?image=%s&outer=abc" % (data / "omega_scan.cbf"), 400),
                         ("/api/v1/analyse?outer=2", 400),
                         ("/api/v1/analyse?image=%s" % (tmp_path / "x_0001.cbf"), 403),
                         ("/api/v1/analyse?image=%s" % (data / "nothing_0001.cbf"), 404),
                         ("/no/such?format=json", 400)]:
        status, headers, body = request(port, "GET", target)
        assert status == code and "error" in json.loads(body), (target, status, body)


def test_thin_client_post_gives_distl_short_format(service, data):
    run = subprocess.run(THIN_CLIENT + ["raster_1_0319.cbf", "127.0.0.1", str(service.http_port)], cwd=data,
                         capture_output=True, env=child_env(), timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (PROBE / "resp_post.txt").read_bytes().replace(b"<DIR>", str(data).encode())
    missing = subprocess.run(THIN_CLIENT + ["nothing_0001.cbf", "127.0.0.1", str(service.http_port)], cwd=data,
                             capture_output=True, env=child_env(), timeout=60)
    assert missing.stdout == b"%s/nothing_0001.cbf is not a readable file" % bytes(data)


def test_metrics_count_requests_frames_and_queue(service):
    status, headers, body = request(service.http_port, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"] == CONTENT_TYPE_LATEST
    assert 'spotfinder_http_requests_total{route="legacy_get",status="200"}' in text
    assert 'spotfinder_frames_total{lane="ondemand",outcome="ok"}' in text
    assert 'spotfinder_frame_seconds_bucket{lane="ondemand",le="+Inf"}' in text
    assert "spotfinder_ondemand_queue_depth 0.0" in text
    assert "spotfinder_workers_alive 2.0" in text


def test_the_old_way_start_up_parameters_are_defaults_and_exit_stops_it(data, tmp_path):
    server = LegacyServer(tmp_path, data, "distl.res.outer=4.9", "distl.bins.verbose=True")
    try:
        port = server.port
        frame = "l-cyst_01_00004.cbf"  # relative: taken from the server's working folder, as DISTL did
        assert request(port, "GET", legacy_url({"distl.image": frame}))[2] == reference(frame, "res4.9_bins", data)
        assert request(port, "GET", legacy_url({"distl.image": frame, "outer": "None"}))[2] == \
            reference(frame, "bins", data)
        assert request(port, "GET", legacy_url({"distl.image": frame, "outer": "None", "bins.verbose": "False"}))[2] \
            == reference(frame, "default", data)
        # DISTL's POST path ignores distl.res.outer (a quirk kept): same short reply as a plain service's
        post = subprocess.run(THIN_CLIENT + ["raster_1_0319.cbf", "127.0.0.1", str(port)], cwd=data,
                              capture_output=True, env=child_env(), timeout=60)
        assert post.stdout == (PROBE / "resp_post.txt").read_bytes().replace(b"<DIR>", str(data).encode())
        stop = subprocess.run(THIN_CLIENT + ["EXIT", "127.0.0.1", str(port)], capture_output=True, env=child_env(),
                              timeout=90)
        assert stop.returncode == 0 and stop.stdout == b"", stop.stderr
        assert server.process.wait(30) == 0
        assert b"EXIT received from 127.0.0.1" in server.log.read_bytes()
    finally:
        server.kill()
