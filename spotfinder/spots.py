"""Spots: local maxima, 8-connected assembly, screening, and per-spot shape quantities."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .background import Classification, Region
from .params import Settings

EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Spots:
    """Columns of per-spot values, in libdistl's order (by peak position, slow then fast)."""

    peak_x: np.ndarray  # max pixel, slow
    peak_y: np.ndarray  # max pixel, fast
    area: np.ndarray  # body pixel count
    nmaxima: np.ndarray
    intensity: np.ndarray  # peak z-score (float32 as libdistl keeps it)
    body: list[tuple[np.ndarray, np.ndarray]]  # body pixel coordinates, scan order
    wts: list[np.ndarray]  # value - local background over the body (float32)
    bkg: list[np.ndarray]  # local background over the body (float32)

    def __len__(self) -> int:
        return len(self.area)

    def take(self, keep) -> Spots:
        """The spots selected by a boolean mask or index array, keeping their order."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=int)
        return Spots(self.peak_x[idx], self.peak_y[idx], self.area[idx], self.nmaxima[idx], self.intensity[idx],
                     [self.body[i] for i in idx], [self.wts[i] for i in idx], [self.bkg[i] for i in idx])


def local_maxima(pixels: np.ndarray, z: np.ndarray, region: Region, settings: Settings, underload: int,
                 saturation: int) -> np.ndarray:
    """Boolean map of spot maxima (libdistl's rules, one pixel inside the region)."""
    h = settings.spot_height
    sub = (slice(region.x0 + 1, region.x1), slice(region.y0 + 1, region.y1))
    strong = z > h
    neighbour_max = ndimage.maximum_filter(pixels, footprint=np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]]),
                                           mode="nearest")
    strong_neighbours = ndimage.correlate(strong.astype(np.int8), np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]],
                                                                           dtype=np.int8), mode="constant")
    needed = min(4, settings.spot_area_min - 1) - 1
    maxima = np.zeros(pixels.shape, dtype=bool)
    maxima[sub] = (pixels[sub] >= saturation) | (
        strong[sub] & (pixels[sub] > underload) & (pixels[sub] >= neighbour_max[sub])
        & (strong_neighbours[sub] > needed))
    return maxima


def assemble(pixels: np.ndarray, cls: Classification, maxima: np.ndarray, region: Region, settings: Settings,
             border_on_ice=None) -> Spots:
    """8-connected components of {Z > h} in the region that hold a maximum, as spots.

    libdistl grows each spot by flood fill from its first unvisited maximum and pushes it to the front of
    its list, so spots come out in reverse scan order of their seeds.  Its peak is the brightest maximum,
    the last one in scan order among equals.  ``border_on_ice(x, y)`` tells which
    perimeter pixels lie on a pixel-level ice ring; a spot touching one is dropped.
    """
    inside = np.zeros(pixels.shape, dtype=bool)
    inside[region.x0:region.x1 + 1, region.y0:region.y1 + 1] = True
    grow = ((cls.z > settings.spot_height) & inside) | maxima
    labels, count = ndimage.label(grow, structure=EIGHT)
    seeded = np.unique(labels[maxima])
    seeded = seeded[seeded > 0]
    slices = ndimage.find_objects(labels)
    records = []
    for label in seeded:
        sx, sy = slices[label - 1]
        box = labels[sx, sy] == label
        bx, by = np.nonzero(box)
        bx, by = bx + sx.start, by + sy.start
        if border_on_ice is not None:
            ring = ndimage.binary_dilation(np.pad(box, 1), structure=EIGHT) & ~np.pad(box, 1)
            rx, ry = np.nonzero(ring)
            if np.any(border_on_ice(rx + sx.start - 1, ry + sy.start - 1)):
                continue
        is_max = maxima[bx, by]
        mx, my = bx[is_max], by[is_max]
        values = pixels[mx, my]
        peak = len(values) - 1 - int(np.argmax(values[::-1]))  # the last of equal maxima in scan order
        px, py = int(mx[peak]), int(my[peak])
        records.append(((int(mx[0]), int(my[0])), px, py, bx, by, int(is_max.sum())))
    records.sort(key=lambda r: r[0], reverse=True)
    z, mean = cls.z, cls.local_mean
    return Spots(
        peak_x=np.array([r[1] for r in records], dtype=int),
        peak_y=np.array([r[2] for r in records], dtype=int),
        area=np.array([r[3].size for r in records], dtype=int),
        nmaxima=np.array([r[5] for r in records], dtype=int),
        intensity=np.array([z[r[1], r[2]] for r in records], dtype=np.float32),
        body=[(r[3], r[4]) for r in records],
        wts=[(pixels[r[3], r[4]] - mean[r[3], r[4]]).astype(np.float32) for r in records],
        bkg=[mean[r[3], r[4]] for r in records],
    )


def percentile_index(n: int, p: float) -> int:
    return int((n - 1) * p)


def screen(spots: Spots, settings: Settings) -> Spots:
    """libdistl's screening: too small, too large, or an outlying peak height."""
    spots = spots.take(spots.area >= settings.spot_area_min)
    if len(spots) == 0:
        return spots
    ordered = np.sort(spots.intensity)
    n = len(ordered)
    p05, p50, p95 = (float(ordered[percentile_index(n, p)]) for p in (0.05, 0.50, 0.95))
    cap = p50 + settings.peak_factor * (p95 - p05)
    return spots.take((spots.intensity <= cap) & (spots.area <= settings.spot_area_max))


def compact(spots: Spots) -> np.ndarray:
    """DISTL's compactness filter: enough 8-neighbour pairs among the body pixels."""
    small = {8: 12, 7: 9, 6: 7, 5: 5, 4: 4, 3: 2, 2: 0, 1: -1}
    keep = np.zeros(len(spots), dtype=bool)
    for i, (bx, by) in enumerate(spots.body):
        cells = set(zip(bx.tolist(), by.tolist()))
        edges = sum((x, y + 1) in cells for x, y in cells) + sum((x + 1, y) in cells for x, y in cells) \
            + sum((x + 1, y + 1) in cells for x, y in cells) + sum((x + 1, y - 1) in cells for x, y in cells)
        n = len(cells)
        keep[i] = edges / n > 2.0 if n >= 9 else edges > small[n]
    return keep


@dataclass
class Shapes:
    """Per-spot shape quantities from the weighted body (libdistl's spot_shapes)."""

    com_x: np.ndarray
    com_y: np.ndarray
    a: np.ndarray  # semi-major axis
    b: np.ndarray  # semi-minor axis
    eccentricity: np.ndarray
    skewness: np.ndarray
    major_dir: np.ndarray  # (n, 2) unit vector along the major axis (x, y)
    majoraxis: np.ndarray  # unweighted major axis length in pixels


def shapes(spots: Spots) -> Shapes:
    n = len(spots)
    out = {k: np.zeros(n) for k in ("com_x", "com_y", "a", "b", "eccentricity", "skewness", "majoraxis")}
    direction = np.zeros((n, 2))
    for i, ((bx, by), w) in enumerate(zip(spots.body, spots.wts)):
        w = w.astype(np.float64)
        total = w.sum()
        cx, cy = np.dot(w, bx) / total, np.dot(w, by) / total
        dx, dy = bx - cx, by - cy
        sxx, syy, sxy = np.dot(w, dx * dx), np.dot(w, dy * dy), np.dot(w, dx * dy)
        tensor = np.array([[syy, -sxy], [-sxy, sxx]])
        evals, evecs = np.linalg.eigh(tensor)
        l0, l1 = evals[1], evals[0]
        a = np.sqrt(4.0 * max(1.0, l0) / total)
        out["com_x"][i], out["com_y"][i] = cx, cy
        out["a"][i] = a
        out["b"][i] = np.sqrt(4.0 * max(1.0, l1) / total)
        out["eccentricity"][i] = np.sqrt(1.0 - min(1.0, l1 / l0)) if l0 > 0 else 0.0
        distance = np.hypot(spots.peak_x[i] - cx, spots.peak_y[i] - cy)
        out["skewness"][i] = int(distance) / a
        direction[i] = evecs[:, 0]
        out["majoraxis"][i] = _majoraxis(bx, by)
    return Shapes(major_dir=direction, **out)


def _majoraxis(bx: np.ndarray, by: np.ndarray) -> float:
    """Unweighted extent: twice the largest distance from the centroid (libdistl's majoraxis)."""
    if bx.size < 2:
        return 1.0
    dx, dy = bx - bx.mean(), by - by.mean()
    dist = np.hypot(dx, dy)
    far = int(np.argmax(dist))
    major = 2.0 * dist[far]
    if major == 0:
        return 1.0
    ux, uy = dx[far] / dist[far], dy[far] / dist[far]
    minor = 4.0 * np.max(np.abs(ux * dy - uy * dx)) / major
    return max(major, minor)
