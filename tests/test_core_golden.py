"""Golden tests: our text and fields against the real DISTL's, on the shared real frames."""
from __future__ import annotations

import json

import pytest

from shared_data import REFERENCE
from spotfinder_core import analyse, parse_words
from spotfinder_core.report import format_body

SETS = {"default": [], "res4.9_bins": ["distl.res.outer=4.9", "distl.bins.verbose=True"],
        "bins": ["distl.bins.verbose=True"]}


@pytest.fixture(scope="module")
def outcomes(real_frames):
    """(frame, set) -> (our dict, our body, DISTL's summary record, DISTL's body)."""
    summary = {}
    for line in (REFERENCE / "summary.jsonl").read_text().splitlines():
        rec = json.loads(line)
        summary[(rec["frame"], rec["set"])] = rec
    out = {}
    for (frame, set_name), ref in summary.items():
        if set_name not in SETS or frame not in real_frames:
            continue
        path = real_frames[frame]
        result = analyse(str(path), parse_words(SETS[set_name]))
        body = format_body(result).replace(str(path.parent) + "/", "<DIR>/")
        expected = (REFERENCE / ("%s.%s.txt" % (frame, set_name))).read_text()
        out[(frame, set_name)] = (result.as_dict(), body, ref, expected)
    return out


def close(a, b, absolute, relative):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= max(absolute, relative * abs(b))


TOLERANCES = {"spot_total": (2, 0.02), "remove_ice": (2, 0.03), "in_resolution_total": (2, 0.03),
              "good_bragg_candidates": (3, 0.05), "ice_rings": (0, 0), "method1_resolution": (0.05, 0),
              "method2_resolution": (0.05, 0), "max_unit_cell": (0, 0.05)}


@pytest.mark.parametrize("field", sorted(TOLERANCES))
def test_field_agrees_on_at_least_90_percent(outcomes, field):
    absolute, relative = TOLERANCES[field]
    agree = sum(close(ours[field], ref.get(field), absolute, relative) for ours, _, ref, _ in outcomes.values())
    assert agree >= 0.9 * len(outcomes), "%s agrees on %d of %d" % (field, agree, len(outcomes))


def test_every_body_is_byte_identical(outcomes):
    """The core issue asks for half; we have all of them, and keep it that way."""
    differing = sorted(key for key, (_, body, _, expected) in outcomes.items() if body != expected)
    assert not differing, "%d of %d bodies differ: %s" % (len(differing), len(outcomes), differing)


@pytest.mark.parametrize("frame", ["thau_3_2_0001.cbf", "thau_3_2_0005.cbf", "thau_3_2_0016.cbf",
                                   "l-cyst_01_00004.cbf", "omega_scan.cbf", "ximg2700_00001.cbf"])
@pytest.mark.parametrize("set_name", sorted(SETS))
def test_body_is_byte_identical(outcomes, frame, set_name):
    _, body, _, expected = outcomes[(frame, set_name)]
    assert body == expected


PROBE = REFERENCE.parents[1] / "peer" / "probe"
PROBE_CASES = {  # captured CLI output name -> frame number and parameters
    "out_0319.txt": ("0319", []), "out_0319_bins.txt": ("0319", ["distl.bins.verbose=True"]),
    "out_0319_res4.9.txt": ("0319", ["distl.res.outer=4.9"]),
    "out_0319_verbose.txt": ("0319", ["distl.res.outer=4.9", "distl.verbose=True"]),
    "out_0320.txt": ("0320", []), "out_0321.txt": ("0321", []),
    "out_0322_bins.txt": ("0322", ["distl.bins.verbose=True"]),
}


@pytest.mark.parametrize("capture", sorted(PROBE_CASES))
def test_synthetic_probe_frames_match_the_captured_cli(capture):
    """The stock CLI's captured output on synthetic 6M frames (ice ring, blank, 3604 spots, spot listing)."""
    if not (PROBE / capture).exists():
        pytest.skip("DISTL's captured outputs live in ../shared/peer/probe; not present in this checkout")
    number, words = PROBE_CASES[capture]
    frame = PROBE / ("raster_1_%s.cbf" % number)
    text = (PROBE / capture).read_text().split("#phil __OFF__\n\n", 1)[1]
    expected = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("WALL_"))
    result = analyse(str(frame), parse_words(words))
    assert format_body(result).replace(str(frame.parent) + "/", "<DIR>/") == expected


@pytest.mark.parametrize("capture", sorted(PROBE_CASES))
def test_the_whole_cli_text_is_the_captured_one(capture, monkeypatch, capsys):
    """Banner, parameter echo (phil's empty scopes and float format included) and body, byte for byte."""
    from spotfinder_daemon.cli import distl_signal_strength

    if not (PROBE / capture).exists():
        pytest.skip("DISTL's captured outputs live in ../shared/peer/probe; not present in this checkout")
    number, words = PROBE_CASES[capture]
    expected = "".join(line for line in (PROBE / capture).read_text().splitlines(keepends=True)
                       if not line.startswith("WALL_"))
    monkeypatch.chdir(PROBE)  # the captures name the frame relative to it (and show its folder as <DIR>)
    assert distl_signal_strength(["raster_1_%s.cbf" % number, *words]) == 0
    assert capsys.readouterr().out.replace(str(PROBE) + "/", "<DIR>/") == expected
