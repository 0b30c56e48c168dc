"""The vectorised heuristics and coverage give exactly (bit for bit) what the spot-by-spot and
circle-by-circle code gives."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from spotfinder_core import heuristics
from spotfinder_core.geometry import radii_mm, radius_mm, resolution_at_mm, resolutions_at_mm
from spotfinder_core.neighbours import nearest_others
from spotfinder_core.resolution import DetectorCoverage, Shells


def _bits(values) -> bytes:
    return np.asarray(values, dtype=np.float64).tobytes()


def _geometry(beam_x: float, beam_y: float, distance: float = 150.0, wavelength: float = 0.9795):
    return SimpleNamespace(size_slow=2527, size_fast=2463, pixel_size=0.172, beam_x=beam_x, beam_y=beam_y,
                           distance=distance, wavelength=wavelength)


# centred, on a corner, on an edge, off the detector, far off-centre
BEAMS = [(217.3, 211.8), (0.0, 0.0), (0.0, 100.0), (-30.0, 50.0), (420.0, 20.0)]


@pytest.mark.parametrize("beam", BEAMS)
def test_coverage_fractions_are_the_scalar_coverage(beam):
    coverage = DetectorCoverage(_geometry(*beam))
    wavelength = coverage.g.wavelength
    many = np.concatenate([np.geomspace(0.4, 300.0, 4000), [wavelength / 2, wavelength / 3, np.inf]])
    for ds in (many, many[::500], many[-3:], many[:0]):  # the numpy path and the few-crossings path
        assert _bits(coverage.fractions(ds)) == _bits([coverage(d) for d in ds])


def test_shells_use_the_scalar_coverage():
    coverage = DetectorCoverage(_geometry(217.3, 211.8, distance=120.0))
    d_sorted = np.sort(np.random.default_rng(0).uniform(1.2, 30.0, 900))[::-1]
    shells = Shells(d_sorted, d_sorted[44], coverage)
    assert _bits(shells.limit) == _bits([d_sorted[44] / (k + 1) ** (1.0 / 3.0) for k in range(len(shells))])
    assert _bits(shells.fract) == _bits([1.0] + [coverage(v) for v in shells.limit[1:]])


def test_resolutions_at_mm_are_the_scalar_ones():
    g = _geometry(217.3, 211.8)
    r = np.concatenate([[0.0, 0.172], np.random.default_rng(1).uniform(0.1, 600.0, 5000)])
    assert _bits(resolutions_at_mm(g, r)) == _bits([resolution_at_mm(g, v) for v in r])


def test_radii_mm_are_the_scalar_ones():
    g = _geometry(217.3, 211.8)
    d = np.concatenate([[np.inf, g.wavelength / 2, g.wavelength / 3], np.geomspace(0.45, 500.0, 5000)])
    assert _bits(radii_mm(g, d)) == _bits([radius_mm(g, v) for v in d])


def test_squares_are_pow_not_products():
    x = np.random.default_rng(2).uniform(0.1, 50.0, 20000)
    assert _bits(heuristics._square(x)) == _bits([np.float64(v) ** 2 for v in x])
    assert np.any(heuristics._square(x) != x * x)  # why _square exists


# --- the close-spot filter against a spot-by-spot reference ---------------------------------------------


def _reference_vectors(data, ave_area, n_current):
    limit = int(math.sqrt(20.0 * ave_area) / 2.0) + 1
    plot = np.zeros((2 * limit + 1, 2 * limit + 1), dtype=int)
    nearest, _ = nearest_others(data)
    for i, j in enumerate(nearest):
        vx, vy = int(data[j, 0] - data[i, 0]), int(data[j, 1] - data[i, 1])
        if abs(vx) <= limit and abs(vy) <= limit:
            plot[vx + limit, vy + limit] += 1
            plot[-vx + limit, -vy + limit] += 1
    highest = plot[1:-1, 1:-1].max()
    found = []
    for x in range(-limit + 1, limit):
        for y in range(-limit + 1, limit):
            if not (y > 0 or (y == 0 and x > 0)):
                continue
            c = plot[x + limit, y + limit]
            ahead = [plot[x + limit + dx, y + limit + dy] for dx, dy in ((0, 1), (1, 1), (1, 0), (1, -1))]
            behind = [plot[x + limit + dx, y + limit + dy] for dx, dy in ((0, -1), (-1, -1), (-1, 0), (-1, 1))]
            if c > 0.2 * highest and c > 0.05 * n_current and all(c >= v for v in ahead) and \
                    all(c > v for v in behind):
                found.append((x, y))
    return found


def _reference_compact(shape, idx, vectors):
    a, b = shape.a[idx], shape.b[idx]
    ux, uy = shape.major_dir[idx]
    for vx, vy in vectors:
        length2 = vx * vx + vy * vy
        cos = (ux * vx + uy * vy) / math.sqrt(length2)
        sin = math.sqrt(1.0 - min(cos * cos, 1.0))
        if 4.0 * (a * a * b * b / ((a * sin) ** 2 + (b * cos) ** 2)) >= length2:
            return False
    return True


def _reference_inliers(spots, shape, good, ave_area, overlap):
    data = np.column_stack([spots.peak_x, spots.peak_y]).astype(float)
    nearest, _ = nearest_others(data)
    vectors = _reference_vectors(data, ave_area, len(good))
    inliers = []
    for idx in good:
        if 0 < len(vectors) <= 3 and not _reference_compact(shape, idx, vectors):
            continue
        s = (int(data[nearest[idx], 0] - data[idx, 0]), int(data[nearest[idx], 1] - data[idx, 1]))
        if shape.majoraxis[idx] * overlap > math.hypot(*s):
            if not (len(vectors) <= 3 and any(abs(v[0] - s[0]) <= 1 and abs(v[1] - s[1]) <= 1 for v in vectors)):
                continue
        inliers.append(idx)
    return vectors, inliers


def _scene(rng, kind):
    if kind == "lattice":
        v1, v2 = rng.integers(-12, 13, 2), rng.integers(-12, 13, 2)
        i, j = np.meshgrid(np.arange(rng.integers(3, 25)), np.arange(rng.integers(3, 25)))
        points = 500 + i.ravel()[:, None] * v1 + j.ravel()[:, None] * v2 + rng.integers(-1, 2, (i.size, 2))
    elif kind == "row":
        n = rng.integers(3, 60)
        points = np.arange(n)[:, None] * rng.integers(1, 9, 2) + rng.integers(0, 2, (n, 2))
    elif kind == "stacked":  # many spots on a few pixels: the nearest-other search must look past k
        points = np.repeat(rng.integers(0, 20, (rng.integers(2, 6), 2)), rng.integers(1, 12), axis=0)
    else:
        points = rng.integers(0, rng.integers(10, 300), (rng.integers(3, 400), 2))
    n = len(points)
    angle = rng.uniform(0.0, np.pi, n)
    spots = SimpleNamespace(peak_x=points[:, 0], peak_y=points[:, 1], intensity=rng.integers(100, 2000, n),
                            area=rng.integers(1, 40, n))
    shape = SimpleNamespace(a=rng.uniform(0.5, 6.0, n), b=rng.uniform(0.3, 3.0, n), eccentricity=rng.uniform(0, 1, n),
                            skewness=rng.uniform(0.0, 0.5, n), majoraxis=rng.uniform(1.0, 15.0, n),
                            major_dir=np.stack([np.cos(angle), np.sin(angle)], axis=1))
    return spots, shape


@pytest.mark.parametrize("kind", ["lattice", "row", "stacked", "random"])
def test_quality_is_the_spot_by_spot_filter(kind):
    rng = np.random.default_rng(sum(map(ord, kind)))
    g = SimpleNamespace(pixel_size=0.172, saturation=1e6)
    seen_vectors = 0
    for _ in range(150):
        spots, shape = _scene(rng, kind)
        n = len(spots.peak_x)
        if n < 3:
            continue
        unimodal = np.sort(rng.choice(n, rng.integers(3, n + 1), replace=False))
        chain = heuristics.Chain()
        overlap = float(rng.choice([0.5, 1.0, 2.0]))
        inliers, neighbours = heuristics._quality(spots, shape, unimodal, chain, g, overlap)
        good = chain.subsets["spots_good_intensity"]
        ave_area = float(np.mean(spots.area[unimodal].astype(np.float64)))
        vectors, expected = _reference_inliers(spots, shape, good, ave_area, overlap)
        data = np.column_stack([spots.peak_x, spots.peak_y]).astype(float)
        nearest, dist2 = nearest_others(data)
        assert heuristics._neighbour_vector_maxima(data, nearest, ave_area, len(good)) == vectors
        assert inliers.tolist() == expected
        assert _bits(neighbours) == _bits(g.pixel_size * np.sqrt(dist2[expected]))
        seen_vectors += 0 < len(vectors) <= 3
    if kind in ("lattice", "row"):
        assert seen_vectors > 0  # the ellipse-width test ran
