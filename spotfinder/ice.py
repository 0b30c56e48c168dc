"""Ice rings, found two ways as DISTL does: from pixel z-scores (libdistl) and from spot counts (RingFinder)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from .background import Region, integer_beam, pixel_d, pixel_resolution
from .image import Geometry
from .resolution import Shells

RING_WIDTH = 4  # pixels
ICE_D_MAX = 8.0  # Angstrom: no ring is tested at lower resolution than this
MEDIAN_Z_MIN = 0.0  # the z-score at 45% of a ring's sorted pixels must reach this ...
UPPER_Z_MIN = 1.5  # ... and the one at 80% this, for the ring to be ice


@dataclass(frozen=True)
class PixelRing:
    """A run of consecutive ice annuli; radii squared in pixels², d at its inner and outer edge."""

    inner_r2: float
    outer_r2: float
    inner_d: float
    outer_d: float


def pixel_rings(z: np.ndarray, geometry: Geometry, region: Region) -> list[PixelRing]:
    """Annuli 4 px wide around the integer beam whose z-scores are lifted as a whole."""
    bx, by = integer_beam(geometry)
    d_min = max(geometry.wavelength / 2.0, 1.0)
    corners = [(x, y) for x in (region.x0, region.x1) for y in (region.y0, region.y1)]
    farthest = max(math.hypot(x - bx, y - by) for x, y in corners)
    outer_r = min(farthest, _radius_px(geometry, d_min))
    nrings = int(outer_r / RING_WIDTH) + 1
    first = int(_radius_px(geometry, ICE_D_MAX) / RING_WIDTH)
    last = nrings - 2
    if last < first:
        return []
    counts = _ring_counts(z, region.x0, region.x1, region.y0, region.y1, bx, by, first, last,
                          MEDIAN_Z_MIN, UPPER_Z_MIN)
    rings: list[PixelRing] = []
    previous_iced = False
    for ring in range(first, last + 1):
        n, below_median, below_upper = counts[ring - first]
        # an annulus too small to have pixels below its 45% and 80% ranks is not analysed, as in libdistl
        iced = int(n * 0.45) > 0 and int(n * 0.80) > 0 and below_median <= int(n * 0.45) \
            and below_upper <= int(n * 0.80)
        if iced:
            inner_r, outer_r = ring * RING_WIDTH, (ring + 1) * RING_WIDTH
            if previous_iced:  # consecutive ice annuli make one ring
                rings[-1] = PixelRing(rings[-1].inner_r2, outer_r ** 2, rings[-1].inner_d,
                                      _d_at_r2(geometry, outer_r ** 2))
            else:
                rings.append(PixelRing(inner_r ** 2, outer_r ** 2, _d_at_r2(geometry, inner_r ** 2),
                                       _d_at_r2(geometry, outer_r ** 2)))
        previous_iced = iced
    return rings


@njit(cache=True)
def _ring_counts(z, x0, x1, y0, y1, bx, by, first, last, low, high):
    """Per annulus first..last: its pixel count and how many of its z-scores lie below ``low`` and ``high``.

    The sorted z at index k is >= t exactly when at most k values are below t, so the ice test needs
    these counts only: one pass over the frame, no sort.
    """
    rings = last - first + 1
    counts = np.zeros((rings + 2, 3), dtype=np.int64)  # rows 0 and rings + 1 collect what lies outside
    for x in range(x0, x1 + 1):
        dx2 = float(x - bx) ** 2
        z_row = z[x]
        for y in range(y0, y1 + 1):
            k = int(np.sqrt(dx2 + float(y - by) ** 2) / RING_WIDTH) - first
            k = min(max(k, -1), rings) + 1  # branch-free: the loop vectorises
            v = z_row[y]
            counts[k, 0] += 1
            counts[k, 1] += v < low
            counts[k, 2] += v < high
    return counts[1:rings + 1]


def _radius_px(geometry: Geometry, d: float) -> float:
    """libdistl's inverse of its d formula: r in pixels at resolution d."""
    k = (geometry.pixel_size / geometry.distance) ** 2
    ratio = (geometry.wavelength / d) ** 2
    return math.sqrt(max(0.0, ((2.0 / (2.0 - ratio)) ** 2 - 1.0) / k))


def _d_at_r2(geometry: Geometry, r2: float) -> float:
    bx, by = integer_beam(geometry)
    return float(pixel_resolution(geometry, bx + math.sqrt(r2), by))


@dataclass(frozen=True)
class IceTest:
    """The pixel-level rings as plain numbers, for the spot-growth kernel to test perimeter pixels."""

    bx: int
    by: int
    k: float  # (pixel / distance)^2
    wavelength: float
    inner_d: np.ndarray  # d at each ring's inner edge, rings from the beam outwards
    outer_d: np.ndarray

    @classmethod
    def of(cls, rings: list[PixelRing], geometry: Geometry) -> IceTest:
        bx, by = integer_beam(geometry)
        return cls(bx, by, (geometry.pixel_size / geometry.distance) ** 2, geometry.wavelength,
                   np.array([r.inner_d for r in rings], dtype=np.float64),
                   np.array([r.outer_d for r in rings], dtype=np.float64))


@njit(cache=True)
def pixel_on_ice(x, y, bx, by, k, wavelength, inner_d, outer_d):
    """libdistl's walk: the first ring (inner to outer) whose outer edge d <= the pixel's d decides, by
    whether the pixel's d is also <= its inner edge d."""
    d = pixel_d(float(x), float(y), bx, by, k, wavelength)
    for i in range(inner_d.size):
        if outer_d[i] <= d:
            return d <= inner_d[i]
    return False


# --- ice rings from spot counts (RingFinder) --------------------------------------------------------


def ring_finder(sorted_d: np.ndarray, target: int, coverage) -> tuple[np.ndarray, int]:
    """Spot-count ice rings (DISTL's RingFinder) over spots sorted by d, descending.

    Shells are made finer (twice the reciprocal volume each time) until there are about four spots a shell.
    Returns the mask of spots outside every ring and the number of rings that removed more than 10 spots.
    """
    t = sorted_d[target - 1]
    while True:
        shells = Shells(sorted_d, t, coverage)
        intervals, force_finer = _intervals(shells)
        if shells.adjusted.max() < 2.0 or sorted_d[0] <= t:
            break
        if not force_finer and len(shells) >= 0.25 * len(sorted_d):
            break
        t *= 2.0 ** (1.0 / 3.0)
    keep = np.ones(len(sorted_d), dtype=bool)
    counted = 0
    for low_res, high_res in intervals:
        inside = (sorted_d > high_res) & (sorted_d < low_res) & keep
        counted += inside.sum() > 10
        keep &= ~inside
    return keep, counted


def _intervals(shells: Shells) -> tuple[list[tuple[float, float]], bool]:
    """Shells clearly more populated than their neighbours, as merged (low-res, high-res) d intervals."""
    rows = len(shells)
    intervals: list[tuple[float, float]] = []
    force_finer = False
    if rows < 10:
        return intervals, force_finer
    pop = shells.adjusted
    for x in range(2, rows - 1):
        first, last = x - 4, x + 4
        if first < 0:
            first, last = 0, last - first
        if last >= rows:
            first, last = first - (last - rows + 1), rows - 1
        signal = pop[x - 1] + pop[x] + pop[x + 1]
        background = pop[first:last + 1].sum() - signal
        if signal / 3.0 > 2.0 * background / 6.0 and signal > 6.0 and \
                (signal - math.sqrt(signal)) / 3.0 > 2.0 * (background + math.sqrt(max(background, 0.0))) / 6.0:
            if x < 4:
                force_finer = True
            _add_interval(intervals, (float(shells.limit[x - 2]), float(shells.limit[x + 1])))
    return intervals, force_finer


def _add_interval(intervals: list[tuple[float, float]], new: tuple[float, float]) -> None:
    """Insert a (low-res, high-res) interval, merging with overlapping ones so all stay disjoint."""
    for i, old in enumerate(intervals):
        if new[1] > old[0] or new[0] < old[1]:
            continue
        if new[0] < old[0] and new[1] > old[1]:
            return
        if new[0] > old[0] and new[1] < old[1]:
            intervals[i] = new
            return
        if new[1] <= old[0] and new[0] > old[0]:
            intervals.pop(i)
            _add_interval(intervals, (new[0], old[1]))
            return
        if new[0] >= old[1]:
            intervals.pop(i)
            _add_interval(intervals, (old[0], new[1]))
            return
    intervals.append(new)
