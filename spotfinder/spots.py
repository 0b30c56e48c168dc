"""Spots: local maxima, 8-connected assembly, screening, and per-spot shape quantities."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .background import SATURATED, STRONG, Classification, Region
from .ice import IceTest, pack_chunk, pixel_on_ice, popcount
from .jit import njit
from .params import Settings

@dataclass
class Spots:
    """Per-spot columns in libdistl's order, and the body pixels of all spots end to end.

    Spot ``i`` owns the flat body arrays from ``starts[i]`` to ``starts[i + 1]``; keeping them flat lets
    every per-spot sum be one ``reduceat`` instead of a Python loop.
    """

    peak_x: np.ndarray  # max pixel, slow
    peak_y: np.ndarray  # max pixel, fast
    area: np.ndarray  # body pixel count
    nmaxima: np.ndarray
    intensity: np.ndarray  # peak z-score (float32 as libdistl keeps it)
    starts: np.ndarray  # len(spots) + 1 offsets into the body arrays
    body_x: np.ndarray
    body_y: np.ndarray
    values: np.ndarray  # the frame's value at each body pixel
    bkg: np.ndarray  # local background (float32)

    def __len__(self) -> int:
        return len(self.area)

    @property
    def owner(self) -> np.ndarray:
        """The spot index of every body pixel."""
        return np.repeat(np.arange(len(self)), self.area)

    @property
    def heights(self) -> np.ndarray:
        """Each body pixel's height above its local background, DISTL's ``wts``: value minus the float32 plane
        value, in double (rounded to float32 they are up to ~1e-3 off: enough to change a printed digit of a
        signal, a listing or a centre of mass now and then; checked pixel by pixel against DISTL's)."""
        return self.values - self.bkg.astype(np.float64)

    def per_spot_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum of a body-pixel column per spot, in double precision, added pixel by pixel in body order as
        DISTL's loops and flex.sum do (numpy's sums add pairwise, which can round the last bit otherwise)."""
        return _sums_in_order(np.ascontiguousarray(values, dtype=np.float64), self.starts)

    @property
    def signal(self) -> np.ndarray:
        """Integrated signal above local background per spot."""
        return self.per_spot_sum(self.heights)

    @property
    def background(self) -> np.ndarray:
        return self.per_spot_sum(self.bkg)

    @property
    def peak_height(self) -> np.ndarray:
        """The largest height of each spot (``flex.max(spot.wts)``)."""
        if len(self) == 0:
            return np.zeros(0)
        return np.maximum.reduceat(self.heights, self.starts[:-1])

    def body(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Spot i's body pixels (slow, fast), in fill order."""
        lo, hi = self.starts[i], self.starts[i + 1]
        return self.body_x[lo:hi], self.body_y[lo:hi]

    def take(self, keep) -> Spots:
        """The spots selected by a boolean mask or index array, keeping their order."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(int)
        area = self.area[idx]
        starts = np.concatenate(([0], np.cumsum(area))).astype(np.int64)
        pixels = np.repeat(self.starts[idx] - starts[:-1], area) + np.arange(starts[-1])
        return Spots(self.peak_x[idx], self.peak_y[idx], area, self.nmaxima[idx], self.intensity[idx], starts,
                     self.body_x[pixels], self.body_y[pixels], self.values[pixels], self.bkg[pixels])


@njit(cache=True)
def _sums_in_order(values, starts):
    """The sum of values[starts[i]:starts[i + 1]] for each i, left to right."""
    sums = np.zeros(starts.size - 1)
    for i in range(starts.size - 1):
        total = 0.0
        for k in range(starts[i], starts[i + 1]):
            total += values[k]
        sums[i] = total
    return sums


@dataclass
class Maxima:
    """Spot maxima: a map of the frame, their coordinates in scan order, and a bound on how many pixels
    spot growth can collect (the strong or saturated pixels)."""

    map: np.ndarray
    x: np.ndarray
    y: np.ndarray
    growth_bound: int


def local_maxima(pixels: np.ndarray, flags: np.ndarray, region: Region, settings: Settings,
                 underload: int) -> Maxima:
    """Spot maxima (libdistl's rules, one pixel inside the region), from the classification's pixel classes.

    A maximum is a saturated pixel (its SATURATED class: at least the frame's saturation), or a strong pixel
    (Z > h) above ``underload``, at least as bright as its 8 neighbours, with more than
    ``min(4, area_min - 1) - 1`` strong neighbours.
    """
    needed = min(4, settings.spot_area_min - 1) - 1
    found = np.zeros(pixels.shape, dtype=np.bool_)
    xs, ys, flagged = _maxima(pixels, flags, found, region.x0 + 1, region.x1 - 1, region.y0 + 1, region.y1 - 1,
                              underload, needed)
    # maxima are looked for one pixel inside the region, spots grow up to its edge: add that edge's pixels
    edge = 2 * (region.x1 - region.x0 + region.y1 - region.y0 + 2)
    return Maxima(found, xs, ys, flagged + edge)


@njit(cache=True)
def _maxima(pixels, flags, found, x0, x1, y0, y1, underload, needed):
    """Only the strong or saturated pixels get the full test.  Also counts them: a bound on how many pixels
    spot growth can collect.

    Each row is scanned 64 pixels at a time: their classes are packed into a bit word (a loop of literal
    length, which vectorises) and only its set bits, in column order, are visited.  Testing every byte on
    its own cost ~4 ms a 6M frame, the packing ~1 (the whole kernel 5.4 -> 2.9 ms).  A pixel's classes are
    asked first, its value and its neighbours' last: the classes (a byte a pixel) were just written, the
    pixels around a strong one are most often not in the cache, and most strong pixels have too few strong
    neighbours (in an analysis of a 6M frame the maxima took 3.4 ms reading every strong pixel's value and
    neighbours first, 1.2 ms now, 2-core EPYC)."""
    # room for every pixel: untouched pages of np.empty cost nothing, and fixed arrays keep the loop fast
    xs = np.empty((x1 - x0 + 1) * (y1 - y0 + 1), dtype=np.int64)
    ys = np.empty_like(xs)
    n = 0
    flagged = 0
    for x in range(x0, x1 + 1):
        flag_row = flags[x, y0:y1 + 1]
        above, row, below = pixels[x - 1], pixels[x], pixels[x + 1]
        flags_above, flags_row, flags_below = flags[x - 1], flags[x], flags[x + 1]
        for start in range(0, flag_row.size, 64):
            chunk = flag_row[start:start + 64]
            if chunk.size == 64:  # a literal trip count: LLVM unrolls and vectorises it
                word = pack_chunk(chunk, 64, STRONG | SATURATED)
            else:
                word = pack_chunk(chunk, chunk.size, STRONG | SATURATED)
            while word:
                j = start + popcount(word ^ (word - np.uint64(1))) - 1  # the lowest set bit
                word &= word - np.uint64(1)
                flagged += 1
                y = np.uint64(y0 + j)  # unsigned: no wrap-around of negative indices
                if not flag_row[j] & SATURATED:
                    if not flag_row[j] & STRONG or _strong_neighbours(flags_above, flags_row, flags_below, y) <= needed:
                        continue
                    value = row[y]
                    if value <= underload or _brighter_neighbour(above, row, below, y, value):
                        continue
                found[x, y] = True
                xs[n], ys[n] = x, y
                n += 1
    return xs[:n].copy(), ys[:n].copy(), flagged


@njit(cache=True, inline="always")
def _strong_neighbours(flags_above, flags_row, flags_below, y):
    """How many of the 8 neighbours of pixel y of a row are strong (their classes in the rows above, its own
    and below)."""
    left, right = y - np.uint64(1), y + np.uint64(1)
    return (_strong(flags_above[left]) + _strong(flags_above[y]) + _strong(flags_above[right])
            + _strong(flags_row[left]) + _strong(flags_row[right])
            + _strong(flags_below[left]) + _strong(flags_below[y]) + _strong(flags_below[right]))


@njit(cache=True, inline="always")
def _brighter_neighbour(above, row, below, y, value):
    """Whether one of the 8 neighbours of pixel y of ``row`` is brighter than ``value``.  No branch per
    neighbour: which way each test goes is unpredictable, and a mispredicted one stalls the loads after it."""
    left, right = y - np.uint64(1), y + np.uint64(1)
    return ((above[left] > value) | (above[y] > value) | (above[right] > value) | (row[left] > value)
            | (row[right] > value) | (below[left] > value) | (below[y] > value) | (below[right] > value))


@njit(cache=True, inline="always")
def _strong(pixel_flags):
    return np.int64((pixel_flags & STRONG) != 0)


# libdistl's flood-fill neighbour order (fast offset 1, 0, -1; within each, slow offset 1, 0, -1).  It
# decides which of two equally bright maxima becomes a spot's peak; this order reproduces every tie in
# the reference frames.
FILL_DX = np.array([1, 0, -1, 1, -1, 1, 0, -1])
FILL_DY = np.array([1, 1, 1, 0, 0, -1, -1, -1])


@njit(cache=True)
def _grow(flags, pixels, maxima, visited, seeds_x, seeds_y, capacity, x0, x1, y0, y1, fill_dx, fill_dy, ice):
    """Depth-first flood fill (8-connected, strong pixels, inside the region) from each not yet visited
    maximum, in the given seed order, pixels recorded as first visited.

    Returns the body pixels spot after spot, the spot of each, each spot's peak (the first visited of its
    brightest maxima), and whether a perimeter pixel (a neighbour that failed the test) lies on an ice
    ring.  ``ice`` is (bx, by, k, wavelength, inner_d, outer_d) of the pixel-level rings.  As in libdistl,
    perimeter pixels are marked visited too (so a perimeter pixel counts for the first spot that meets it
    only), pixels outside the region are no perimeter, and a seed that fails the test (a saturated maximum
    with a low z) makes no spot.
    """
    bx, by, k, wavelength, inner_d, outer_d = ice
    capacity = capacity + len(seeds_x)  # every body pixel is strong
    out_x = np.empty(capacity, dtype=np.int64)
    out_y = np.empty(capacity, dtype=np.int64)
    out_spot = np.empty(capacity, dtype=np.int64)
    stack_x = np.empty(capacity, dtype=np.int64)
    stack_y = np.empty(capacity, dtype=np.int64)
    stack_d = np.empty(capacity, dtype=np.int64)
    peaks = np.empty(len(seeds_x), dtype=np.int64)
    on_ice = np.zeros(len(seeds_x), dtype=np.bool_)
    n = 0
    spots = 0
    for i in range(len(seeds_x)):
        sx, sy = seeds_x[i], seeds_y[i]
        if visited[sx, sy]:
            continue
        visited[sx, sy] = True
        if not flags[sx, sy] & STRONG:
            continue
        spots += 1
        best = pixels[sx, sy]
        peaks[spots - 1] = n
        out_x[n], out_y[n], out_spot[n] = sx, sy, spots - 1
        n += 1
        stack_x[0], stack_y[0], stack_d[0] = sx, sy, 0
        top = 1
        while top > 0:
            d = stack_d[top - 1]
            if d == 8:
                top -= 1
                continue
            stack_d[top - 1] = d + 1
            nx, ny = stack_x[top - 1] + fill_dx[d], stack_y[top - 1] + fill_dy[d]
            if not (x0 <= nx <= x1 and y0 <= ny <= y1) or visited[nx, ny]:
                continue
            visited[nx, ny] = True
            if not flags[nx, ny] & STRONG:
                if inner_d.size and not on_ice[spots - 1]:
                    on_ice[spots - 1] = pixel_on_ice(nx, ny, bx, by, k, wavelength, inner_d, outer_d)
                continue
            out_x[n], out_y[n], out_spot[n] = nx, ny, spots - 1
            if maxima[nx, ny] and pixels[nx, ny] > best:
                best = pixels[nx, ny]
                peaks[spots - 1] = n
            n += 1
            stack_x[top], stack_y[top], stack_d[top] = nx, ny, 0
            top += 1
    return out_x[:n], out_y[:n], out_spot[:n], peaks[:spots], on_ice[:spots]


def assemble(pixels: np.ndarray, cls: Classification, maxima: Maxima, region: Region, settings: Settings,
             ice: IceTest | None = None) -> Spots:
    """8-connected components of {Z > h} in the region that hold a maximum, as spots.

    libdistl visits the maxima in reverse scan order and grows a spot from each one not yet taken, so the
    spots come out in that order, their body pixels in fill order.  A spot with a perimeter pixel on a
    pixel-level ice ring is dropped.
    """
    rings = (0, 0, 0.0, 1.0, np.zeros(0), np.zeros(0)) if ice is None else \
        (ice.bx, ice.by, ice.k, ice.wavelength, ice.inner_d, ice.outer_d)
    visited = np.zeros(pixels.shape, dtype=np.bool_)
    bx, by, owner, peak, on_ice = _grow(cls.flags, pixels, maxima.map, visited, maxima.x[::-1].copy(),
                                        maxima.y[::-1].copy(), maxima.growth_bound, region.x0, region.x1, region.y0,
                                        region.y1, FILL_DX, FILL_DY, rings)
    count = len(peak)
    area = np.bincount(owner, minlength=count)
    starts = np.concatenate(([0], np.cumsum(area))).astype(np.int64)
    nmaxima = np.bincount(owner, weights=maxima.map[bx, by], minlength=count).astype(int)
    bkg = cls.local_background(bx, by)
    spots = Spots(peak_x=bx[peak], peak_y=by[peak], area=area, nmaxima=nmaxima,
                  intensity=cls.z_at(bx[peak], by[peak]), starts=starts, body_x=bx, body_y=by,
                  values=pixels[bx, by], bkg=bkg)
    return spots.take(~on_ice) if on_ice.any() else spots


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
    for i in range(len(spots)):
        bx, by = spots.body(i)
        cells = set(zip(bx.tolist(), by.tolist()))
        edges = sum((x + dx, y + dy) in cells for x, y in cells for dx, dy in ((0, 1), (1, 0), (1, 1), (1, -1)))
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
    """Centre of mass, inertia ellipse, eccentricity, skewness and extent of every spot at once."""
    n = len(spots)
    if n == 0:
        empty = np.zeros(0)
        return Shapes(empty, empty, empty, empty, empty, empty, np.zeros((0, 2)), empty)
    owner = spots.owner
    x, y = spots.body_x.astype(np.float64), spots.body_y.astype(np.float64)
    w = spots.heights
    total = spots.per_spot_sum(w)
    cx = spots.per_spot_sum(w * x) / total
    cy = spots.per_spot_sum(w * y) / total
    dx, dy = x - cx[owner], y - cy[owner]
    # scitbx's inertia terms: w * (dx * dx) and (w * dx) * dy, added pixel by pixel
    sxx, syy = spots.per_spot_sum(w * (dx * dx)), spots.per_spot_sum(w * (dy * dy))
    sxy = spots.per_spot_sum(w * dx * dy)
    tensor = np.stack([np.stack([syy, -sxy], axis=-1), np.stack([-sxy, sxx], axis=-1)], axis=-2)
    evals, evecs = np.linalg.eigh(tensor)
    l0, l1 = evals[:, 1], evals[:, 0]
    a = np.sqrt(4.0 * np.maximum(1.0, l0) / total)
    b = np.sqrt(4.0 * np.maximum(1.0, l1) / total)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l0 > 0, np.sqrt(1.0 - np.minimum(1.0, l1 / l0)), 0.0)
    px, py = spots.peak_x - cx, spots.peak_y - cy
    distance = np.sqrt(px * px + py * py)  # scitbx's vec2 length, truncated below: not hypot's last bit
    skewness = np.trunc(distance) / a
    # eigenvector of the smaller eigenvalue of the inertia tensor: the major axis
    return Shapes(cx, cy, a, b, eccentricity, skewness, evecs[:, :, 0], _majoraxis(spots, x, y, owner))


def _majoraxis(spots: Spots, x: np.ndarray, y: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Unweighted extent: twice the largest distance from the centroid, or the scaled width across it if
    wider (libdistl's majoraxis); 1 for spots of fewer than 2 pixels."""
    count = spots.area.astype(np.float64)
    ux, uy = spots.per_spot_sum(x) / count, spots.per_spot_sum(y) / count
    dx, dy = x - ux[owner], y - uy[owner]
    dist = np.hypot(dx, dy)
    far_dist = np.maximum.reduceat(dist, spots.starts[:-1])
    is_far = np.flatnonzero(dist == far_dist[owner])
    _, first = np.unique(owner[is_far], return_index=True)
    far = is_far[first]
    major = 2.0 * far_dist
    with np.errstate(divide="ignore", invalid="ignore"):
        vx, vy = dx[far] / far_dist, dy[far] / far_dist
        cross = np.abs(vx[owner] * dy - vy[owner] * dx)
        minor = 4.0 * np.maximum.reduceat(cross, spots.starts[:-1]) / major
    result = np.maximum(major, minor)
    result[(spots.area < 2) | (major == 0)] = 1.0
    return result
