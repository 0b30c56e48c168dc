"""Divergences from the real DISTL found by the synthetic-frame search (/tmp/div), each pinned.

Shell populations (``resolution.populations``): libdistl's ``bin_populations`` puts a spot in the shell
numbered by how many edges ``limit0 / (k + 1) ** (1/3)`` lie strictly above its d.  We used
``ceil((limit0 / d) ** 3) - 1``, which is the same on paper but one shell off for a spot on or right next to an
edge.  With ``distl.bins.corner=False`` the bins end at the last spot's d, so that spot sits on the last edge:
DISTL counts it in the last row, we dropped it (a missing row and a total one spot short).
"""
from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

from shared_data import PEER_PYTHON, need_peer, real_distl_body
from spotfinder_core import analyse, parse_words
from spotfinder_core.report import format_body
from spotfinder_core.resolution import populations
from spotfinder_core.simulate import Scene, random_spots, write_cbf

CORNER_OFF = ["distl.bins.corner=False", "distl.bins.verbose=True"]

# (limit0, d, shell) as libdistl's bin_populations answers them (~/.distl-peer, one spot at d and one at 0.3 A);
# ceil((limit0 / d) ** 3) - 1 gives the shell next to each of these.
BIN_POPULATIONS_CASES = [
    (4.310068808710341, 3.420903880501059, 2),
    (18.39022252269256, 10.12052947681904, 5),
    (16.887428344647343, 8.828037567024543, 6),
    (25.440688002483533, 16.026629169068478, 3),
]

# The real DISTL's lines for the frame below (../shared/peer/distl FRAME distl.bins.corner=False
# distl.bins.verbose=True): the first table's last row (one spot, on the last edge) and its total row.
DISTL_LINES = [
    " 5.05           1     1.00   0.65      25.9       878        2674   2674    450.7      22     47.731    0.389"
    "   0.000  ",
    "               61                                         1460556  23944    826.9      15    136.240    0.348"
    "   0.000  ",
]


def saturated_scene(seed: int = 64) -> Scene:
    """A PILATUS 300K frame of spots spread over 1-3000 x 3000 counts, some clipped at a 30000-count cutoff."""
    rng = np.random.default_rng(seed * 7 + 1)
    scene = Scene(detector="300K", seed=seed, background=float(rng.choice([3, 8, 20])),
                  distance=float(rng.choice([100, 150, 250])), wavelength=float(rng.choice([0.9795, 1.2, 0.7])),
                  spot_sigma=float(rng.uniform(0.7, 1.3)))
    scene.saturation = int(rng.choice([65535, 30000, 1048500]))
    spots = random_spots(scene, int(rng.integers(60, 300)), 3000.0)
    scene.spots = [(x, y, float(t * 10 ** rng.uniform(0, 3.5))) for x, y, t in spots]
    if rng.random() < 0.5:
        scene.saturated = [(int(x), int(y)) for x, y, _ in spots[::int(rng.integers(5, 20))]]
    return scene


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("divergence") / "sat_64_0001.cbf")
    write_cbf(path, saturated_scene())
    return path


def shell_of(limit0: float, d: float) -> int:
    counts = populations(np.array([d]), limit0, 64)
    return int(np.flatnonzero(counts)[0])


@pytest.mark.parametrize("limit0, d, shell", BIN_POPULATIONS_CASES)
def test_a_spot_next_to_an_edge_is_in_libdistls_shell(limit0, d, shell):
    assert shell_of(limit0, d) == shell
    assert max(0, math.ceil((limit0 / d) ** 3) - 1) != shell  # the old formula, for the record


def test_a_spot_exactly_on_an_edge_goes_outward():
    limit0 = 6.0
    edge = limit0 / 8 ** (1.0 / 3.0)  # edge 7 (k = 7): 3.0 exactly
    assert edge == 3.0
    assert shell_of(limit0, 3.0) == 7  # d < edge is false: edges 0..6 lie above, shell 7
    assert shell_of(limit0, float(np.nextafter(3.0, 0))) == 8
    assert shell_of(limit0, 7.0) == 0


def test_shells_beyond_the_rows_are_dropped():
    # 5.0 is on edge 0 (shell 0), 4.0 below it only (shell 1), 2.0 below 15 edges (shell 15: no row)
    assert populations(np.array([5.0, 4.0, 2.0]), 5.0, 3).tolist() == [1, 1, 0]


def test_corner_off_keeps_the_last_spot(frame):
    lines = format_body(analyse(frame, parse_words(CORNER_OFF))).split("\n")
    for line in DISTL_LINES:
        assert line in lines


def test_libdistl_bin_populations_live(tmp_path):
    """Our shells against libdistl's own bin_populations on 3000 spots placed on and next to edges."""
    python = PEER_PYTHON
    need_peer()
    script = (
        "import math, random, sys\n"
        "from spotfinder.core_toolbox import bin_populations\n"
        "from spotfinder.array_family import flex\n"
        "random.seed(11)\n"
        "for t in range(1000):\n"
        "    rows = random.randint(1, 40); last = random.uniform(0.8, 8.0)\n"
        "    limit0 = 1. / math.pow((1. / rows) * math.pow(1. / last, 3), 1.0 / 3.0)\n"
        "    base = limit0 / random.randint(1, rows) ** (1 / 3)\n"
        "    for d in (base, math.nextafter(base, 0), math.nextafter(base, 9e9)):\n"
        "        if d <= limit0 * 1.01:\n"
        "            print(repr(limit0), repr(d), list(bin_populations(flex.double([d, 0.3]), limit0)).index(1))\n")
    # run outside the checkout: its spotfinder/ folder would hide the peer's spotfinder package
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-500:]
    cases = [line.split() for line in done.stdout.splitlines()]
    assert len(cases) > 2500
    wrong = [c for c in cases if shell_of(float(c[0]), float(c[1])) != int(c[2])]
    assert wrong == []


def test_the_whole_text_is_the_real_distls(frame):
    ours = format_body(analyse(frame, parse_words(CORNER_OFF)))
    assert ours == real_distl_body(frame, *CORNER_OFF)
