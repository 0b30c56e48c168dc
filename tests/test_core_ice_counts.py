"""The per-annulus counts of the pixel ice test against a plain numpy reference: bit-for-bit equal."""
from __future__ import annotations

import numpy as np
import pytest

from spotfinder import ice


def reference_counts(z, x0, x1, y0, y1, bx, by, first, last, low, high):
    """Annulus int(sqrt(r2) / RING_WIDTH) of every pixel in doubles, then bincounts; z compared in double."""
    rings = last - first + 1
    xs, ys = np.meshgrid(np.arange(x0, x1 + 1), np.arange(y0, y1 + 1), indexing="ij")
    r = np.sqrt((xs - bx).astype(np.float64) ** 2 + (ys - by).astype(np.float64) ** 2)
    k = np.floor(r / ice.RING_WIDTH).astype(np.int64).ravel() - first
    values = z[x0:x1 + 1, y0:y1 + 1].astype(np.float64).ravel()
    keep = (k >= 0) & (k < rings)
    k, values = k[keep], values[keep]
    counts = np.zeros((rings, 3), dtype=np.int64)
    np.add.at(counts[:, 0], k, 1)
    counts[:, 1] = np.bincount(k, weights=(values < low).astype(np.int64), minlength=rings).astype(np.int64)
    counts[:, 2] = np.bincount(k, weights=(values < high).astype(np.int64), minlength=rings).astype(np.int64)
    return counts


def random_z(rng, shape, low, high):
    z = rng.normal(0.5, 1.5, size=shape).astype(np.float32)
    # some values exactly at, and one float32 step either side of, the thresholds
    for t in (low, high):
        t32 = np.float32(t)
        for v in (t32, np.nextafter(t32, np.float32(-np.inf)), np.nextafter(t32, np.float32(np.inf))):
            idx = rng.integers(0, z.size, size=max(1, z.size // 50))
            z.flat[idx] = v
    return z


def check(z, region, beam, first, last, low=ice.MEDIAN_Z_MIN, high=ice.UPPER_Z_MIN):
    args = (z, *region, *beam, first, last, low, high)
    got = ice._ring_counts(*args)
    want = reference_counts(*args)
    assert got.shape == want.shape == (last - first + 1, 3)
    np.testing.assert_array_equal(got, want, err_msg="region %s beam %s rings %d..%d thresholds %r, %r"
                                  % (region, beam, first, last, low, high))


SHAPES = [(1, 1), (3, 70), (17, 64), (40, 128), (33, 129), (61, 47)]


@pytest.mark.parametrize("shape", SHAPES)
def test_counts_equal_reference_for_beams_inside_on_edge_and_outside(shape):
    rng = np.random.default_rng(sum(shape))
    sx, sy = shape
    z = random_z(rng, shape, ice.MEDIAN_Z_MIN, ice.UPPER_Z_MIN)
    regions = [(0, sx - 1, 0, sy - 1), (min(2, sx - 1), max(sx - 3, min(2, sx - 1)),
                                        min(3, sy - 1), max(sy - 2, min(3, sy - 1)))]
    beams = [(sx // 2, sy // 2), (0, 0), (sx - 1, sy - 1), (0, sy // 3), (sx // 3, sy - 1),  # inside, edges
             (-7, sy // 2), (sx // 2, sy + 9), (-40, -55), (sx + 100, sy + 3), (sx + 2, -1)]  # outside
    farthest = int(np.hypot(sx + 100, sy + 60)) // ice.RING_WIDTH + 2
    ranges = [(0, 0), (0, 3), (1, 1), (0, farthest), (2, 9), (farthest - 3, farthest + 5),
              (farthest + 10, farthest + 20)]  # the last ones beyond every pixel
    for region in regions:
        for beam in beams:
            for first, last in ranges:
                check(z, region, beam, first, last)


def test_counts_equal_reference_on_random_configurations():
    rng = np.random.default_rng(20240611)
    for _ in range(300):
        sx, sy = (int(v) for v in rng.integers(1, 150, size=2))
        low, high = sorted(float(t) for t in rng.choice([0.0, 1.5, 0.1, -0.3, 2.0 / 3.0, 1e-9], size=2))
        z = random_z(rng, (sx, sy), low, high)
        x0, x1 = sorted(int(v) for v in rng.integers(0, sx, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, sy, size=2))
        bx, by = (int(v) for v in rng.integers(-60, max(sx, sy) + 60, size=2))
        first = int(rng.integers(0, 30))
        last = first + int(rng.integers(0, 60))
        check(z, (x0, x1, y0, y1), (bx, by), first, last, low, high)


def test_thresholds_are_compared_in_double_precision():
    """float32(0.1) lies above 0.1 and below 0.1000000015, whose nearest float32 it is: compared in float32
    it would be below neither."""
    z = np.full((5, 5), np.float32(0.1))
    counts = ice._ring_counts(z, 0, 4, 0, 4, 2, 2, 0, 0, 0.1, 0.1000000015)
    assert counts.tolist() == [[25, 0, 25]]  # every pixel within 2 * sqrt(2) of the beam: annulus 0
