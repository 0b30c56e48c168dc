"""GET /spotfinder/distl.signal_strength_bcsb byte for byte against the real DISTL: cctbx's own Apache BCSB
module runs in the peer venv on the same frames, and a real service answers the same queries."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from http_helpers import data_root_service, make_data_root, request
from service_helpers import child_env
from shared_data import PEER_PYTHON, PEER_SHIM, need, need_peer

# cctbx's module as Apache ran it; what DISTL prints goes to stdout (Apache's log), only the returned XML is the reply
PEER_RUN = """
import contextlib, io, json, sys
from spotfinder.servers.apache_bcsb import run
replies = []
for query in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        replies.append(run(dict(query)))
json.dump(replies, sys.stdout)
"""
THAUMATIN, BLANK = "thau_3_2_0001.cbf", "omega_scan.cbf"  # a 6M frame with spots, a blank 300K frame
# (id, the image key, the frame in the data root, the other query words); bins.verbose adds mean_isigi/integrated
CASES = (
    ("6m-default", "distl.image", THAUMATIN, []),
    ("6m-outer", "distl.image", THAUMATIN, [("distl.res.outer", "4.9")]),
    ("6m-bins", "distl.image", THAUMATIN, [("distl.bins.verbose", "True")]),
    ("6m-outer-bins", "distl.image", THAUMATIN, [("distl.res.outer", "4.9"), ("distl.bins.verbose", "True")]),
    ("300k-default", "distl.image", BLANK, []),
    ("300k-outer", "distl.image", BLANK, [("distl.res.outer", "4.9")]),
    ("300k-short-keys", "image", BLANK, [("verbose", "True"), ("outer", "4.9")]),
    ("missing-file", "distl.image", "missing_0001.cbf", []),
    ("no-image", None, None, [("distl.res.outer", "4.9")]),
)


def queries(data: Path) -> list[list[tuple[str, str]]]:
    """Each case's query words, with the frame's absolute path in the data root."""
    return [([(key, str(data / frame))] if key else []) + words for _, key, frame, words in CASES]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("bcsb"))


@pytest.fixture(scope="module")
def distl_replies(data) -> list[str]:
    """The replies of cctbx's apache_bcsb.run, in the order of CASES."""
    python = PEER_PYTHON
    need_peer()
    need(PEER_SHIM, what="the peer's dxtbx stand-in")
    done = subprocess.run([str(python), "-P", "-c", PEER_RUN, json.dumps(queries(data))], capture_output=True,
                          text=True, timeout=300, env=child_env(PYTHONPATH=str(PEER_SHIM)))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def service(data):
    with data_root_service(data) as running:
        yield running


@pytest.mark.parametrize("case", range(len(CASES)), ids=[case[0] for case in CASES])
def test_bcsb_reply_is_byte_identical_to_distl(distl_replies, service, data, case):
    target = "/spotfinder/distl.signal_strength_bcsb?" + urlencode(queries(data)[case], quote_via=quote)
    status, headers, body = request(service.http_port, "GET", target)
    assert status == 200 and headers["content-type"] == "text/plain", (status, headers)
    assert body.decode() == distl_replies[case]
