"""The per-annulus counts of the pixel ice test against a plain numpy reference: bit-for-bit equal."""
from __future__ import annotations

import numpy as np
import pytest

from spotfinder_core import background, ice
from spotfinder_core.background import BELOW_MEDIAN, BELOW_UPPER, ICE_MEDIAN_Z, ICE_UPPER_Z


def reference_counts(z, x0, x1, y0, y1, bx, by, first, last):
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
    counts[:, 1] = np.bincount(k, weights=(values < ICE_MEDIAN_Z).astype(np.int64), minlength=rings).astype(np.int64)
    counts[:, 2] = np.bincount(k, weights=(values < ICE_UPPER_Z).astype(np.int64), minlength=rings).astype(np.int64)
    return counts


def random_z(rng, shape):
    z = rng.normal(0.5, 1.5, size=shape).astype(np.float32)
    # some values exactly at, and one float32 step either side of, the thresholds
    for t in (ICE_MEDIAN_Z, ICE_UPPER_Z):
        t32 = np.float32(t)
        for v in (t32, np.nextafter(t32, np.float32(-np.inf)), np.nextafter(t32, np.float32(np.inf))):
            idx = rng.integers(0, z.size, size=max(1, z.size // 50))
            z.flat[idx] = v
    return z


def classes(z):
    """The classification's pixel classes of z (no pixel saturated)."""
    flags = np.empty(z.shape, dtype=np.uint8)
    background._flag_all(z, flags, np.zeros(z.shape, dtype=np.int32), 3.0, 1 << 30)
    return flags


def check(z, region, beam, first, last):
    got = ice._ring_counts(classes(z), *region, *beam, first, last, BELOW_MEDIAN, BELOW_UPPER)
    want = reference_counts(z, *region, *beam, first, last)
    assert got.shape == want.shape == (last - first + 1, 3)
    np.testing.assert_array_equal(got, want, err_msg="region %s beam %s rings %d..%d" % (region, beam, first, last))


SHAPES = [(1, 1), (3, 70), (17, 64), (40, 128), (33, 129), (61, 47)]


@pytest.mark.parametrize("shape", SHAPES)
def test_counts_equal_reference_for_beams_inside_on_edge_and_outside(shape):
    rng = np.random.default_rng(sum(shape))
    sx, sy = shape
    z = random_z(rng, shape)
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
        z = random_z(rng, (sx, sy))
        x0, x1 = sorted(int(v) for v in rng.integers(0, sx, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, sy, size=2))
        bx, by = (int(v) for v in rng.integers(-60, max(sx, sy) + 60, size=2))
        first = int(rng.integers(0, 30))
        last = first + int(rng.integers(0, 60))
        check(z, (x0, x1, y0, y1), (bx, by), first, last)


def test_classes_compare_float32_z_with_double_thresholds():
    """-0.0 is not below 0; the float32 just below 1.5 is below 1.5; a spot height a hair above 3 is not
    reached by z = 3 (compared in float32 it would be); saturation is value >= the cutoff."""
    z = np.array([[-0.0, np.nextafter(np.float32(1.5), np.float32(0)), 1.5, 3.0]], dtype=np.float32)
    flags = np.empty(z.shape, dtype=np.uint8)
    height = background.float32_at_most(3.0000000001)
    background._flag_all(z, flags, np.array([[0, 0, 99, 100]], dtype=np.int32), height, 100)
    assert flags.tolist() == [[BELOW_UPPER, BELOW_UPPER, 0, background.SATURATED]]
    background._flag_all(z, flags, np.zeros(z.shape, dtype=np.int32), background.float32_at_most(2.9999999999), 100)
    assert flags[0, 3] == background.STRONG


def test_float32_threshold_decides_as_the_double_one():
    """z > float32_at_most(h) exactly when z > h, for float32 z: h representable or not, around the nearest
    float32 values."""
    rng = np.random.default_rng(5)
    for h in [3.0, 2.5, 0.1, 1e-9, 7.3, 123456.789, *rng.uniform(0.01, 20.0, size=200)]:
        h32 = background.float32_at_most(h)
        near = np.float32(h)
        zs = [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf)), h32]
        for z in zs:
            assert (np.float32(z) > h32) == (float(np.float32(z)) > h), (h, z)
