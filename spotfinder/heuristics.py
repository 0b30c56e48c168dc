"""DISTL's Python filter chain ("practical heuristics"): ice, resolution, shape and close-spot filters,
saturation and the maximum unit cell.  Subsets are index arrays into the full spot list."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import ice, resolution
from .geometry import Geometry, radius_mm, resolution_at_mm, resolutions_at_mm
from .neighbours import nearest_others
from .params import Settings
from .spots import Shapes, Spots
from .sums import running_mean_sd

MAX_TOLERANCE = 1.5  # max cell = 1.5 x the d of the typical neighbour distance


@dataclass
class Chain:
    """Named subsets and the numbers derived from them."""

    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    d: np.ndarray | None = None  # each spot's resolution as the filters saw it
    ice_rings: int = 0
    method2: float | None = None
    shells_d: np.ndarray | None = None  # d of the ice-free spots, sorted descending
    target_bins: int = 0
    eccentricity: float | None = None  # mean over the unimodal spots, when there are more than 2
    neighbours: np.ndarray | None = None  # nearest-neighbour distance (mm) of each inlier
    overloaded: int = 0
    saturation_top: int = 0
    saturation_fraction: float = 0.0


def spot_radius_mm(spots: Spots, g: Geometry, pixel_size: float) -> np.ndarray:
    """Distance (mm) of each spot's max pixel from the beam, at least one pixel, as DISTL's spot filter agent
    (C++) measures it for its radius and ice-ring tests and its d: ``sqrt(dx * dx + dy * dy)`` with the
    image's own pixel size (``pixel_size``: 0.17200000000000001 mm from a PILATUS header's 172e-6 m, where
    the Python layer's ``g`` has the "%f" 0.172) and the Python layer's beam.  Checked bit for bit against
    DISTL's d and radius test (tests/test_core_sum_order.py)."""
    dx = spots.peak_x * pixel_size - g.beam_x
    dy = spots.peak_y * pixel_size - g.beam_y
    return np.maximum(pixel_size, np.sqrt(dx * dx + dy * dy))


def spot_resolution(spots: Spots, shape: Shapes, g: Geometry, pixel_size: float) -> np.ndarray:
    """Each spot's d as DISTL's filters see it: from the max pixel on a flat detector; with the detector
    swung out by 2-theta, from the centre of mass through the rotated detector (precompute_resolution).

    Quirk kept: DISTL places the spot at beam - position (camera convention 1 flips both axes), not
    position - beam, before rotating it; the numbers it prints come from that.

    Both are DISTL's bit for bit: the image's own pixel size, sqrt of the squares and math's trigonometry
    (numpy's arccos, sin and norm differ in the last bit now and then).
    """
    if len(spots) == 0:
        return np.zeros(0)
    if g.twotheta == 0:
        return resolutions_at_mm(g, spot_radius_mm(spots, g, pixel_size))
    tt = g.twotheta * math.pi / 180.0  # DISTL's radians (math.radians rounds otherwise now and then)
    cos, sin = math.cos(tt), math.sin(tt)
    film_x, film_y = g.beam_x - shape.com_x * pixel_size, g.beam_y - shape.com_y * pixel_size
    lab_x, lab_z = cos * film_x + sin * g.distance, -sin * film_x + cos * g.distance
    length = np.sqrt(lab_x * lab_x + film_y * film_y + lab_z * lab_z)
    two_theta = np.array(list(map(math.acos, (lab_z / length).tolist())), dtype=float)
    sine = np.array(list(map(math.sin, (two_theta / 2.0).tolist())), dtype=float)
    return g.wavelength / (2.0 * sine)


def run(spots: Spots, shape: Shapes, g: Geometry, settings: Settings, rings: list[ice.PixelRing],
        pixels: np.ndarray, coverage: resolution.DetectorCoverage, pixel_size: float) -> Chain:
    """The filter chain on the Python layer's geometry ``g``; ``pixel_size`` is the image's own pixel size,
    which DISTL's spot filter agent measures radii and d with."""
    chain = Chain()
    n = len(spots)
    everything = np.arange(n)
    chain.subsets["spots_total"] = everything
    r = spot_radius_mm(spots, g, pixel_size)
    d = spot_resolution(spots, shape, g, pixel_size)
    chain.d = d

    on_ring = np.zeros(n, dtype=bool)
    for ring in rings:
        inner = pixel_size * math.sqrt(ring.inner_r2) - 0.4  # the agent's test: it has no other pixel size
        outer = pixel_size * math.sqrt(ring.outer_r2) + 0.4
        on_ring |= (r > inner) & (r < outer)
    chain.ice_rings = len(rings)
    non_ice = everything[~on_ring]
    chain.subsets["spots_non-ice"] = non_ice
    if g.twotheta == 0:
        hi_pass = non_ice[r[non_ice] > radius_mm(g, settings.res_inner)]
    else:
        hi_pass = non_ice[d[non_ice] < settings.res_inner]
    chain.subsets["hi_pass_resolution_spots"] = hi_pass
    current = hi_pass

    # DISTL's (unstable) resolution sort: every later subset keeps its order, tied spots included, and
    # DISTL's tables, sums and listing walk them in it
    order = resolution.distl_sort_descending(hi_pass, d)
    count = len(order)
    target = max(resolution.MIN_BIN_COUNT, count // 20)
    chain.target_bins = target
    if count >= target:
        sorted_d = d[order]
        keep, rings_found = ice.ring_finder(sorted_d, target, coverage)
        chain.ice_rings += rings_found
        ice_free = order[keep]
        chain.subsets["ice_free_resolution_spots"] = ice_free
        current = ice_free
        if len(ice_free) >= target:
            free_d = d[ice_free]
            chain.shells_d = free_d
            shells = resolution.Shells(free_d, free_d[target - 1], coverage)
            chain.method2 = resolution.method2(shells, target, settings.method2_ratio, settings.res_outer)
            if g.twotheta == 0:
                lo_pass = ice_free[r[ice_free] < radius_mm(g, chain.method2)]
            else:
                lo_pass = ice_free[d[ice_free] > chain.method2]
            chain.subsets["lo_pass_resolution_spots"] = lo_pass
            current = lo_pass
    chain.subsets["spots_resolution"] = current

    _saturation(chain, spots, current, pixels, g)

    unimodal = current[(spots.nmaxima[current] <= settings.bumpiness) & (spots.area[current] > settings.spot_area_min)]
    chain.subsets["spots_unimodal"] = unimodal
    inliers = np.zeros(0, dtype=int)
    neighbours = np.zeros(0)
    if len(unimodal) > 2:
        inliers, neighbours = _quality(spots, shape, unimodal, chain, g, settings.overlap)
    chain.subsets["spots_inlier"] = inliers
    chain.neighbours = neighbours
    return chain


def _saturation(chain: Chain, spots: Spots, subset: np.ndarray, pixels: np.ndarray, g: Geometry) -> None:
    peaks = pixels[spots.peak_x[subset], spots.peak_y[subset]].astype(np.int64)
    chain.overloaded = int(np.count_nonzero(peaks >= int(g.saturation)))
    top = np.sort(peaks)[::-1][:50]
    chain.saturation_top = len(top)
    chain.saturation_fraction = 0.0 if len(top) < 2 else float(top.sum()) / len(top) / g.saturation


def _quality(spots: Spots, shape: Shapes, unimodal: np.ndarray, chain: Chain, g: Geometry, overlap: float):
    """Skewness, intensity and close-spot filters over the unimodal spots; inliers and their NN distances."""
    i_ave, i_std = running_mean_sd(spots.intensity[unimodal].astype(np.float64))
    a_ave, _ = running_mean_sd(spots.area[unimodal].astype(np.float64))
    e_ave, _ = running_mean_sd(shape.eccentricity[unimodal])
    k_ave, k_std = running_mean_sd(shape.skewness[unimodal])
    chain.eccentricity = e_ave
    low_skew = unimodal[shape.skewness[unimodal] <= min(0.45, 2.0 * k_std + k_ave)]
    chain.subsets["spots_low_skew"] = low_skew
    z = spots.intensity[low_skew].astype(np.float64)
    good = low_skew[(z > i_ave - 5.0 * i_std) & (z < i_ave + 5.0 * i_std) & (z < g.saturation)]
    chain.subsets["spots_good_intensity"] = good

    everything = np.column_stack([spots.peak_x, spots.peak_y]).astype(float)
    nearest, dist2 = nearest_others(everything)
    nn_index, neighbours = nearest[good], g.pixel_size * np.sqrt(dist2[good])
    vectors = _neighbour_vector_maxima(everything, nearest, a_ave, len(good))
    few = len(vectors) <= 3
    keep = _compact(shape, good, vectors) if 0 < len(vectors) and few else np.ones(len(good), dtype=bool)
    # int() of each component, as DISTL truncates the vector to the nearest neighbour
    s = (everything[nn_index] - everything[good]).astype(np.int64)
    close = shape.majoraxis[good] * overlap > resolution.hypots(s[:, 0], s[:, 1])
    if few:
        close &= ~np.any([(np.abs(s[:, 0] - vx) <= 1) & (np.abs(s[:, 1] - vy) <= 1) for vx, vy in vectors], axis=0)
    keep &= ~close
    return good[keep], neighbours[keep]


def _neighbour_vector_maxima(data: np.ndarray, nearest: np.ndarray, ave_area: float, n_current: int):
    """Peaks of the histogram of nearest-neighbour vectors: candidate lattice vectors (half-plane), as
    (x, y) in the order of DISTL's scan (x outer, y inner)."""
    limit = int(math.sqrt(20.0 * ave_area) / 2.0) + 1
    size = 2 * limit + 1
    v = (data[nearest] - data).astype(np.int64)  # int(): truncation toward zero
    v = v[(np.abs(v) <= limit).all(axis=1)]
    cells = np.concatenate([(v[:, 0] + limit) * size + v[:, 1] + limit, (limit - v[:, 0]) * size + limit - v[:, 1]])
    plot = np.bincount(cells, minlength=size * size).reshape(size, size)
    highest = plot[1:-1, 1:-1].max() if plot.shape[0] > 2 else 0

    def shifted(dx: int, dy: int) -> np.ndarray:  # plot at (x + dx, y + dy) for every inner (x, y)
        return plot[1 + dx:size - 1 + dx, 1 + dy:size - 1 + dy]

    c = shifted(0, 0)
    peak = (c > 0.2 * highest) & (c > 0.05 * n_current)
    for dx, dy in ((0, 1), (1, 1), (1, 0), (1, -1)):  # ahead: ties allowed
        peak &= c >= shifted(dx, dy)
    for dx, dy in ((0, -1), (-1, -1), (-1, 0), (-1, 1)):  # behind: strictly less
        peak &= c > shifted(dx, dy)
    x, y = np.meshgrid(np.arange(-limit + 1, limit), np.arange(-limit + 1, limit), indexing="ij")
    peak &= (y > 0) | ((y == 0) & (x > 0))
    return [(int(x[i, j]), int(y[i, j])) for i, j in zip(*np.nonzero(peak))]


def _compact(shape: Shapes, subset: np.ndarray, vectors) -> np.ndarray:
    """False where the spot's ellipse is as wide as a candidate lattice vector along it (two spots in one).

    The squares go through pow(), as ``x ** 2`` on a float does: in the last bit pow(x, 2) is not always
    x * x, and numpy's ``**`` on arrays multiplies.
    """
    a, b = shape.a[subset], shape.b[subset]
    ux, uy = shape.major_dir[subset, 0], shape.major_dir[subset, 1]
    compact = np.ones(len(subset), dtype=bool)
    for vx, vy in vectors:
        length2 = vx * vx + vy * vy
        cos = (ux * vx + uy * vy) / math.sqrt(length2)
        cos2 = np.minimum(cos * cos, 1.0)
        sin = np.sqrt(1.0 - cos2)
        width2 = 4.0 * (a * a * b * b / (_square(a * sin) + _square(b * cos)))
        compact &= ~(width2 >= length2)
    return compact


def _square(x: np.ndarray) -> np.ndarray:
    """pow(v, 2) element by element."""
    return np.array([math.pow(v, 2.0) for v in x.tolist()], dtype=float)


def max_unit_cell(neighbours: np.ndarray, g: Geometry, neighbour_bins: int) -> float | None:
    """1.5 x the d of the most probable (or 5th-percentile) neighbour distance among the inliers."""
    n = len(neighbours)
    if n <= 2:
        return None
    mean, _ = running_mean_sd(neighbours)  # in the inliers' order, as DISTL's scitbx_stats
    fine = max(g.pixel_size / 2.0, mean / (1.0 + n / neighbour_bins))
    low = float(np.min(neighbours))
    bins = int(mean * 4 / fine)
    histogram = np.zeros(bins, dtype=int)
    index = ((neighbours - low) / fine).astype(int)
    np.add.at(histogram, index[index < bins], 1)
    probable = low + (int(np.argmax(histogram)) + 0.5) * fine
    p5 = float(np.sort(neighbours)[int(0.05 * n)])
    return MAX_TOLERANCE * max(resolution_at_mm(g, probable), resolution_at_mm(g, p5))
