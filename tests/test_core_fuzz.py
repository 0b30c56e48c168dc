"""Seeded fuzzing of analyse(): corrupted variants of a PILATUS 300K frame and odd parameter values.

Every case must come back as a Result, ok or an error with its cause: never an exception, never "internal
error" or "out of memory", each within CASE_SECONDS.  The corpus is made from the real blank PILATUS 300K
frame when the shared data is present, and from a simulated 300K frame with spots always (so the spot,
resolution and heuristics stages see the odd values too).  The cases run in a child process under a memory
limit, so that a hang or a runaway allocation fails the test instead of the machine.
"""
from __future__ import annotations

import bz2
import gzip
import json
import random
import re
import subprocess
import sys

import pytest

from shared_data import REAL
from spotfinder_core.simulate import Scene, random_spots, write_cbf

SEED = 13
FILE_CASES = 600
CASE_SECONDS = 5.0
MEMORY_LIMIT = 4 << 30
HEADER_FIELDS = ("Pixel_size", "Count_cutoff", "Wavelength", "Detector_distance", "Beam_xy", "Detector_2theta")
MIME_FIELDS = ("X-Binary-Size", "X-Binary-Size-Fastest-Dimension", "X-Binary-Size-Second-Dimension",
               "X-Binary-Number-of-Elements", "Content-MD5", "Content-Type", "X-Binary-Element-Type")
ODD_VALUES = ("-1", "0", "-0", "1e-300", "1e308", "-1e308", "1e30", "nan", "inf", "-inf", "abc", "", "9" * 40,
              "9223372036854775808", "-9223372036854775809", "2147483648", "0x10", "1,5", "(1, 2)", "1e-6")
ODD_PARAMETERS = (
    [], ["distl.bins.verbose=True"], ["distl.verbose=True", "distl.res.outer=4.9"],
    ["distl.bins.N=1", "distl.bins.verbose=True"], ["distl.bins.N=1000000", "distl.bins.verbose=True"],
    ["distl.bins.corner=False", "distl.bins.verbose=True"],
    ["distl.res.outer=0.001"], ["distl.res.outer=1000"], ["distl.res.inner=0.000001"], ["distl.res.inner=1e9"],
    ["distl.res.inner=1e9", "distl.bins.verbose=True"], ["distl.scanbox_windows=10,10,10"],
    ["distl.scanbox_windows=100000,100000,100000"], ["distl.peripheral_margin=0"], ["distl.peripheral_margin=300"],
    ["distl.peripheral_margin=1000000000"], ["distl.minimum_spot_area=1"], ["distl.minimum_spot_area=1000000000"],
    ["distl.minimum_signal_height=0.000001"], ["distl.minimum_signal_height=1e9"],
    ["distl.minimum_spot_height=0.000001"], ["distl.spot_area_maximum_factor=0.000001"],
    ["distl.spot_area_maximum_factor=1e9"], ["distl.peak_intensity_maximum_factor=-1"],
    ["distl.peak_intensity_maximum_factor=0"], ["distl.method2_cutoff_percentage=0.000001"],
    ["distl.method2_cutoff_percentage=1e9"], ["distl.compactness_filter=True"],
    ["autoindex_override_beam=0,0", "distl.bins.verbose=True"], ["autoindex_override_beam=-50,-50"],
    ["autoindex_override_beam=1e9,1e9"], ["autoindex_override_distance=0"], ["autoindex_override_distance=-1"],
    ["autoindex_override_distance=1e9"], ["autoindex_override_wavelength=0"],
    ["autoindex_override_wavelength=1e-9"], ["autoindex_override_twotheta=90", "distl.bins.verbose=True"],
    ["autoindex_override_twotheta=1e300"], ["codecamp.maxcell=-1"], ["distl_minimum_number_spots_for_indexing=0"],
    ["distl_minimum_number_spots_for_indexing=-7"], ["overlapping_spot_criterion=0"],
    ["overlapping_spot_criterion=-1"], ["distl_profile_bumpiness=-1"], ["distl_lowres_limit=0.000001"],
)

RUNNER = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (%d, %d))
from spotfinder_core import ParameterError, analyse, parse_words
for case in json.load(sys.stdin):
    start = time.perf_counter()
    try:
        params = parse_words(case["words"])
    except ParameterError as exc:
        out = {"status": "refused", "error": str(exc)}
    else:
        out = analyse(case["path"], params, verify_md5=case["verify_md5"]).as_dict()
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out), flush=True)
""" % (MEMORY_LIMIT, MEMORY_LIMIT)


def _header_variant(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A header line of the frame deleted, duplicated or given an odd value."""
    field = rng.choice(HEADER_FIELDS)
    line = re.search(rb"# %s[^\r\n]*" % field.encode(), data)
    if line is None:
        return data, "no %s" % field
    head, tail = data[:line.start()], data[line.end():]
    how = rng.choice(("delete", "duplicate", "value", "value", "value", "units"))
    if how == "delete":
        return head + tail, "%s deleted" % field
    value = rng.choice(ODD_VALUES)
    if how == "duplicate":
        return head + b"# %s %s\r\n" % (field.encode(), value.encode()) + line.group() + tail, \
            "%s duplicated as %r first" % (field, value)
    if how == "units":
        text = re.sub(rb"\b(m|A|counts|pixels|deg\.)", rng.choice((b"km", b"", b"mm", b"px")), line.group(), count=1)
        return head + text + tail, "%s units changed" % field
    if field == "Beam_xy":
        other = rng.choice(("243.5", value))
        return head + b"# Beam_xy (%s, %s) pixels" % (value.encode(), other.encode()) + tail, \
            "Beam_xy (%s, %s)" % (value, other)
    words = line.group().split(b" ")
    words[2] = value.encode()
    return head + b" ".join(words) + tail, "%s %r" % (field, value)


def _mime_variant(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A line of the binary section's MIME header deleted, duplicated, or given an odd or nearby value."""
    field = rng.choice(MIME_FIELDS)
    line = re.search(rb"(?m)^%s:[^\r\n]*" % field.encode(), data[:data.find(b"\x0c\x1a\x04\xd5")])
    if line is None:
        return data, "no %s" % field
    head, tail = data[:line.start()], data[line.end():]
    how = rng.choice(("delete", "duplicate", "value", "value", "nearby"))
    if how == "delete":
        return head + tail, "%s deleted" % field
    value = rng.choice(ODD_VALUES)
    if how == "nearby":
        number = re.search(rb"\d+", line.group())
        value = str(int(number.group()) + rng.choice((-1, 1, 7, -487))) if number else value
    text = b"%s: %s" % (field.encode(), value.encode())
    if how == "duplicate":
        return head + text + b"\r\n" + line.group() + tail, "%s duplicated as %r first" % (field, value)
    return head + text + tail, "%s: %r" % (field, value)


def _binary_variant(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """The frame cut short, or bits flipped (in the header or the pixels)."""
    if not data:
        return data, "empty"
    if rng.random() < 0.4:
        cut = rng.randrange(len(data))
        return data[:cut], "truncated at %d" % cut
    flipped = bytearray(data)
    start = 0 if rng.random() < 0.3 else max(0, data.find(b"\x0c\x1a\x04\xd5"))
    for _ in range(rng.choice((1, 8, 200))):
        flipped[rng.randrange(start, len(data))] ^= 1 << rng.randrange(8)
    return bytes(flipped), "bits flipped from %d" % start


def _size_variant(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """The dimensions of a 300K changed in the MIME header (swapped, off by a few, one a line), with the
    number of elements changed to match or not."""
    fast, slow = 487, 619  # a PILATUS 300K's
    new_fast, new_slow = rng.choice(((slow, fast), (fast + 1, slow), (fast, slow - 1), (fast * 2, slow // 2),
                                     (1, fast * slow), (fast * slow, 1)))
    data = re.sub(rb"X-Binary-Size-Fastest-Dimension: \d+", b"X-Binary-Size-Fastest-Dimension: %d" % new_fast, data)
    data = re.sub(rb"X-Binary-Size-Second-Dimension: \d+", b"X-Binary-Size-Second-Dimension: %d" % new_slow, data)
    if rng.random() < 0.5:
        data = re.sub(rb"X-Binary-Number-of-Elements: \d+", b"X-Binary-Number-of-Elements: %d" % (new_fast * new_slow),
                      data)
    return data, "dimensions %dx%d" % (new_fast, new_slow)


MUTATIONS = (_header_variant, _header_variant, _header_variant, _mime_variant, _mime_variant, _binary_variant,
             _size_variant)


def _base_frames(tmp_path) -> list[bytes]:
    simulated = Scene(seed=31)
    simulated.spots = random_spots(simulated, 60)
    simulated.ice_ring_d, simulated.ice_ring_counts = 3.67, 30.0
    path = tmp_path / "base_0001.cbf"
    write_cbf(str(path), simulated)
    frames = [path.read_bytes()]
    real = REAL / "blank_dls_i19_pilatus_300k" / "omega_scan.cbf"
    if real.exists():
        frames.append(real.read_bytes())
    return frames


def _corpus(tmp_path) -> list[dict]:
    """Cases as {"path", "words", "verify_md5", "what"}: mutated files, then the good frames under odd
    parameters."""
    rng = random.Random(SEED)
    bases = _base_frames(tmp_path)
    cases = []
    for number in range(FILE_CASES):
        data = rng.choice(bases)
        whats = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            data, what = rng.choice(MUTATIONS)(rng, data)
            whats.append(what)
        suffix = rng.choice((".cbf",) * 6 + (".cbf.gz", ".cbf.bz2"))
        if suffix == ".cbf.gz":
            data = gzip.compress(data, compresslevel=1)
        elif suffix == ".cbf.bz2":
            data = bz2.compress(data, compresslevel=1)
        if suffix != ".cbf" and rng.random() < 0.25:
            data = data[:rng.randrange(len(data))]
            whats.append("compressed stream truncated")
        path = tmp_path / ("fuzz_%04d%s" % (number, suffix))
        path.write_bytes(data)
        words = rng.choice((["distl.bins.verbose=True"], [], [], ["distl.verbose=True", "distl.res.outer=4.9"]))
        cases.append({"path": str(path), "words": words, "verify_md5": rng.random() < 0.6,
                      "what": "; ".join(whats) + (" " + " ".join(words) if words else "")})
    for base_number, data in enumerate(bases):
        path = tmp_path / ("good_%04d.cbf" % (base_number + 1))
        path.write_bytes(data)
        cases += [{"path": str(path), "words": words, "verify_md5": True, "what": " ".join(words)}
                  for words in ODD_PARAMETERS]
    return cases


def test_corrupted_frames_and_odd_parameters_are_each_answered(tmp_path):
    cases = _corpus(tmp_path)
    payload = json.dumps([{k: case[k] for k in ("path", "words", "verify_md5")} for case in cases])
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=payload, capture_output=True, text=True, timeout=110)
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    if len(answers) < len(cases):
        case = cases[len(answers)]
        pytest.fail("the runner died on %s (%s): %s" % (case["path"], case["what"], proc.stderr[-2000:]))
    failures = []
    for case, answer in zip(cases, answers):
        error = answer.get("error") or ""
        if answer["status"] not in ("ok", "error", "refused") or (answer["status"] != "ok" and not error) \
                or "internal error" in error or "out of memory" in error or "\n" in error \
                or answer["seconds"] > CASE_SECONDS:
            failures.append("%s (%s): %s %r in %.1f s" % (case["path"].rsplit("/", 1)[-1], case["what"],
                                                          answer["status"], error, answer["seconds"]))
    assert not failures, "%d of %d cases failed:\n%s" % (len(failures), len(cases), "\n".join(failures))
