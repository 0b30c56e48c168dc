"""Ice rings, found two ways as DISTL does: from pixel z-scores (libdistl) and from spot counts (RingFinder)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .background import Region, integer_beam, pixel_resolution
from .image import Geometry

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
    strength: float


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
    xs = np.arange(region.x0, region.x1 + 1, dtype=np.float64) - bx
    ys = np.arange(region.y0, region.y1 + 1, dtype=np.float64) - by
    r = np.sqrt(xs[:, None] ** 2 + ys[None, :] ** 2)
    ring_index = (r / RING_WIDTH).astype(np.int64)
    zr = z[region.x0:region.x1 + 1, region.y0:region.y1 + 1]
    keep = (ring_index >= first) & (ring_index <= last)
    index = ring_index[keep]
    values = zr[keep]
    order = np.lexsort((values, index))
    index, values = index[order], values[order]
    starts = np.searchsorted(index, np.arange(first, last + 2))
    rings: list[PixelRing] = []
    previous_iced = False
    for ring in range(first, last + 1):
        ring_z = values[starts[ring - first]:starts[ring - first + 1]]
        n = ring_z.size
        iced = n > 0 and ring_z[int(n * 0.45)] >= MEDIAN_Z_MIN and ring_z[int(n * 0.80)] >= UPPER_Z_MIN
        if iced:
            strength = float(ring_z[int(n * 0.20)])
            inner_r, outer_r2 = ring * RING_WIDTH, (ring + 1) * RING_WIDTH
            if previous_iced:
                last_ring = rings[-1]
                rings[-1] = PixelRing(last_ring.inner_r2, outer_r2 ** 2, last_ring.inner_d,
                                      _d_at_r2(geometry, outer_r2 ** 2), max(last_ring.strength, strength))
            else:
                rings.append(PixelRing(inner_r ** 2, outer_r2 ** 2, _d_at_r2(geometry, inner_r ** 2),
                                       _d_at_r2(geometry, outer_r2 ** 2), strength))
        previous_iced = iced
    return rings


def _radius_px(geometry: Geometry, d: float) -> float:
    """libdistl's inverse of its d formula: r in pixels at resolution d."""
    k = (geometry.pixel_size / geometry.distance) ** 2
    ratio = (geometry.wavelength / d) ** 2
    return math.sqrt(max(0.0, ((2.0 / (2.0 - ratio)) ** 2 - 1.0) / k))


def _d_at_r2(geometry: Geometry, r2: float) -> float:
    bx, _ = integer_beam(geometry)
    return float(pixel_resolution(geometry, bx + math.sqrt(r2), integer_beam(geometry)[1]))


def on_ice(rings: list[PixelRing], d) -> np.ndarray:
    """Whether pixels of resolution d lie on a pixel-level ice ring (libdistl's walk, vectorised)."""
    d = np.asarray(d, dtype=float)
    result = np.zeros(d.shape, dtype=bool)
    decided = np.zeros(d.shape, dtype=bool)
    for ring in rings:
        here = ~decided & (ring.outer_d <= d)
        result[here] = d[here] <= ring.inner_d
        decided |= here
    return result


# --- ice rings from spot counts (RingFinder) --------------------------------------------------------


def ring_intervals(limits: np.ndarray, adjusted: np.ndarray) -> list[tuple[float, float]]:
    """(low-res edge, high-res edge) d intervals whose shells hold clearly more spots than their
    neighbours; overlapping intervals merged.  Needs at least 10 shells."""
    rows = len(adjusted)
    intervals: list[tuple[float, float]] = []
    if rows < 10:
        return intervals
    for x in range(2, rows - 1):
        s = adjusted[x - 1] + adjusted[x] + adjusted[x + 1]
        lo = min(max(0, x - 4), rows - 9)
        window = adjusted[lo:lo + 9].sum()
        b = window - s
        if s / 3.0 > 2.0 * b / 6.0 and s > 6 and (s - math.sqrt(s)) / 3.0 > 2.0 * (b + math.sqrt(max(b, 0.0))) / 6.0:
            interval = (float(limits[x - 2]), float(limits[x + 1]))
            merged = False
            for i, (hi_d, lo_d) in enumerate(intervals):
                if interval[1] < hi_d and interval[0] > lo_d:
                    intervals[i] = (max(hi_d, interval[0]), min(lo_d, interval[1]))
                    merged = True
                    break
            if not merged:
                intervals.append(interval)
    return intervals
