"""Float sums, means and deviations in DISTL's order, and the spot radius and d of DISTL's spot filter agent.

A float sum's last bits depend on the order of its additions, and a printed digit now and then on those bits.
DISTL adds left to right (flex.sum, Python loops, libtbx's ``reduce`` totals); flex.mean multiplies by 1/n;
scitbx's basic_statistics (DISTL's filter statistics) runs Welford's update.  numpy adds pairwise, and the
builtin ``sum()`` of floats is compensated since Python 3.12: these tests hold on every Python version.
"""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from shared_data import PEER_DISTL, PEER_PYTHON, PEER_SHIM, need_peer, real_distl_body
from spotfinder_core import analyse, analysis, heuristics, parse_words
from spotfinder_core.geometry import resolutions_at_mm
from spotfinder_core.report import BinTable, Details, _table, format_bcsb, format_body
from spotfinder_core.result import Result
from spotfinder_core.simulate import write_cbf
from spotfinder_core.sums import flex_mean, running_mean_sd, sequential_sum, spreadsheet_total
from test_core_neighbours import rows_of_spots

BIG = [1e16, 1.0, 1.0]  # in order: 1e16 + 1 rounds back to 1e16, twice; exactly: 1e16 + 2


def test_sequential_sum_adds_from_the_left_whatever_the_python():
    assert sequential_sum(BIG) == 1e16
    assert math.fsum(BIG) == 1e16 + 2  # what a compensated sum (builtin sum() on 3.12+) gets
    assert sequential_sum([0.1] * 10) == 0.9999999999999999
    assert sequential_sum(np.array([1.0, 1e16, -1e16])) == 0.0  # (1 + 1e16) - 1e16: the 1 is lost
    assert sequential_sum([], 2.5) == 2.5


def test_spreadsheet_total_starts_from_the_first_value():
    assert spreadsheet_total(BIG) == 1e16
    assert math.copysign(1.0, spreadsheet_total([-0.0])) == -1.0  # reduce keeps it; 0.0 + -0.0 would not
    assert spreadsheet_total([0, 2.5, 0]) == 2.5


# scitbx's own answers (flex.mean, basic_statistics), taken once in ~/.distl-peer
FLEX_MEAN_CASES = [([28269.125, 3187.0, 37708.375, 2650.125, 26640.625], 19691.050000000003)]


def test_flex_mean_multiplies_by_one_over_n():
    values, scitbx_mean = FLEX_MEAN_CASES[0]
    assert flex_mean(values) == scitbx_mean
    assert "%.1f" % flex_mean(values) == "19691.1"
    assert "%.1f" % float(np.mean(values)) == "19691.0"  # sum / n: another last bit, another digit
    with pytest.raises(ValueError):
        flex_mean([])


def test_running_mean_sd_is_welfords_update():
    values = [0.1, 0.7, 0.3, 0.25, 1.9, 0.6, 0.05, 0.4, 0.35]
    mean, m2 = values[0], 0.0
    for n, x in enumerate(values[1:], start=2):
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
    assert running_mean_sd(values) == (mean, math.sqrt((m2 / 9) / (1 - 1 / 9)))
    assert running_mean_sd([3.0]) == (3.0, -1.0)


def test_running_mean_sd_matches_scitbx_basic_statistics():
    """Against scitbx itself on random sets, where numpy's mean and std mostly differ in the last bit."""
    need_peer()
    rng = np.random.default_rng(5)
    cases = [rng.uniform(-5.0, 50.0, int(rng.integers(2, 40))).tolist() for _ in range(200)]
    script = ("import json,sys\nfrom scitbx.math import basic_statistics\nfrom scitbx.array_family import flex\n"
              "out=[]\nfor v in json.load(sys.stdin):\n  b=basic_statistics(flex.double(v))\n"
              "  out.append([b.mean,b.bias_corrected_standard_deviation,flex.mean(flex.double(v)),"
              "flex.sum(flex.double(v))])\nprint(json.dumps(out))\n")
    done = subprocess.run([str(PEER_PYTHON), "-c", script], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=120, check=True)
    numpy_differs = 0
    for values, (mean, sd, fmean, fsum) in zip(cases, json.loads(done.stdout)):
        assert running_mean_sd(values) == (mean, sd)
        assert flex_mean(values) == fmean and sequential_sum(values) == fsum
        numpy_differs += (float(np.mean(values)), float(np.std(values, ddof=1))) != (mean, sd)
    assert numpy_differs > 100


def _table_of(integrated: list, isigi: list) -> BinTable:
    rows = len(integrated)
    columns = {"Limit": [9.0 - k for k in range(rows)], "Population": [1] * rows, "Missing": [1.0] * rows,
               "Fract": [1.0] * rows, "PxlBkgrd": [10.0] * rows, "MnWndwSz": [100.0] * rows,
               "Integrated": integrated, "MeanI": integrated, "MeanBkg": [1.0] * rows, "MeanSz": [5.0] * rows,
               "MeanIsigI": isigi, "MnEccen": [0.1] * rows, "MnSkew": [0.0] * rows}
    return BinTable(message="m", columns=columns, legend=False)


def test_the_total_row_adds_row_by_row():
    """libtbx's Spreadsheet: ``reduce`` for the totals, a ``+=`` loop for the weighted means."""
    total = _table(_table_of(BIG, [1.0, 2.0, 3.0]))[-1].split()
    assert total[0] == "3"  # population
    assert total[1] == "10000000000000000"  # integrated; compensated: ...0002
    assert total[2] == "%.0f" % (1e16 / 3)  # MeanI: (1e16 + 1 + 1) / 3 added in order


def test_the_bcsb_reply_adds_the_last_table_in_order():
    result = Result(path="f.cbf", file="f.cbf", spot_total=3, focus_spots=3)
    result.details = Details(echo_template=False, tables=[_table_of(BIG, [1.0, 2.0, 3.0])], focus_signals=[],
                             focus_saturations=[], inlier_signal=0.0, listing=None, cutoff_percent=50.0,
                             classification_error=None, method2_unrounded=2.0)
    assert "<integrated>10000000000000000.000</integrated>" in format_bcsb(result)


def test_the_mean_saturation_is_100_times_the_mean():
    """DISTL prints 100 * flex.mean(fractions): not the mean of the percentages, which differs here."""
    fractions = [0.47825, 0.02475]
    assert "%.1f" % float(np.mean(np.array(fractions) * 100.0)) == "25.2"
    result = Result(path="f.cbf", file="f.cbf", spot_total=2, remove_ice=2, in_resolution_total=2,
                    good_bragg_candidates=2, ice_rings=0, method1_resolution=2.0, saturation_top_peaks=2,
                    saturation_percent=25.0, overloaded_spots=0, focus_spots=2)
    result.details = Details(echo_template=False, tables=[], focus_signals=[1.0, 2.0], focus_saturations=fractions,
                             inlier_signal=3.0, listing=None, cutoff_percent=50.0, classification_error=None,
                             method2_unrounded=None)
    assert "with mean saturation 25.1%" in format_body(result)


# The 5099 frame of test_core_bins_exact: 2177 spots on a PILATUS 300K, beam (53.234, 41.882) mm.
FRAME = dict(seed=5099, step=5, row=14, sigma=0.99, total=40457)


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sums") / "rows_0001.cbf"
    write_cbf(str(path), rows_of_spots(**FRAME))
    return str(path)


def _chain_of(path: str, monkeypatch, words=()) -> dict:
    seen = {}
    run = heuristics.run

    def spy(final, shape, pg, *args):
        chain = run(final, shape, pg, *args)
        seen.update(final=final, shape=shape, pg=pg, chain=chain)
        return chain

    monkeypatch.setattr(analysis.heuristics, "run", spy)
    analyse(path, parse_words(list(words)))
    return seen


def test_spot_d_uses_the_images_own_pixel_size_and_sqrt(frame, monkeypatch):
    """DISTL's agent: 0.17200000000000001 mm (172e-6 m * 1000), not "%f"'s 0.172, and sqrt(dx*dx + dy*dy)."""
    seen = _chain_of(frame, monkeypatch)
    final, pg, chain = seen["final"], seen["pg"], seen["chain"]
    assert pg.pixel_size == 0.172 and 172e-6 * 1000 == 0.17200000000000001
    dx, dy = final.peak_x * 0.17200000000000001 - pg.beam_x, final.peak_y * 0.17200000000000001 - pg.beam_y
    assert chain.d.tolist() == resolutions_at_mm(pg, np.sqrt(dx * dx + dy * dy)).tolist()
    old = resolutions_at_mm(pg, np.hypot(final.peak_x * 0.172 - pg.beam_x, final.peak_y * 0.172 - pg.beam_y))
    assert np.count_nonzero(old != chain.d) > 1000  # the Python layer's pixel size and hypot: other bits


PEER_SCRIPT = """
import sys, json, runpy
from spotfinder.applications import practical_heuristics as ph
from scitbx.array_family import flex
seen = {}
init = ph.ListManager.__init__
def spy(self, *a, **k):
    init(self, *a, **k)
    seen["f"] = self
ph.ListManager.__init__ = spy
sys.argv = ["signal_strength"] + sys.argv[1:]
runpy.run_module("spotfinder.command_line.signal_strength", run_name="__main__")
f = seen["f"]
a = f.spotfilter
n = len(f.master)
d = list(a.get_resolution(f.master, flex.int(range(n))))
shapes = [[s.ctr_mass_x(), s.ctr_mass_y()] for s in f.master]
passes = []
for i, t in json.loads(sys.stdin.read()):
    a.set_arguments(flex.double([t]))
    passes.append(len(a.filter(f.master, flex.int([i]), "resolution_test")))
sys.stderr.write("JSON" + json.dumps(dict(d=d, com=shapes, passes=passes)))
"""


@pytest.mark.parametrize("words", [[], ["autoindex_override_twotheta=22.7"]], ids=["flat", "2-theta"])
def test_d_radius_test_and_centres_are_distls_bit_for_bit(frame, monkeypatch, words):
    """Against the real DISTL's agent: every spot's d (flat, and through the detector swung out by 2-theta),
    its radius test one ulp either side of our radius (the hi- and lo-pass filters), and the centres of mass
    (double weights, added in scitbx's order)."""
    need_peer(PEER_DISTL)
    seen = _chain_of(frame, monkeypatch, words)
    final, pg, chain, shape = seen["final"], seen["pg"], seen["chain"], seen["shape"]
    radius = heuristics.spot_radius_mm(final, pg, 0.17200000000000001)
    probes = [(i, t) for i in range(0, len(final), 37) for t in
              (math.nextafter(radius[i], 0.0), float(radius[i]), math.nextafter(radius[i], math.inf))]
    env = {"PYTHONPATH": str(PEER_SHIM), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(PEER_PYTHON), "-P", "-c", PEER_SCRIPT, frame, *words], env=env,
                          input=json.dumps(probes), capture_output=True, text=True, timeout=300)
    assert "JSON" in done.stderr, done.stderr[-500:]
    theirs = json.loads(done.stderr.split("JSON", 1)[1])
    assert len(theirs["d"]) == len(final)
    assert chain.d.tolist() == theirs["d"]
    assert theirs["passes"] == [1, 0, 0] * (len(probes) // 3)  # passes exactly when radius > threshold
    assert np.column_stack([shape.com_x, shape.com_y]).tolist() == theirs["com"]


# DISTL's distl.verbose lines (from ../shared/peer/distl FRAME distl.verbose=True) where the old code differed:
# 5207's tied spots listed in another order (the filter chain's sort was stable, DISTL's std::sort is not), and
# 5099's heights from the unrounded plane, where DISTL's wts subtract the float32 plane value.
LISTING = {
    "tie order": (dict(seed=5207, step=5, row=10, sigma=0.85, total=11358), [
        "79: Area in pixels=9 Peak=2889.0, Total integrated signal=11114.1 (in pixel-ADC units above background)",
        "80: Area in pixels=9 Peak=2825.2, Total integrated signal=10858.8 (in pixel-ADC units above background)"]),
    "float32 plane": (FRAME, [
        "       body pixel x= 220 y= 379; pixel value= 3079; ADC height above background=2850.2",
        "       body pixel x= 471 y= 393; pixel value= 1842; ADC height above background=1647.1"]),
}


@pytest.mark.parametrize("name", list(LISTING))
def test_the_spot_listing_is_distls(name, tmp_path):
    scene, expected = LISTING[name]
    path = tmp_path / "rows_0001.cbf"
    write_cbf(str(path), rows_of_spots(**scene))
    ours = format_body(analyse(str(path), parse_words(["distl.verbose=True"])))
    lines = ours.split("\n")
    for line in expected:
        assert line in lines
    assert ours == real_distl_body(str(path), "distl.verbose=True")


def test_the_listing_order_is_the_unstable_sorts(monkeypatch, tmp_path):
    """Why-test: with a stable resolution sort the tied spots 79 and 80 of frame 5207 swap places."""
    path = tmp_path / "rows_0001.cbf"
    write_cbf(str(path), rows_of_spots(**LISTING["tie order"][0]))

    def stable(items, keys):
        items = np.asarray(items, dtype=np.int64)
        return items[np.argsort(-np.asarray(keys)[items], kind="stable")]

    monkeypatch.setattr(heuristics.resolution, "distl_sort_descending", stable)
    lines = format_body(analyse(str(path), parse_words(["distl.verbose=True"]))).split("\n")
    first, second = LISTING["tie order"][1]
    assert first.replace("79:", "80:") in lines and second.replace("80:", "79:") in lines
