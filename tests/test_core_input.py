"""Bad input: a clear one-line error, no traceback, nothing lost; and the parameter parser."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spotfinder_core import ParameterError, analyse, parse_words
from spotfinder_core.params import resolve_key
from service_helpers import entry_point_command, python_command


def run(*args):
    return subprocess.run(python_command(*args), capture_output=True, text=True, timeout=120)


def run_distl(*args):
    return subprocess.run(entry_point_command("distl_signal_strength", *args), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def bad_frames(simulated, tmp_path):
    data = simulated["paths"]["spots"].read_bytes()
    truncated = tmp_path / "truncated_0001.cbf"
    truncated.write_bytes(data[: len(data) // 2])
    not_cbf = tmp_path / "notes_0001.cbf"
    not_cbf.write_text("this is not a frame\n")
    no_distance = tmp_path / "nodist_0001.cbf"
    no_distance.write_bytes(data.replace(b"# Detector_distance", b"# Detector_elsewhere"))
    corrupt = tmp_path / "corrupt_0001.cbf"
    marker = data.index(b"\x0c\x1a\x04\xd5") + 4
    corrupt.write_bytes(data[:marker] + b"\x80" * 64 + data[marker + 64:])
    empty = tmp_path / "empty_0001.cbf"
    empty.write_bytes(b"")
    return {"truncated": truncated, "not_cbf": not_cbf, "no_distance": no_distance, "corrupt": corrupt,
            "empty": empty, "missing": tmp_path / "missing_0001.cbf"}


@pytest.mark.parametrize("kind,cause", [("truncated", "truncated"), ("not_cbf", "not a miniCBF"),
                                        ("no_distance", "Detector_distance"), ("corrupt", "Content-MD5"),
                                        ("empty", "empty"), ("missing", "no such file")])
def test_bad_frame_gives_error_result(bad_frames, kind, cause):
    result = analyse(str(bad_frames[kind]))
    assert result.status == "error"
    assert cause in result.error and "\n" not in result.error


def test_md5_check_can_be_turned_off(simulated, tmp_path):
    """A wrong Content-MD5 over good pixels is refused when checked, and analysed as the original when not."""
    import re

    data = simulated["paths"]["spots"].read_bytes()
    wrong = tmp_path / "wrongmd5_0001.cbf"
    wrong.write_bytes(re.sub(rb"Content-MD5: \S+", b"Content-MD5: AAAAAAAAAAAAAAAAAAAAAA==", data))
    assert "Content-MD5" in analyse(str(wrong)).error
    unchecked = analyse(str(wrong), verify_md5=False).as_dict()
    original = analyse(str(simulated["paths"]["spots"])).as_dict()
    assert unchecked["status"] == "ok"
    assert {k: v for k, v in unchecked.items() if k not in ("file", "proc_ms")} == \
        {k: v for k, v in original.items() if k not in ("file", "proc_ms")}


def test_a_content_md5_mismatch_is_the_cause_given_whatever_followed(simulated, tmp_path):
    """The check runs beside the decoding and the analysis (image.checked_frame): a corrupt section whose pixels
    then fail to decode is still reported by its Content-MD5, as when the check ran first; unchecked, the
    decoding's own cause is given."""
    from spotfinder_core.image import BINARY_MARKER, FrameError, read_frame

    data = bytearray(simulated["paths"]["spots"].read_bytes())
    start = data.index(BINARY_MARKER) + len(BINARY_MARKER)
    data[start + 100:start + 101] = b"\x80"  # an escape: the deltas after it are read as wider ones
    corrupt = tmp_path / "escaped_0001.cbf"
    corrupt.write_bytes(bytes(data))
    assert analyse(str(corrupt), verify_md5=False).error.startswith("corrupt binary section: decoded ")
    assert analyse(str(corrupt)).error == "corrupt binary section: Content-MD5 does not match"
    with pytest.raises(FrameError, match="Content-MD5 does not match"):
        read_frame(str(corrupt))


def test_cli_reports_bad_frame_in_one_line(bad_frames):
    proc = run_distl(str(bad_frames["truncated"]))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "truncated_0001.cbf" in proc.stderr


def test_find_goes_on_after_a_bad_frame(bad_frames, simulated):
    proc = run("find", "--json", str(bad_frames["not_cbf"]), str(simulated["paths"]["spots"]))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["status"] for r in records] == ["error", "ok"]
    assert records[1]["spot_total"] > 0


def test_find_table_output(simulated):
    proc = run("find", str(simulated["paths"]["spots"]), str(simulated["paths"]["blank"]))
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["frame", "spots", "in-res"]
    assert lines[1].startswith("spots_0001.cbf") and lines[2].startswith("blank_0001.cbf")


def test_unknown_and_malformed_parameters(simulated):
    proc = run_distl(str(simulated["paths"]["spots"]), "distl.nonsense=3")
    assert proc.returncode == 2 and "Unknown file or keyword: distl.nonsense=3" in proc.stderr
    proc = run_distl(str(simulated["paths"]["spots"]), "distl.res.outer=abc")
    assert proc.returncode == 2 and "distl.res.outer" in proc.stderr and "Traceback" not in proc.stderr


def test_key_matching_follows_distl():
    assert resolve_key("outer").path == "distl.res.outer"
    assert resolve_key("res.outer").path == "distl.res.outer"
    assert resolve_key("bins.verbose").path == "distl.bins.verbose"
    assert resolve_key("verbose").path == "distl.verbose"  # the home scope decides on the command line
    assert resolve_key("verbose", home_scope=None) is None  # ambiguous without it, as in DISTL's server
    assert resolve_key("no_such_thing") is None


def test_values_convert_like_distl():
    params = parse_words(["distl.res.outer=2*1.5", "bins.verbose=true", "scanbox_windows=51,51,51"])
    assert params["distl.res.outer"] == 3.0
    assert params["distl.bins.verbose"] is True
    assert params["distl.scanbox_windows"] == (51, 51, 51)
    with pytest.raises(ParameterError) as err:
        parse_words(["distl.scanbox_windows=5 5 5"])
    assert not err.value.unknown
    with pytest.raises(ParameterError) as err:
        parse_words(["verbose=True"], home_scope=None)
    assert err.value.unknown and str(err.value) == "Unknown file or keyword: verbose=True"


def test_byte_offset_decoder_handles_every_delta_width():
    import numpy as np
    from fabio.compression import compByteOffset

    from spotfinder_core.image import _byte_offset

    values = np.array([0, 5, -3, 127, -128, 200, -30000, 40000, 1046527, -2, 2**31 - 1, -2**31, 7, -1],
                      dtype=np.int32)
    stream = np.frombuffer(compByteOffset(values), dtype=np.int8)
    out = np.empty(values.size, dtype=np.int32)
    assert _byte_offset(stream, out) == values.size and np.array_equal(out, values)
    assert _byte_offset(stream[:-3], out) < values.size  # a cut stream says so


def test_byte_offset_decoder_runs_of_single_byte_deltas_meet_escapes_anywhere():
    """The decoder adds runs of single-byte deltas up to the next escape, a block at most: escapes as a
    block's first byte, its last, right after a full block and one past it, runs of every length around
    the block's, back-to-back escapes of every width (also wider than the delta needs, which the format
    allows), and a stream cut anywhere decode as written."""
    import struct

    import numpy as np

    from spotfinder_core.image import BLOCK, _byte_offset

    rng = np.random.default_rng(7)
    wide = ((300, 2), (-100000, 4), (50, 8), (-2, 2), (70000, 8))  # (delta, bytes) after an escape
    deltas, widths = [], []
    runs = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1, 0, 0, 0, 0, 5, 3 * BLOCK]
    for k, run in enumerate(runs):
        deltas += [int(d) for d in rng.integers(-100, 100, run)] + [wide[k % len(wide)][0]]
        widths += [1] * run + [wide[k % len(wide)][1]]
    stream = bytearray()
    for delta, width in zip(deltas, widths):
        if width > 1:
            stream += b"\x80" + struct.pack("<h", -2**15) * (width >= 4) + struct.pack("<i", -2**31) * (width == 8)
        stream += struct.pack({1: "<b", 2: "<h", 4: "<i", 8: "<q"}[width], delta)
    values = np.cumsum(deltas).astype(np.int32)
    stream = np.frombuffer(bytes(stream), dtype=np.int8)
    out = np.empty(values.size, dtype=np.int32)
    assert _byte_offset(stream, out) == values.size and np.array_equal(out, values)
    for cut in range(1, stream.size):
        decoded = _byte_offset(stream[:cut], out)
        assert decoded < values.size and np.array_equal(out[:decoded], values[:decoded])


BOUNDED_RUNNER = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from spotfinder_core import analyse
result = analyse(sys.argv[1]).as_dict()
print(json.dumps({"status": result["status"], "error": result["error"]}))
"""


def analysed_bounded(path) -> dict:
    """analyse() of a path in a child with 3 GiB of address space and 30 s: a hang or a
    runaway read fails the test instead of stalling it or the machine."""
    proc = subprocess.run([sys.executable, "-c", BOUNDED_RUNNER, str(path)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("suffix", [".cbf.gz", ".cbf.bz2"])
def test_a_decompression_bomb_is_refused_before_it_inflates(make_frame, tmp_path, suffix):
    """A good frame followed by 4 GiB of zeros, in a few MB: refused once past what its X-Binary-Size declares."""
    import bz2
    import gzip

    compress = gzip.compress if suffix == ".cbf.gz" else bz2.compress
    frame = make_frame(str(tmp_path / "frame_0001.cbf"))
    zeros = compress(bytes(64 << 20))  # concatenated members (streams) decompress as one
    bomb = tmp_path / ("bomb_0001" + suffix)
    bomb.write_bytes(compress(frame) + zeros * 64)
    assert bomb.stat().st_size < 8 << 20
    record = analysed_bounded(bomb)
    assert record["status"] == "error" and "decompresses beyond" in record["error"]


def test_what_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    """A FIFO hung the reader (and the watcher's completeness check) forever; /dev/zero filled the memory."""
    import os
    import socket

    fifo = tmp_path / "fifo_0001.cbf"
    os.mkfifo(fifo)
    zero = tmp_path / "zero_0001.cbf"
    zero.symlink_to("/dev/zero")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "socket_0001.cbf"))
    for path in (fifo, zero, tmp_path / "socket_0001.cbf", tmp_path):
        record = analysed_bounded(path)
        assert record["status"] == "error"
        assert record["error"] == ("is a directory, not a frame" if path == tmp_path else
                                   "not a regular file (a device, FIFO or socket)")
    listening.close()


def test_a_file_larger_than_any_frame_is_refused_unread(tmp_path):
    from spotfinder_core.image import MAX_FRAME_BYTES

    huge = tmp_path / "huge_0001.cbf"
    with open(huge, "wb") as fh:
        fh.truncate(MAX_FRAME_BYTES + 1)  # sparse: no disk used
    result = analyse(str(huge))
    assert result.status == "error" and "larger than any frame" in result.error


def test_a_symbolic_link_loop_is_named_as_such(tmp_path):
    (tmp_path / "loop_a_0001.cbf").symlink_to(tmp_path / "loop_b_0001.cbf")
    (tmp_path / "loop_b_0001.cbf").symlink_to(tmp_path / "loop_a_0001.cbf")
    result = analyse(str(tmp_path / "loop_a_0001.cbf"))
    assert result.status == "error" and result.error == "unreadable: symbolic link loop"
