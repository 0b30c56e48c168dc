"""Resolution estimates: Method 1 (Zhang et al. 2006), equal-volume shells, Method 2, and the bin tables."""
from __future__ import annotations

import functools
import math

import numpy as np

from .background import Region
from .geometry import Geometry, integer_beam, pixel_resolution, radii_mm, radius_mm
from .image import FrameError
from .sums import sequential_sum

METHOD1_NONE = 10.0  # Method 1's answer when there are too few spots
MIN_BIN_COUNT = 25  # DISTL's BinMin: the fewest spots in the first shell
VETTER_RUN = 10  # this many weak shells in a row end the Method 2 search
# Shells span target d / highest-resolution d < this, so fewer than its cube (125000: 3 s and 150 MB to make,
# 10^6 would take 33 s and 1.2 GB).  Real frames need at most a few thousand (1170 for 3604 spots on a 6M
# frame, a span of 10.5); 50 is the default low-resolution cut (50 A) over 1 A.
MAX_SHELL_SPAN = 50


def method1(spot_x: np.ndarray, spot_y: np.ndarray, geometry: Geometry, region: Region) -> float:
    """libdistl's imgresolution over spot max pixels, with the detector-corner correction."""
    n = len(spot_x)
    if n <= 10:
        return METHOD1_NONE
    nrings = min(40, max(10, n // 20))
    bx, by = integer_beam(geometry)
    r = np.hypot(spot_x - bx, spot_y - by)
    d = pixel_resolution(geometry, spot_x, spot_y)
    edges = np.array([bx - region.x0, region.x1 - bx, by - region.y0, region.y1 - by], dtype=float)
    inscribed = edges.min()
    copies = np.ones(n, dtype=int)
    for i in np.flatnonzero(r >= inscribed):
        closer = edges[edges < r[i]]
        angle = max(0.01, 2 * math.pi - sequential_sum(2.0 * np.arccos(closer / r[i])))
        copies[i] = int(2 * math.pi / angle)
    # The rings are quantiles of the d values with each spot repeated ``copies`` times (up to 628 for a spot
    # far from the beam); read from the cumulative copies over the sorted spots, never repeated in memory.
    order = np.argsort(d, kind="stable")
    ends = np.cumsum(copies[order])
    total = int(ends[-1])
    ring = np.empty(nrings)
    for k in range(nrings):
        ring[nrings - 1 - k] = d[order[np.searchsorted(ends, min(total - 1, int(k * total / nrings)), side="right")]]
    p = ring ** -3.0
    ks = np.arange(1, nrings)
    slope = np.concatenate(([-np.inf], (p[1:] - p[0]) / ks))
    best = int(np.argmax(slope))
    line = slope[best] * np.arange(best + 1) + p[0]
    gap = line - p[:best + 1]
    b = int(np.argmax(gap))
    sigma = float(np.std(gap))  # libdistl's own (C++, its source is not shipped): order not checked
    while b + 1 <= best and gap[b + 1] >= gap.max() - 0.5 * sigma:
        b += 1
    return float(ring[b])


class _Edge:
    """One detector edge seen from the beam: how much of a circle's angle around the beam falls on the
    detector's side of it."""

    def __init__(self, beam: tuple[float, float], left: tuple[float, float], right: tuple[float, float]):
        self.left = (left[0] - beam[0], left[1] - beam[1])
        self.right = (right[0] - beam[0], right[1] - beam[1])
        along = (self.left[0] - self.right[0], self.left[1] - self.right[1])
        length = math.hypot(*along)
        self.unit = (along[0] / length, along[1] / length)
        foot = -(self.right[0] * self.unit[0] + self.right[1] * self.unit[1])
        self.ortho = (self.right[0] + foot * self.unit[0], self.right[1] + foot * self.unit[1])
        self.handedness = _cross(self.right, self.left)
        # the parts that do not depend on the circle: a coverage table asks for hundreds of circles
        self.whole = self._angle(self.right, self.left)
        self.ortho_length = math.hypot(*self.ortho)
        self.left_length, self.right_length = math.hypot(*self.left), math.hypot(*self.right)

    def _angle(self, a: tuple[float, float], b: tuple[float, float]) -> float:
        """Angle from a to b, signed by the edge's handedness."""
        denominator = math.hypot(*a) * math.hypot(*b)
        if denominator == 0.0:
            return 0.0
        cosine = min(1.0, max(-1.0, (a[0] * b[0] + a[1] * b[1]) / denominator))
        angle = math.acos(cosine)
        return angle if self.handedness * _cross(a, b) >= 0.0 else -angle

    def __call__(self, radius: float) -> float:
        whole, ortho = self.whole, self.ortho_length
        if radius <= ortho:
            return whole
        eta = math.sqrt(radius * radius - ortho * ortho)
        at_left = (self.ortho[0] + eta * self.unit[0], self.ortho[1] + eta * self.unit[1])
        at_right = (self.ortho[0] - eta * self.unit[0], self.ortho[1] - eta * self.unit[1])
        true_left = at_left if self._angle(at_left, self.left) > 0.0 else self.left
        true_right = self.right if self._angle(at_right, self.right) > 0.0 else at_right
        return whole - self._angle(true_right, true_left)


def _cross(a: tuple[float, float], b: tuple[float, float]) -> float:
    return a[0] * b[1] - a[1] * b[0]


def _crossing_angles(edge: dict[str, np.ndarray], radius: np.ndarray) -> np.ndarray:
    """``_Edge.__call__`` for pairs of an edge (its parts given per pair) and a finite radius beyond its
    ``ortho_length``, with the same float operations pair by pair.

    Only +, -, *, / and sqrt go through numpy (IEEE-exact, so bit-identical); hypot and acos stay math's,
    as numpy's own do not always agree with them in the last bit.
    """
    eta = np.sqrt(radius * radius - edge["ortho_length"] * edge["ortho_length"])
    ortho, unit, left, right = edge["ortho"].T, edge["unit"].T, edge["left"].T, edge["right"].T
    at_left = (ortho[0] + eta * unit[0], ortho[1] + eta * unit[1])
    at_right = (ortho[0] - eta * unit[0], ortho[1] - eta * unit[1])
    at_left_length, at_right_length = hypots(*at_left), hypots(*at_right)
    handedness = edge["handedness"]
    use_left = _angles(handedness, at_left, at_left_length, left, edge["left_length"]) > 0.0
    use_right = _angles(handedness, at_right, at_right_length, right, edge["right_length"]) > 0.0
    true_left = (np.where(use_left, at_left[0], left[0]), np.where(use_left, at_left[1], left[1]))
    true_right = (np.where(use_right, right[0], at_right[0]), np.where(use_right, right[1], at_right[1]))
    true_left_length = np.where(use_left, at_left_length, edge["left_length"])
    true_right_length = np.where(use_right, edge["right_length"], at_right_length)
    return edge["whole"] - _angles(handedness, true_right, true_right_length, true_left, true_left_length)


def _angles(handedness, a, a_length, b, b_length) -> np.ndarray:
    """``_Edge._angle`` over arrays of vectors, given their lengths (math.hypot of each)."""
    denominator = a_length * b_length
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.clip((a[0] * b[0] + a[1] * b[1]) / denominator, -1.0, 1.0)
    cosine[denominator == 0.0] = 1.0  # acos(1.0) is 0.0, what _angle returns for a zero vector
    angle = np.array(list(map(math.acos, cosine.tolist())), dtype=float)
    return np.where(handedness * (a[0] * b[1] - a[1] * b[0]) >= 0.0, angle, -angle)


def hypots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """math.hypot element by element (numpy's hypot can differ from it in the last bit)."""
    return np.array(list(map(math.hypot, x.tolist(), y.tolist())), dtype=float)


class DetectorCoverage:
    """Fraction of a resolution circle around the beam that falls on the detector, and the d of its
    corners (DISTL's Geom2d).

    The angle is summed edge by edge from the beam, as DISTL does: when the circle misses the detector
    entirely the sum can come out a rounding error below zero, which DISTL prints as ``-0.00``.
    """

    def __init__(self, geometry: Geometry):
        self.g = geometry
        slow, fast = geometry.size_slow * geometry.pixel_size, geometry.size_fast * geometry.pixel_size
        self.corners = [(0.0, 0.0), (0.0, fast), (slow, fast), (slow, 0.0)]
        beam = (geometry.beam_x, geometry.beam_y)
        self.edges = [_Edge(beam, self.corners[n], self.corners[(n + 1) % 4]) for n in range(4)]

    @functools.cached_property
    def stacked(self) -> dict[str, np.ndarray]:
        """The edges' circle-free parts side by side (one row per edge), for fractions()."""
        return {name: np.array([getattr(edge, name) for edge in self.edges]) for name in
                ("whole", "ortho_length", "ortho", "unit", "left", "right", "left_length", "right_length",
                 "handedness")}

    def __call__(self, d: float) -> float:
        radius = radius_mm(self.g, d)
        return sequential_sum(edge(radius) for edge in self.edges) / (2.0 * math.pi)

    def fractions(self, ds) -> np.ndarray:
        """``self(d)`` for each d, bit for bit, at numpy speed: all (edge, circle) pairs where the circle
        crosses the edge's line go through ``_Edge.__call__``'s operations at once (``_crossing_angles``),
        and each circle's edges are summed in the same order."""
        ds = np.asarray(ds, dtype=float)
        radius = radii_mm(self.g, ds)
        finite = np.isfinite(radius)
        per_edge = self.stacked
        angles = np.repeat(per_edge["whole"][:, np.newaxis], len(radius), axis=1)  # [edge, circle]
        edge, circle = np.nonzero(finite & (radius > per_edge["ortho_length"][:, np.newaxis]))
        if len(edge) < 12:  # numpy's fixed cost would outweigh a few scalar calls
            angles[edge, circle] = [self.edges[e](r) for e, r in zip(edge.tolist(), radius[circle].tolist())]
        else:
            angles[edge, circle] = _crossing_angles({k: v[edge] for k, v in per_edge.items()}, radius[circle])
        # edge rows in order, ((0.0 + edge 0) + edge 1) + ...: numpy adds the rows element by element (the
        # builtin's compensated float sum of Python 3.12+ does not apply to arrays)
        out = sum(angles, 0.0) / (2.0 * math.pi)
        out[~finite] = [self(d) for d in ds[~finite].tolist()]
        return out

    def corner_resolutions(self) -> list[float]:
        g = self.g
        out = []
        for x, y in self.corners:
            to_corner = (x - g.beam_x, y - g.beam_y, g.distance)
            cosine = g.distance * g.distance / (g.distance * math.sqrt(sequential_sum(v * v for v in to_corner)))
            half_angle = math.sin(math.acos(min(1.0, cosine)) / 2.0)
            out.append(g.wavelength / (2.0 * half_angle) if half_angle > 0 else math.inf)  # the beam's own corner
        return out


def populations(d_sorted: np.ndarray, limit0: float, rows: int) -> np.ndarray:
    """Spots per equal-volume shell, as libdistl's bin_populations counts them: a spot's shell is the number
    of edges ``limit0 / (k + 1) ** (1/3)`` (k = 0, 1, ...) above its d, so shell 0 holds d >= limit0.

    The edges must be these divisions: ceil((limit0 / d) ** 3) - 1 puts a spot on or next to an edge one
    shell off (it did on frames with distl.bins.corner=False, whose last spot sits on the last edge)."""
    d = np.asarray(d_sorted, dtype=float)
    edges = limit0 / _cube_roots(rows)  # descending
    index = np.searchsorted(-edges, -d, side="left")  # edges strictly above d
    index = index[index < rows]
    return np.bincount(index, minlength=rows)[:rows]


@functools.lru_cache(maxsize=64)
def _cube_roots(rows: int) -> np.ndarray:
    """(k + 1) ** (1/3) for k < rows, by Python's pow (numpy's may differ in the last bit); read-only."""
    roots = np.array([(k + 1) ** (1.0 / 3.0) for k in range(rows)], dtype=float)
    roots.flags.writeable = False
    return roots


class Shells:
    """Equal reciprocal-volume shells from a target resolution (DISTL's ResolutionShells)."""

    def __init__(self, d_sorted: np.ndarray, target: float, coverage: DetectorCoverage):
        if not target / d_sorted[-1] < MAX_SHELL_SPAN:  # NaN and inf included
            raise FrameError("the spots' resolutions span %.4g A to %.4g A: more than %d resolution shells"
                             % (target, d_sorted[-1], MAX_SHELL_SPAN ** 3))
        rows = int((target / d_sorted[-1]) ** 3) + 1
        self.limit = target / _cube_roots(rows)
        self.fract = np.concatenate(([1.0], coverage.fractions(self.limit[1:])))
        self.population = populations(d_sorted, target, rows)
        # population per covered fraction; 0 where nothing is covered (a fraction a rounding error below 0
        # divides, as in DISTL)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.adjusted = np.where(self.fract == 0, 0.0, self.population / np.where(self.fract == 0, 1, self.fract))

    def __len__(self) -> int:
        return len(self.limit)


def method2(shells: Shells, target_bins: int, ratio: float, res_outer: float | None) -> float:
    """The d at which the shell population falls below ``1/ratio`` of the target (Method 2)."""
    low = target_bins / ratio
    pop, n = shells.population, len(shells)
    if n > 2 and pop[1] > 2 * low and pop[1] > MIN_BIN_COUNT:
        low = pop[1] / ratio
    last = 0
    for k in range(n - 1, -1, -1):
        if pop[k] > low:
            last = k
            break
    cut = low if low <= 20 else 20 + low // 5
    flagged = [1 if pop[k] > cut else 0 for k in range(last + 1)]
    run, x = 0, 0
    for x in range(1, last + 1):
        run = run + 1 if flagged[x] == 0 else 0
        if run == VETTER_RUN:
            break
    kept = flagged[:x + 1]
    last = max((k for k in range(len(kept)) if kept[k]), default=None)
    if last is None:  # DISTL's vetter returns None here, and DISTL then fails
        raise FrameError("Method 2: no resolution shell is populated above the cutoff (distl.method2_cutoff_percentage"
                         " %g)" % (100.0 / ratio))
    if res_outer is not None:
        for k in range(n):
            if shells.limit[k] < res_outer and last < k:
                last = k
                break
    while shells.fract[last] < 1.0 and last + 1 < n and shells.adjusted[last + 1] > low:
        last += 1
    value = float(shells.limit[last])
    return max(value, res_outer) if res_outer is not None else value


def missing_cone(limits: np.ndarray, wavelength: float) -> np.ndarray:
    """Fraction of each shell's reciprocal volume recorded in a full rotation (missing cone excluded)."""
    k = 1.0 / wavelength
    out = np.empty(len(limits))
    last_sphere = last_seen = 0.0
    for i, limit in enumerate(limits):
        r = 1.0 / limit
        sphere = 4.0 / 3.0 * math.pi * r ** 3
        seen = _observed_volume(r, k)
        out[i] = (seen - last_seen) / (sphere - last_sphere)
        last_sphere, last_seen = sphere, seen
    return out


def _observed_volume(r: float, k: float) -> float:
    """Volume inside resolution r swept by the Ewald sphere in a rotation (Pappus, 100-step centroid)."""
    theta = 4.0 * math.asin(r / (2.0 * k))
    area_d = 0.5 * k * k * (theta - math.sin(theta))
    phi = 2.0 * math.acos(r / (2.0 * k))
    area_s = 0.5 * r * r * (phi - math.sin(phi))
    v = r * r / (2.0 * k)
    steps = 100
    dz = r / steps
    total = 0.0
    for i in range(steps):
        z = (2 * i + 1) * r / (2.0 * steps)
        chord = 2.0 * math.sqrt(r * r - z * z) if z > v else 2.0 * math.sqrt(2.0 * k * z - z * z)
        total += z * chord * dz
    return (area_d + area_s) * 2.0 * math.pi * (total / (area_d + area_s))


def distl_sort_descending(items: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``items`` ordered by descending key exactly as DISTL's resolution sort leaves them.

    DISTL sorts the spot indices with C++'s ``std::sort``, which is not stable: spots of equal d (positions
    symmetric about the beam) end up in an order only that algorithm gives, and the bin tables walk the spots
    in it.  This replays GNU libstdc++'s introsort step by step (median-of-three quicksort down to pieces of
    16 or fewer, heapsort past the depth limit, then one insertion sort over everything).
    """
    items, keys = np.asarray(items, dtype=np.int64), np.asarray(keys, dtype=float)
    ranked = items[np.argsort(-keys[items], kind="stable")]
    ranked_keys = keys[ranked]
    if not np.any(ranked_keys[1:] == ranked_keys[:-1]):  # without ties every sort gives this order
        return ranked
    order = items.tolist()
    key = dict(zip(order, keys[items].tolist()))
    _IntroSort(order, key).run()
    return np.array(order, dtype=np.int64)


class _IntroSort:
    """libstdc++'s ``std::sort`` on a list with ``before(a, b) = key[a] > key[b]``."""

    THRESHOLD = 16

    def __init__(self, a: list, key: dict):
        self.a = a
        self.key = key

    def before(self, x, y) -> bool:
        return self.key[x] > self.key[y]

    def run(self) -> None:
        n = len(self.a)
        if n > 1:
            self._loop(0, n, 2 * (n.bit_length() - 1))
            self._final_insertion_sort(0, n)

    def _loop(self, first: int, last: int, depth: int) -> None:
        while last - first > self.THRESHOLD:
            if depth == 0:
                self._heap_sort(first, last)
                return
            depth -= 1
            cut = self._partition_pivot(first, last)
            self._loop(cut, last, depth)
            last = cut

    def _partition_pivot(self, first: int, last: int) -> int:
        """Median of (first + 1, middle, last - 1) moved to ``first``, then the unguarded partition."""
        a, before = self.a, self.before
        mid = first + (last - first) // 2
        x, y, z = a[first + 1], a[mid], a[last - 1]
        if before(x, y):
            median = mid if before(y, z) else (last - 1 if before(x, z) else first + 1)
        else:
            median = first + 1 if before(x, z) else (last - 1 if before(y, z) else mid)
        a[first], a[median] = a[median], a[first]
        pivot = a[first]
        lo, hi = first + 1, last
        while True:
            while before(a[lo], pivot):
                lo += 1
            hi -= 1
            while before(pivot, a[hi]):
                hi -= 1
            if lo >= hi:
                return lo
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1

    def _final_insertion_sort(self, first: int, last: int) -> None:
        a, before = self.a, self.before
        guarded_end = min(last, first + self.THRESHOLD)
        for i in range(first + 1, guarded_end):
            value = a[i]
            if before(value, a[first]):
                a[first + 1:i + 1] = a[first:i]
                a[first] = value
            else:
                self._linear_insert(i)
        for i in range(guarded_end, last):
            self._linear_insert(i)

    def _linear_insert(self, i: int) -> None:
        a, before = self.a, self.before
        value = a[i]
        while before(value, a[i - 1]):
            a[i] = a[i - 1]
            i -= 1
        a[i] = value

    def _heap_sort(self, first: int, last: int) -> None:
        """``std::partial_sort(first, last, last)``: make_heap, then pop the top to the end one by one."""
        n = last - first
        for parent in range((n - 2) // 2, -1, -1):
            self._adjust_heap(first, parent, n, self.a[first + parent])
        for end in range(n - 1, 0, -1):
            value = self.a[first + end]
            self.a[first + end] = self.a[first]
            self._adjust_heap(first, 0, end, value)

    def _adjust_heap(self, first: int, hole: int, length: int, value) -> None:
        """Sift the hole down to a leaf along the larger children, then push ``value`` back up (libstdc++)."""
        a, before = self.a, self.before
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if before(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and before(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value
