"""Ice rings, found two ways as DISTL does: from pixel z-scores (libdistl) and from spot counts (RingFinder)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .background import BELOW_MEDIAN, BELOW_UPPER, Region
from .geometry import Geometry, integer_beam, pixel_d, pixel_resolution, radius_px
from .jit import njit
from .resolution import Shells
from .sums import sequential_sum

RING_WIDTH = 4  # pixels
ICE_D_MAX = 8.0  # Angstrom: no ring is tested at lower resolution than this


@dataclass(frozen=True)
class PixelRing:
    """A run of consecutive ice annuli; radii squared in pixels², d at its inner and outer edge."""

    inner_r2: float
    outer_r2: float
    inner_d: float
    outer_d: float


def pixel_rings(flags: np.ndarray, geometry: Geometry, region: Region) -> list[PixelRing]:
    """Annuli 4 px wide around the integer beam whose z-scores are lifted as a whole: the z at 45% of an
    annulus's sorted pixels reaches ICE_MEDIAN_Z and the one at 80% ICE_UPPER_Z (the classification's
    BELOW_MEDIAN and BELOW_UPPER pixel classes)."""
    bx, by = integer_beam(geometry)
    d_min = max(geometry.wavelength / 2.0, 1.0)
    corners = [(x, y) for x in (region.x0, region.x1) for y in (region.y0, region.y1)]
    farthest = max(math.hypot(x - bx, y - by) for x, y in corners)
    outer_r = min(farthest, radius_px(geometry, d_min))
    nrings = int(outer_r / RING_WIDTH) + 1
    # annuli nearer the beam than the region hold no pixel, so none is iced: skipped, as a beam far off the
    # detector would make them millions
    nearest = math.hypot(max(region.x0 - bx, bx - region.x1, 0), max(region.y0 - by, by - region.y1, 0))
    first = max(int(radius_px(geometry, ICE_D_MAX) / RING_WIDTH), int(nearest / RING_WIDTH) - 1)
    last = nrings - 2
    if last < first:
        return []
    counts = _ring_counts(flags, region.x0, region.x1, region.y0, region.y1, bx, by, first, last,
                          BELOW_MEDIAN, BELOW_UPPER).tolist()  # Python ints: hundreds of rings
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
def _ring_counts(flags, x0, x1, y0, y1, bx, by, first, last, low, high):
    """Per annulus first..last: its pixel count and how many of its pixels have the class bits ``low`` and
    ``high`` (z below the two ranks' thresholds).

    The sorted z at index k is >= t exactly when at most k values are below t, so the ice test needs
    these counts only: one pass over the frame, no sort.

    A pixel's annulus int(sqrt(r2) / RING_WIDTH) is computed in doubles from the integer r2 = dx^2 + dy^2
    (the beam is on a pixel): r2 is exact, the division by the power of two RING_WIDTH is exact and the
    truncation a floor, so by ``_floor_sqrt`` the annulus is >= m exactly when r2 >= (RING_WIDTH * m)^2.
    Along a row r2 grows with |y - by|, so the pixels inside circle m form one interval around by, found
    with an integer square root, and annulus k is the pixels inside circle k + 1 less those inside
    circle k: two runs.  Adding every pixel into counts[its annulus] neither vectorises nor pipelines,
    and a loop per run mispredicts its exit once a run (runs are ~6 pixels on a 6M frame).  So each row's
    classes ``low`` and ``high`` are packed into bit words once (a vectorised loop), and the count of an
    interval is two lookups in their running popcounts.  Everything past the sqrt is integer arithmetic:
    the counts are exactly those of the per-pixel loop.
    """
    rings = max(last - first + 1, 0)
    counts = np.zeros((3, rings), dtype=np.int64)  # pixels, below low, below high
    if rings == 0 or x1 < x0 or y1 < y0:
        return counts.T.copy()
    n = y1 - y0 + 1
    near = 0 if y0 <= by <= y1 else min(abs(y0 - by), abs(y1 - by))  # least and greatest |y - by| in a row
    far = max(abs(y0 - by), abs(y1 - by))
    words_low = np.zeros(n // 64 + 1, dtype=np.uint64)  # bit j of word i: row[64 i + j] < low
    words_high = np.zeros(n // 64 + 1, dtype=np.uint64)
    before_low = np.zeros(n // 64 + 1, dtype=np.int64)  # set bits in the words before word i
    before_high = np.zeros(n // 64 + 1, dtype=np.int64)
    # per circle of the row: its pixels inside are y0 + [left, right); how many of them lie below low, high
    left = np.empty(rings + 1, dtype=np.int64)
    right = np.empty(rings + 1, dtype=np.int64)
    inside_low = np.empty(rings + 1, dtype=np.int64)
    inside_high = np.empty(rings + 1, dtype=np.int64)
    for x in range(x0, x1 + 1):
        dx2 = (x - bx) * (x - bx)
        k_lo = max(first, _floor_sqrt(dx2 + near * near) // RING_WIDTH)  # the annuli this row meets
        k_hi = min(last, _floor_sqrt(dx2 + far * far) // RING_WIDTH)
        if k_lo > k_hi:
            continue
        circles = k_hi - k_lo + 2
        for j in range(circles):
            # inside circle k_lo + j, radius R: |y - by| < a, the least a >= 0 with dx2 + a^2 >= R^2
            radius = RING_WIDTH * (k_lo + j)
            v = radius * radius - dx2
            a = _floor_sqrt(max(v, 0))
            a += a * a < v
            left[j] = min(max(by + 1 - max(a, 1) - y0, 0), n)  # by - a < y < by + a, none when a = 0
            right[j] = min(max(by + a - y0, 0), n)
        _pack_row(flags[x, y0:y1 + 1], low, high, words_low, before_low, words_high, before_high)
        for j in range(circles):
            inside_low[j] = _bits_below(words_low, before_low, right[j]) - \
                _bits_below(words_low, before_low, left[j])
            inside_high[j] = _bits_below(words_high, before_high, right[j]) - \
                _bits_below(words_high, before_high, left[j])
        for j in range(circles - 1):  # annulus k_lo + j: inside circle j + 1, not inside circle j
            k = k_lo - first + j
            counts[0, k] += (right[j + 1] - left[j + 1]) - (right[j] - left[j])
            counts[1, k] += inside_low[j + 1] - inside_low[j]
            counts[2, k] += inside_high[j + 1] - inside_high[j]
    return counts.T.copy()


@njit(cache=True)
def _floor_sqrt(v):
    """The largest a with a * a <= v, for an integer 0 <= v < 2^52 (radii below 2^26 pixels).

    For such v and an integer N >= 0 the correctly rounded double sqrt(v) is >= N exactly when v >= N^2:
    if v >= N^2, sqrt(v) >= N and rounding keeps it there; if v <= N^2 - 1, sqrt(v) < N - 1/(2N), and
    with N^2 < 2^52 that is more than half a double's spacing below N, so it cannot round up to N (with
    N^2 >= 2^52 > v, sqrt(v) rounds to below 2^26 <= N).  Truncating it therefore gives the floor.
    """
    return int(np.sqrt(float(v)))


@njit(cache=True)
def _pack_row(row, low, high, words_low, before_low, words_high, before_high):
    """Pack whether a row's classes have the bits ``low`` and ``high`` into bit words, bit j
    of word i for row[64 i + j], with the number of set bits before each word; one word more than the
    row fills, so that a position at the row's end can be looked up."""
    total_low = total_high = 0
    for i in range(words_low.size):
        chunk = row[64 * i:min(64 * i + 64, row.size)]
        if chunk.size == 64:  # a literal trip count: LLVM unrolls and vectorises it
            w_low, w_high = pack_chunk(chunk, 64, low), pack_chunk(chunk, 64, high)
        else:
            w_low, w_high = pack_chunk(chunk, chunk.size, low), pack_chunk(chunk, chunk.size, high)
        words_low[i], words_high[i] = w_low, w_high
        before_low[i], before_high[i] = total_low, total_high
        total_low += popcount(w_low)
        total_high += popcount(w_high)


@njit(cache=True)
def pack_chunk(values, size, bit):
    """Bit j set where values[j] has ``bit``, for j < size <= 64."""
    w = np.uint64(0)
    for j in range(size):
        w |= np.uint64((values[j] & bit) != 0) << np.uint64(j)
    return w


@njit(cache=True)
def _bits_below(words, before, pos):
    """How many bits are set before bit ``pos`` (0 <= pos <= row size) of the packed row."""
    i = pos >> 6
    return before[i] + popcount(words[i] & ((np.uint64(1) << np.uint64(pos & 63)) - np.uint64(1)))


@njit(cache=True)
def popcount(w):
    """Set bits of a uint64 (LLVM turns this into one popcnt instruction)."""
    w = w - ((w >> np.uint64(1)) & np.uint64(0x5555555555555555))
    w = (w & np.uint64(0x3333333333333333)) + ((w >> np.uint64(2)) & np.uint64(0x3333333333333333))
    w = (w + (w >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((w * np.uint64(0x0101010101010101)) >> np.uint64(56))


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
        signal = pop[x] + pop[x - 1] + pop[x + 1]  # DISTL's order: the middle shell first
        background = sequential_sum(pop[first:last + 1]) - signal
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
