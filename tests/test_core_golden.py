"""Golden tests: our text and fields against the real DISTL's, on the shared real frames."""
from __future__ import annotations

import json

import pytest

from conftest import REFERENCE
from spotfinder import analyse, parse_words
from spotfinder.report import format_body

SETS = {"default": [], "res4.9_bins": ["distl.res.outer=4.9", "distl.bins.verbose=True"]}


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


def test_at_least_half_the_bodies_are_byte_identical(outcomes):
    identical = sum(body == expected for _, body, _, expected in outcomes.values())
    assert identical >= 0.5 * len(outcomes), "%d of %d identical" % (identical, len(outcomes))


@pytest.mark.parametrize("frame", ["thau_3_2_0001.cbf", "thau_3_2_0005.cbf", "thau_3_2_0016.cbf",
                                   "l-cyst_01_00004.cbf", "omega_scan.cbf"])
@pytest.mark.parametrize("set_name", sorted(SETS))
def test_body_is_byte_identical(outcomes, frame, set_name):
    _, body, _, expected = outcomes[(frame, set_name)]
    assert body == expected
