"""The distl.bins.verbose tables to the last printed digit.

Two facts of DISTL's make them so (both read from its code and checked against its per-spot data):
* a spot's integrated signal sums ``value - local mean`` in double precision, the mean being the float32
  background plane value; the float32 weights the spot's shape uses are off by up to ~1e-3 a pixel, enough to
  move a shell's "Integrated" across a rounding boundary;
* the tables walk the spots in the order of DISTL's resolution sort, C++'s unstable ``std::sort``: spots of
  equal d (positions symmetric about the beam) keep no index order, and the I/sig(I) walk, which skips rows
  without a background value and so pairs later rows with other spots, picks other spots from such a tie.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from shared_data import real_distl_body
from spotfinder_core import analyse, parse_words
from spotfinder_core.report import format_body
from spotfinder_core.resolution import _IntroSort, distl_sort_descending
from spotfinder_core.simulate import write_cbf
from spotfinder_core.spots import Spots
from spotfinder_core.sums import sequential_sum
from test_core_neighbours import rows_of_spots

VERBOSE = ["distl.bins.verbose=True"]

# Index orders GNU libstdc++'s std::sort gives (compiled with g++ 12, the same algorithm as the g++ 14 build
# of the real DISTL) for keys sorted with ``key[a] > key[b]``, starting from the identity order.
PINNED_SORTS = {
    "3 levels, 20": ([i % 3 for i in range(20)],
                     [2, 17, 5, 14, 8, 11, 10, 19, 16, 13, 7, 4, 1, 0, 9, 12, 6, 15, 3, 18]),
    "5 levels, 40": ([(7 * i) % 5 for i in range(40)],
                     [17, 2, 37, 22, 7, 32, 27, 12, 9, 24, 14, 29, 19, 34, 4, 39, 21, 1, 26, 31, 36, 16, 11, 6, 18,
                      23, 38, 13, 28, 3, 8, 33, 0, 20, 5, 35, 10, 30, 15, 25]),
    "runs of 4, 24": ([i // 4 for i in range(24)],
                      [23, 22, 21, 20, 19, 18, 17, 16, 12, 15, 14, 13, 11, 10, 9, 8, 7, 6, 5, 4, 0, 3, 2, 1]),
    "squares mod 7, 17": ([(i * i) % 7 for i in range(17)],
                          [16, 2, 5, 12, 9, 3, 4, 10, 11, 8, 15, 13, 6, 1, 0, 7, 14]),
}
# std::partial_sort(first, last, last), the heapsort introsort falls back on past its depth limit
PINNED_HEAP_SORT = ([i % 4 for i in range(12)], [3, 11, 7, 10, 2, 6, 1, 9, 5, 0, 8, 4])

# Frames where the float32 signal (5099: "Integrated" 14111015) and the index order of tied spots (5207:
# MeanIsigI 88.867 in the last row, 93.528 in the total) gave other digits than the real DISTL's.
FRAMES = {
    "signal precision": dict(seed=5099, step=5, row=14, sigma=0.99, total=40457),
    "tie order": dict(seed=5207, step=5, row=10, sigma=0.85, total=11358),
}
# The real DISTL's lines for them (from ../shared/peer/distl FRAME distl.bins.verbose=True)
DISTL_LINES = {
    "signal precision": [" 6.32         484     1.00   1.00     140.6       819    14111014  29155   1457.3      10    "
                         "164.251    0.140   0.000  "],
    "tie order": [" 2.56           5     0.98   0.16      19.6       872       46829   9366    297.9      11     "
                  "91.515    0.234   0.000  ",
                  "             3624                                        35400974   9768    408.7       9     "
                  "93.532    0.168   0.004  "],
}


@pytest.mark.parametrize("name", PINNED_SORTS)
def test_ties_end_where_std_sort_leaves_them(name):
    keys, expected = PINNED_SORTS[name]
    order = distl_sort_descending(np.arange(len(keys)), np.array(keys, dtype=float))
    assert order.tolist() == expected
    assert order.tolist() != np.argsort(-np.array(keys), kind="stable").tolist()


def test_heapsort_fallback_matches_std_partial_sort():
    keys, expected = PINNED_HEAP_SORT
    order = list(range(len(keys)))
    _IntroSort(order, {i: float(k) for i, k in enumerate(keys)})._heap_sort(0, len(keys))
    assert order == expected


def test_items_are_sorted_by_their_own_keys_only():
    """Only the listed items are ordered; keys of other indices play no part."""
    keys = np.array([5.0, 1.0, 9.0, 1.0, 7.0, 3.0])
    order = distl_sort_descending(np.array([1, 3, 4, 5]), keys)
    assert order.tolist() == [4, 5, 1, 3]


def test_sort_matches_gnu_std_sort_on_random_ties(tmp_path):
    """Against std::sort itself, compiled here, on a few hundred tie-heavy inputs of every size class."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the pinned orders above are what it gives")
    source = tmp_path / "sort.cpp"
    source.write_text(SORT_PROGRAM)
    program = tmp_path / "sort"
    subprocess.run([compiler, "-O2", "-std=c++17", "-o", str(program), str(source)], check=True, timeout=120)
    rng = np.random.default_rng(11)
    cases = []
    for _ in range(200):
        n = int(rng.choice([2, 16, 17, 33, 100, 257, 1000, 3000]))
        cases.append(rng.integers(0, int(rng.choice([2, 5, 50, 10 ** 6])), n).astype(float))
    text = "".join("%d %s\n" % (len(k), " ".join(repr(float(x)) for x in k)) for k in cases)
    done = subprocess.run([str(program)], input=text, capture_output=True, text=True, check=True, timeout=120)
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases)
    for keys, line in zip(cases, lines):
        assert distl_sort_descending(np.arange(len(keys)), keys).tolist() == [int(x) for x in line.split()]


SORT_PROGRAM = """
#include <algorithm>
#include <cstdio>
#include <vector>
int main() {
  int n;
  while (std::scanf("%d", &n) == 1) {
    std::vector<double> key(n);
    std::vector<int> index(n);
    for (int i = 0; i < n; ++i) { std::scanf("%lf", &key[i]); index[i] = i; }
    std::sort(index.begin(), index.end(), [&](const int& a, const int& b) { return key[a] > key[b]; });
    for (int i = 0; i < n; ++i) std::printf("%d ", index[i]);
    std::printf("\\n");
  }
}
"""


def test_spot_sums_add_each_spot_pixel_by_pixel():
    """Left to right per spot (flex.sum), where numpy's pairwise sum may round otherwise."""
    tenth = [0.1] * 10
    assert sequential_sum(tenth) == 0.9999999999999999 != float(np.sum(tenth))
    area = np.array([10, 3, 1])
    starts = np.concatenate(([0], np.cumsum(area)))
    values = np.array(tenth + [1e16, 1.0, 1.0, 2.5])
    zeros = np.zeros(14, dtype=np.int64)
    found = Spots(zeros[:3], zeros[:3], area, zeros[:3], np.zeros(3, np.float32), starts, zeros, zeros,
                  np.zeros(14, np.float32), np.zeros(14, np.float32))
    assert found.per_spot_sum(values).tolist() == [0.9999999999999999, 1e16, 2.5]


def test_a_spots_signal_is_its_values_above_the_float32_background_in_double():
    """DISTL's wts are value - local mean in double (the mean a float32 plane value): rounded to float32 they
    are up to ~1e-3 off a pixel, enough to move a printed digit."""
    rng = np.random.default_rng(3)
    area = np.array([7, 1, 30])
    starts = np.concatenate(([0], np.cumsum(area)))
    values = rng.integers(10, 60000, starts[-1]).astype(np.int32)
    bkg = rng.uniform(5.0, 900.0, starts[-1]).astype(np.float32)
    zeros = np.zeros(starts[-1], dtype=np.int64)
    found = Spots(zeros[:3], zeros[:3], area, zeros[:3], np.zeros(3, np.float32), starts, zeros, zeros, values, bkg)
    expected = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        total = 0.0
        for v, b in zip(values[lo:hi].tolist(), bkg[lo:hi].tolist()):
            total += v - b
        expected.append(total)
    assert found.signal.tolist() == expected
    heights = [v - b for v, b in zip(values.tolist(), bkg.tolist())]
    assert found.heights.tolist() == heights
    assert found.peak_height.tolist() == [max(heights[lo:hi]) for lo, hi in zip(starts[:-1], starts[1:])]


@pytest.fixture(params=list(FRAMES))
def frame(request, tmp_path) -> tuple[str, str]:
    path = tmp_path / "rows_0001.cbf"
    write_cbf(str(path), rows_of_spots(**FRAMES[request.param]))
    return request.param, str(path)


def test_the_bin_tables_print_distls_digits(frame):
    name, path = frame
    lines = format_body(analyse(path, parse_words(VERBOSE))).split("\n")
    for line in DISTL_LINES[name]:
        assert line in lines


def test_the_whole_text_is_the_real_distls(frame):
    _, path = frame
    ours = format_body(analyse(path, parse_words(VERBOSE)))
    assert ours == real_distl_body(path, *VERBOSE)
