"""The analysis on simulated frames: what it must find, and what it must not."""
from __future__ import annotations

import math

import numpy as np

from spotfinder_core import analyse, parse_words, read_frame
from spotfinder_core.report import format_body


def test_spots_are_recovered_at_their_positions(simulated):
    result = analyse(str(simulated["paths"]["spots"]))
    assert result.status == "ok"
    truth = simulated["scenes"]["spots"].spots
    assert result.spot_total == len(truth)  # the saturated spot is screened out, as in DISTL
    assert result.good_bragg_candidates >= 0.9 * len(truth)
    assert result.image_number == 1 and result.file == "spots_0001.cbf"


def test_found_spots_sit_on_the_simulated_ones(simulated):
    from spotfinder_core import analysis, background, spots
    from spotfinder_core.params import Params, effective_settings

    frame = read_frame(str(simulated["paths"]["spots"]))
    settings = effective_settings(Params(), frame.geometry.family)
    region = background.Region.of(frame.geometry, settings.margin)
    cls = background.classify(frame.pixels, frame.geometry, settings, region, analysis.UNDERLOAD)
    maxima = spots.local_maxima(frame.pixels, cls.flags, region, settings, analysis.UNDERLOAD)
    found = spots.assemble(frame.pixels, cls, maxima, region, settings)
    truth = np.array([(x, y) for x, y, _ in simulated["scenes"]["spots"].spots])
    for x, y in zip(found.peak_x, found.peak_y):
        nearest = np.min(np.hypot(truth[:, 0] - x, truth[:, 1] - y))
        assert nearest <= 1.5 or frame.pixels[x, y] >= frame.geometry.saturation


def test_blank_frame_is_blank(simulated):
    result = analyse(str(simulated["paths"]["blank"]))
    assert result.spot_total == 0
    assert result.method2_resolution is None and result.max_unit_cell is None
    assert result.method1_resolution == 10.0
    body = format_body(result)
    assert " %Saturation, Top 0 Peaks :   0.00" in body
    assert "Remove Ice : None" in body


def test_ice_ring_is_detected(simulated):
    result = analyse(str(simulated["paths"]["ice"]))
    assert result.ice_rings >= 1
    scene = simulated["scenes"]["ice"]
    # spots on the ring are lost to it, the others survive
    assert 0.8 * len(scene.spots) <= result.spot_total <= len(scene.spots)


def test_res_outer_limits_method2_and_classification(simulated):
    path = str(simulated["paths"]["spots"])
    full = analyse(path)
    limited = analyse(path, parse_words(["distl.res.outer=4.0"]))
    assert limited.spot_total <= full.spot_total
    if limited.method2_resolution is not None:
        assert limited.method2_resolution >= 4.0


def test_result_dict_has_the_schema_fields(simulated):
    record = analyse(str(simulated["paths"]["spots"])).as_dict()
    for name in ("file", "image_number", "spot_total", "remove_ice", "in_resolution_total", "good_bragg_candidates",
                 "ice_rings", "method1_resolution", "method2_resolution", "max_unit_cell", "eccentricity",
                 "saturation_top_peaks", "saturation_percent", "overloaded_spots", "total_integrated_signal",
                 "focus_spots", "status", "error", "proc_ms"):
        assert name in record
    assert record["status"] == "ok" and record["error"] is None and record["proc_ms"] > 0


def test_compressed_frames_give_the_same_result(simulated, tmp_path):
    import bz2
    import gzip

    plain = simulated["paths"]["spots"]
    data = plain.read_bytes()
    (tmp_path / "spots_0001.cbf.gz").write_bytes(gzip.compress(data))
    (tmp_path / "spots_0001.cbf.bz2").write_bytes(bz2.compress(data))
    expected = analyse(str(plain)).as_dict()
    for name in ("spots_0001.cbf.gz", "spots_0001.cbf.bz2"):
        got = analyse(str(tmp_path / name)).as_dict()
        for key in ("spot_total", "good_bragg_candidates", "method1_resolution", "method2_resolution"):
            assert got[key] == expected[key]


def test_any_file_name_is_accepted(simulated, tmp_path):
    odd = tmp_path / "test.cbf"
    odd.write_bytes(simulated["paths"]["spots"].read_bytes())
    result = analyse(str(odd))
    assert result.status == "ok" and result.spot_total > 0
    assert not math.isnan(result.method1_resolution)


def test_result_dict_is_plain_json(simulated):
    import json

    record = analyse(str(simulated["paths"]["spots"])).as_dict()
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert all(type(v) in (int, float, str, bool, type(None)) for v in record.values())


def test_shown_as_names_the_result_and_report(simulated, tmp_path):
    from spotfinder_core.report import format_body

    link = tmp_path / "asked_0001.cbf"
    link.symlink_to(simulated["paths"]["spots"])
    result = analyse(str(simulated["paths"]["spots"]), shown_as=str(link))
    assert result.as_dict()["file"] == str(link) and result.file == "asked_0001.cbf"
    assert "asked_0001.cbf" in format_body(result)
    failed = analyse(str(tmp_path / "missing_0001.cbf"), shown_as="/data/x_0001.cbf")
    assert failed.as_dict()["file"] == "/data/x_0001.cbf" and failed.status == "error"


def test_short_classification_path_equals_the_long_one(simulated):
    """Cycles 1-2 only mark the next sample when they can; the z-scores must be those of the long way,
    also when a dead patch forces windows to widen (then the long way is taken)."""
    import numpy as np

    from spotfinder_core import analysis, background
    from spotfinder_core.params import Params, effective_settings

    frame = read_frame(str(simulated["paths"]["spots"]))
    g = frame.geometry
    settings = effective_settings(Params(), g.family)
    region = background.Region.of(g, settings.margin)
    tiling = background.Tiling.of(g, region, settings.scanbox_windows, settings.res_outer)
    cycles = tiling.cycles
    dead = frame.pixels.copy()
    dead[100:180, 100:400] = -2  # a dead patch: windows over it find too little background
    for pixels in (frame.pixels, dead):
        quick = background.classify(pixels, g, settings, region, analysis.UNDERLOAD)
        full = background._run_long(pixels, g, settings, analysis.UNDERLOAD, cycles)
        assert np.array_equal(quick.flags, full.flags)
        xs, ys = np.nonzero(np.ones(pixels.shape, dtype=bool))
        assert np.array_equal(quick.z_at(xs, ys), full.z_at(xs, ys))
        assert np.array_equal(quick.local_background(xs, ys), full.local_background(xs, ys))
        assert np.array_equal(quick.window_sample, full.window_sample)
    assert background._run_short(dead, g, settings, analysis.UNDERLOAD, tiling) is None


def test_detector_coverage_of_resolution_circles():
    """A 10 x 10 mm detector, beam at (3, 6) mm, 200 mm away, 1 A: the values DISTL's Geom2d gives."""
    import pytest

    from spotfinder_core.geometry import Geometry
    from spotfinder_core.resolution import DetectorCoverage

    g = Geometry(wavelength=1.0, distance=200.0, pixel_size=1.0, beam_x=3.0, beam_y=6.0, saturation=65535,
                 twotheta=0.0, size_slow=10, size_fast=10, vendortype="test")
    coverage = DetectorCoverage(g)
    for d, fraction in [(200, 1.0), (100, 1.0), (50, 0.7643789), (30, 0.2827813), (20, 0.0)]:
        assert coverage(d) == pytest.approx(fraction, abs=1e-6)


def test_header_overrides_supply_and_replace_geometry(simulated, tmp_path):
    from spotfinder_core import parse_words

    data = simulated["paths"]["spots"].read_bytes()
    no_distance = tmp_path / "nodist_0001.cbf"
    no_distance.write_bytes(data.replace(b"# Detector_distance", b"# Detector_elsewhere"))
    assert analyse(str(no_distance)).status == "error"
    supplied = analyse(str(no_distance), parse_words(["autoindex_override_distance=150"]))
    assert supplied.status == "ok"
    assert supplied.as_dict() | {"file": None, "proc_ms": 0} == \
        analyse(str(simulated["paths"]["spots"])).as_dict() | {"file": None, "proc_ms": 0}
    farther = analyse(str(simulated["paths"]["spots"]), parse_words(["autoindex_override_distance=300"]))
    assert farther.method2_resolution > supplied.method2_resolution  # the same spots, seen from farther away


def test_integer_beam_rounds_the_beam_distl_hands_to_libdistl():
    """DISTL passes the beam as a "%f" string in mm: a beam on a half pixel can round down."""
    from spotfinder_core.geometry import integer_beam
    from spotfinder_core.geometry import Geometry

    pixel = 172e-6 * 1000.0  # "Pixel_size 172e-6 m", as the header reader converts it: 0.17200000000000001
    g = Geometry(wavelength=1.0, distance=150.0, pixel_size=pixel, beam_x=309.5 * pixel, beam_y=243.5 * pixel,
                 saturation=65535, twotheta=0.0, size_slow=619, size_fast=487, vendortype="Pilatus-300K")
    assert integer_beam(g) == (310, 243)  # 41.882 / 0.17200000000000001 = 243.49999999999997


def test_coverage_compares_pixels_not_spans():
    """A coarse window kept where a finer one inside it is dropped (res.outer) covers other pixels, although
    the spans along each axis agree: the short path must not be taken."""
    import numpy as np

    from spotfinder_core.background import _same_coverage

    coarse = np.array([[0, 9, 0, 9]])
    fine = np.array([[0, 4, 0, 9], [5, 9, 0, 4], [5, 9, 5, 9]])
    assert _same_coverage([coarse, fine, fine])
    assert not _same_coverage([coarse, fine[:2], fine[:2]])
    assert not _same_coverage([fine, fine, fine[:2]])


def test_res_outer_classification_equals_the_long_way(real_frames):
    """distl.res.outer=1.5 on a thaumatin frame drops fine windows inside kept coarse ones."""
    import numpy as np

    from spotfinder_core import analysis, background
    from spotfinder_core.params import effective_settings, parse_words

    frame = read_frame(str(real_frames["thau_3_2_0005.cbf"]))
    g = frame.geometry
    settings = effective_settings(parse_words(["distl.res.outer=1.5"]), g.family)
    region = background.Region.of(g, settings.margin)
    cycles = [np.array([w for w in background.scanbox_windows(g, region, box)
                        if background._window_reaches(g, w, settings.res_outer)]) for box in settings.scanbox_windows]
    quick = background.classify(frame.pixels, g, settings, region, analysis.UNDERLOAD)
    full = background._run_long(frame.pixels, g, settings, analysis.UNDERLOAD, cycles)
    assert np.array_equal(quick.flags, full.flags)
    xs, ys = np.nonzero(full.flags & background.STRONG)
    assert np.array_equal(quick.z_at(xs, ys), full.z_at(xs, ys))
