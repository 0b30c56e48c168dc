"""Background and pixel classification: scanbox tiling and DISTL's three plane-fitted cycles.

Each cycle fits a plane to the background sample of every scanbox window and turns every pixel of the window
into a z-score against that plane.  The sample of a cycle excludes pixels the previous cycle found to be
signal, so spots do not lift their own background.  The per-window loop is a numba kernel: it is the
largest cost of the analysis, and compiled it takes milliseconds where numpy needs hundreds per 6M frame.
Z is rounded to float32, as libdistl keeps it, and compared with thresholds in double precision, as its
C++ does: thresholds then fall on the same pixels.  The later stages test nothing of z but its thresholds,
so the last cycle writes each pixel's classes (a byte) instead of z (a float), and z and the background
plane are computed afterwards only at the pixels that need them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .geometry import Geometry, pixel_resolution
from .jit import njit
from .params import Settings

# Module layout along (slow, fast): module width and gap in pixels.
MODULES = {"pilatus": ((195, 17), (487, 7)), "eiger": ((514, 37), (1030, 10))}
MAX_WINDOW = 1000  # libdistl gives up widening a window beyond this width

# Pixel classes, one byte a pixel, set where z is computed: the later stages test these and nothing else
# of z, and reading a byte back costs a quarter of reading the float (the tests are the same comparisons,
# float32 z against double thresholds).
BELOW_MEDIAN = 1  # z < ICE_MEDIAN_Z: the ice-ring test ranks these ...
BELOW_UPPER = 2  # ... and z < ICE_UPPER_Z
STRONG = 4  # z > the spot height: maxima and spot growth
SATURATED = 8  # value >= the saturation (Count_cutoff)
ICE_MEDIAN_Z = 0.0  # the z-score at 45% of an ice ring's sorted pixels must reach this ...
ICE_UPPER_Z = 1.5  # ... and the one at 80% this
assert np.float32(ICE_MEDIAN_Z) == ICE_MEDIAN_Z and np.float32(ICE_UPPER_Z) == ICE_UPPER_Z  # tested in float32
assert (BELOW_MEDIAN, BELOW_UPPER, STRONG, SATURATED) == (1, 2, 4, 8)  # the bits _pixel_flags sets


@dataclass(frozen=True)
class Region:
    """The processing region: pixels at least ``margin`` from every edge (inclusive bounds)."""

    x0: int
    x1: int
    y0: int
    y1: int

    @classmethod
    def of(cls, geometry: Geometry, margin: int) -> Region:
        return cls(margin, geometry.size_slow - 1 - margin, margin, geometry.size_fast - 1 - margin)


@dataclass
class Classification:
    flags: np.ndarray  # uint8 classes of every pixel (BELOW_MEDIAN, BELOW_UPPER, STRONG, SATURATED)
    pixels: np.ndarray  # the frame's values, for z at the pixels asked about
    window_centres: np.ndarray  # (n, 2) int centre (x, y) of each window of the last cycle
    window_background: np.ndarray  # plane value at each centre
    window_sample: np.ndarray  # background sample size of each window
    # (windows, planes) of each cycle that wrote z, in order: (n, 4) inclusive bounds, (n, 4) a, b, c, sigma
    written: list[tuple[np.ndarray, np.ndarray]]
    error: str | None = None  # the "cannot distinguish" message when a cycle stopped early

    # Z and the background plane are computed for the few pixels asked about (spot bodies and peaks) rather
    # than kept for all 6M: the same arithmetic as the kernel's, from the plane of the last window that
    # classified the pixel; 0 where none did.
    def local_background(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The float32 background plane value at pixels (x, y)."""
        covered, plane, _ = self._planes_at(x, y)
        return np.where(covered, plane, 0.0).astype(np.float32)

    def z_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The float32 z-score at pixels (x, y)."""
        covered, plane, sigma = self._planes_at(x, y)
        with np.errstate(invalid="ignore"):
            z = (self.pixels[x, y] - plane) / np.where(sigma > 0, sigma, np.inf)  # z = 0 when sigma is 0
        return np.where(covered, z, 0.0).astype(np.float32)

    def _planes_at(self, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Whether a window classified each pixel, its plane value there (double) and the window's sigma."""
        x, y = np.ascontiguousarray(x, dtype=np.int64), np.ascontiguousarray(y, dtype=np.int64)
        covered = np.zeros(x.shape, dtype=bool)
        plane, sigma = np.zeros(x.shape), np.zeros(x.shape)
        for (windows, planes), (band_of_row, window_at) in zip(reversed(self.written), reversed(self._window_maps)):
            _look_up_planes(x, y, windows, planes, band_of_row, window_at, covered, plane, sigma)
        return covered, plane, sigma

    @functools.cached_property
    def _window_maps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``_window_map`` of each cycle in ``written``, made once for all the lookups of a frame."""
        return [_window_map(windows, *self.flags.shape) for windows, _ in self.written]


@njit(cache=True)
def _look_up_planes(x, y, windows, planes, band_of_row, window_at, covered, plane, sigma):
    """Each pixel (x, y) not yet ``covered`` that a window of one cycle holds (``_window_map``) gets the window's
    plane value there, in the classifying kernels' order (a dx + b dy, then + c), its sigma, and is covered.
    One pass: the same gathers in numpy took ~15 over the pixels of a frame's spots (0.6 ms for 35,000, 2-core
    EPYC)."""
    for k in range(x.size):
        band = band_of_row[x[k]]
        if covered[k] or band < 0:
            continue
        w = window_at[band, y[k]]
        if w < 0:
            continue
        plane[k] = planes[w, 0] * float(x[k] - windows[w, 0]) + planes[w, 1] * float(y[k] - windows[w, 2]) \
            + planes[w, 2]
        sigma[k] = planes[w, 3]
        covered[k] = True


@njit(cache=True)
def _window_map(windows, size_x, size_y):
    """Which window holds each pixel: the band (windows sharing their rows; bands never share a row) of
    each row, and the window at each column of each band, -1 for none."""
    band_of_row = np.full(size_x, -1, dtype=np.int64)
    bands = 0
    for i in range(windows.shape[0]):
        if i == 0 or windows[i, 0] != windows[i - 1, 0] or windows[i, 1] != windows[i - 1, 1]:
            bands += 1
    window_at = np.full((max(bands, 1), size_y), -1, dtype=np.int64)
    band = -1
    for i in range(windows.shape[0]):
        x0, x1, y0, y1 = windows[i, 0], windows[i, 1], windows[i, 2], windows[i, 3]
        if i == 0 or x0 != windows[i - 1, 0] or x1 != windows[i - 1, 1]:
            band += 1
            band_of_row[x0:x1 + 1] = band
        window_at[band, y0:y1 + 1] = i
    return band_of_row, window_at


def _module_spans(size: int, width: int, gap: int, box: int, start: int, end: int) -> list[tuple[int, int]]:
    """Windows along one axis that never cross a module gap; dropped when wholly outside [start, end]."""
    spans = []
    n = max(1, (width - 1) // box)
    for module in range((size + gap) // (width + gap)):
        origin = module * (width + gap)
        for k in range(n):
            first = origin + int(k * width / n)
            last = origin + int((k + 1) * width / n) - 1
            if first >= end or last <= start:
                continue
            spans.append((first, last))
    return spans


def _generic_spans(start: int, end: int, box: int) -> list[tuple[int, int]]:
    """CCD tiling.  Quirk kept: windows start at pixel 0, not at the region start, so the last pixels
    at the high end of the axis are never classified (their Z stays 0), as in DISTL."""
    n = max(1, (end - start + 1) // box)
    width = (end - start + 1) / n
    return [(int(k * width), int((k + 1) * width) - 1) for k in range(n)]


def scanbox_windows(geometry: Geometry, region: Region, box: int) -> list[tuple[int, int, int, int]]:
    """The windows (x0, x1, y0, y1), inclusive, for one cycle's box size."""
    layout = MODULES.get(geometry.family)
    if layout:
        (wx, gx), (wy, gy) = layout
        xs = _module_spans(geometry.size_slow, wx, gx, box, region.x0, region.x1)
        ys = _module_spans(geometry.size_fast, wy, gy, box, region.y0, region.y1)
    else:
        xs = _generic_spans(region.x0, region.x1, box)
        ys = _generic_spans(region.y0, region.y1, box)
    return [(x0, x1, y0, y1) for x0, x1 in xs for y0, y1 in ys]


@njit(cache=True)
def _solve3(a, b):
    """Solve the 3x3 system a x = b by Gaussian elimination with partial pivoting, in place (x into b);
    False when singular."""
    for col in range(3):
        pivot = col
        for row in range(col + 1, 3):
            if abs(a[row, col]) > abs(a[pivot, col]):
                pivot = row
        if a[pivot, col] == 0.0:
            return False
        if pivot != col:
            for k in range(3):
                a[col, k], a[pivot, k] = a[pivot, k], a[col, k]
            b[col], b[pivot] = b[pivot], b[col]
        for row in range(col + 1, 3):
            f = a[row, col] / a[col, col]
            for k in range(col, 3):
                a[row, k] -= f * a[col, k]
            b[row] -= f * b[col]
    for col in range(2, -1, -1):
        acc = b[col]
        for k in range(col + 1, 3):
            acc -= a[col, k] * b[k]
        b[col] = acc / a[col, col]
    return True


@njit(cache=True)
def _count_background(background, x0, x1, y0, y1):
    n = 0
    for x in range(x0, x1 + 1, 2):
        row = background[x, y0:y1 + 1:2]
        for j in range(row.size):
            n += row[j]
    return n


# Plane fits.  The sample is every second pixel of every second row; a window's moments are sums of integers,
# exact in any order, so they are gathered four sampled rows at a time across a whole band of windows.  The
# residual sum is not exact: each window adds its squares in libdistl's order (row by row, pixel by pixel) into
# its own total.
MOMENTS = 9  # sxx, sxy, sx, syy, sy, sxv, syv, sv, n of a window's sample (dx, dy from its origin)


@njit(cache=True)
def _add_row_moments(values, sample, x, start, stop, oy, dx, sums):
    """Add the sample of row x, pixels start, start + 2, ... <= stop, to the moments of a window whose origin
    column is ``oy`` (``dx``: the row's offset from the window's origin row).

    The row sums are taken in doubles, and exactly: with values below 2^31 and rows narrower than 2896
    pixels (the box sizes are at most 1448, widened windows at most MAX_WINDOW), every term and partial sum
    is an integer below 2^53, so the sums are the integers themselves, as the int64 sums they replace.
    The classification then takes 0.88x the time it took with int64 sums on the 2-core EPYC (29.0 ms instead of
    32.6), 0.93x with code generated for an AVX2-only EPYC (NUMBA_CPU_NAME=znver2)."""
    n = swy = swyy = sv = svy = 0.0
    for y in range(start, stop + 1, 2):
        w = 1.0 if sample[x, y] else 0.0
        dy = float(y - oy)
        v = float(values[x, y]) * w
        n += w
        swy += w * dy
        swyy += w * dy * dy
        sv += v
        svy += v * dy
    sums[0] += dx * dx * n
    sums[1] += dx * swy
    sums[2] += dx * n
    sums[3] += swyy
    sums[4] += swy
    sums[5] += dx * sv
    sums[6] += svy
    sums[7] += sv
    sums[8] += n


COLUMN_SUMS = 5  # w, w dx, w dx^2, v, v dx down a column of a band's sample (dx from the band's first row)


@njit(cache=True)
def _band_moments(values, sample, band, columns, sums):
    """The moments of every window of a band (windows sharing their rows, left to right) into ``sums``.

    The sample's rows are first summed down each column, over the band's whole width at once: long loops
    over contiguous rows, which vectorise, where a window's row is a dozen or two pixels two apart.  Each
    window then adds up its sampled columns.  The terms are integers and so are all the partial sums, below
    2^53 as long as a window's totals are (the condition the row-by-row sums had too): the order changes
    nothing, and the moments are the same numbers.  Half the time of summing each window's rows (1.2 ms
    against 2.6 for the 1620 windows of a 6M frame's 51-pixel cycle, 2-core EPYC).  Four sampled rows are
    added at once, so that the five column sums are loaded and stored once for them: the classification
    then takes 0.84x its time with a row at a time."""
    x0, x1 = band[0, 0], band[0, 1]
    start, stop = band[0, 2], band[band.shape[0] - 1, 3] + 1
    w_sum, wx_sum, wxx_sum = columns[0, start:stop], columns[1, start:stop], columns[2, start:stop]
    v_sum, vx_sum = columns[3, start:stop], columns[4, start:stop]
    columns[:, start:stop] = 0.0
    nothing = np.zeros(stop - start, dtype=np.bool_)  # the sample of rows past the band's last: no pixel
    for x in range(x0, x1 + 1, 8):
        values1, sample1 = _sampled_row(values, sample, x + 2, x1, start, stop, nothing)
        values2, sample2 = _sampled_row(values, sample, x + 4, x1, start, stop, nothing)
        values3, sample3 = _sampled_row(values, sample, x + 6, x1, start, stop, nothing)
        _add_four_rows_to_columns(values[x, start:stop], values1, values2, values3, sample[x, start:stop], sample1,
                                  sample2, sample3, float(x - x0), w_sum, wx_sum, wxx_sum, v_sum, vx_sum)
    for i in range(band.shape[0]):
        y0, y1 = band[i, 2], band[i, 3]
        window = sums[i]
        for y in range(y0, y1 + 1, 2):
            k = y - start
            dy = float(y - y0)
            window[0] += wxx_sum[k]
            window[1] += wx_sum[k] * dy
            window[2] += wx_sum[k]
            window[3] += w_sum[k] * dy * dy
            window[4] += w_sum[k] * dy
            window[5] += vx_sum[k]
            window[6] += v_sum[k] * dy
            window[7] += v_sum[k]
            window[8] += w_sum[k]


@njit(cache=True)
def _add_four_rows_to_columns(values0, values1, values2, values3, sample0, sample1, sample2, sample3, dx, w_sum,
                              wx_sum, wxx_sum, v_sum, vx_sum):
    """Add four sampled rows, dx, dx + 2, dx + 4 and dx + 6 rows from the band's first, to the column sums
    (over 0-based row views, which vectorise; integer terms, so in any order)."""
    dx1, dx2, dx3 = dx + 2.0, dx + 4.0, dx + 6.0
    for j in range(values0.size):
        w0 = 1.0 if sample0[j] else 0.0
        w1 = 1.0 if sample1[j] else 0.0
        w2 = 1.0 if sample2[j] else 0.0
        w3 = 1.0 if sample3[j] else 0.0
        v0, v1 = float(values0[j]) * w0, float(values1[j]) * w1
        v2, v3 = float(values2[j]) * w2, float(values3[j]) * w3
        w_sum[j] += (w0 + w1) + (w2 + w3)
        wx_sum[j] += (w0 * dx + w1 * dx1) + (w2 * dx2 + w3 * dx3)
        wxx_sum[j] += (w0 * dx * dx + w1 * dx1 * dx1) + (w2 * dx2 * dx2 + w3 * dx3 * dx3)
        v_sum[j] += (v0 + v1) + (v2 + v3)
        vx_sum[j] += (v0 * dx + v1 * dx1) + (v2 * dx2 + v3 * dx3)


@njit(cache=True)
def _sampled_row(values, sample, x, last, start, stop, nothing):
    """Row x's values and sample from ``start`` to ``stop``; past the band's ``last`` row an empty sample
    (beside any row of values), which adds nothing."""
    if x <= last:
        return values[x, start:stop], sample[x, start:stop]
    return values[last, start:stop], nothing


@njit(cache=True, error_model="numpy")
def _plane(sums, m, r):
    """Least-squares plane v = a*dx + b*dy + c from a window's moments (the mean when singular).  ``m`` and
    ``r``, a 3x3 and a 3 array, are scratch: allocating the system anew for each window took 0.8 ms a 6M
    frame, 4x the solving."""
    sxx, sxy, sx, syy, sy, sxv, syv, sv, n = sums
    m[0, 0], m[0, 1], m[0, 2] = sxx, sxy, sx
    m[1, 0], m[1, 1], m[1, 2] = sxy, syy, sy
    m[2, 0], m[2, 1], m[2, 2] = sx, sy, n
    r[0], r[1], r[2] = sxv, syv, sv
    if not _solve3(m, r):
        return 0.0, 0.0, sv / n
    return r[0], r[1], r[2]


@njit(cache=True, error_model="numpy", inline="always")
def _square_term(values, sample, x, y, oy, row_plane, b, c):
    """The squared residual of pixel (x, y) about a window's plane if it is in the sample, else 0.  The
    column is indexed unsigned, so that numba adds no wrap-around of negative indices to each access."""
    e = float(values[x, np.uint64(y)]) - (row_plane + b * (y - oy) + c)
    return e * e if sample[x, np.uint64(y)] else 0.0


@njit(cache=True, error_model="numpy")
def _add_row_squares(values, sample, x, start, stop, oy, row_plane, b, c, squares):
    """Add the squared residuals about the plane of row x's sample (pixels as in _add_row_moments) to a
    window's running total, in libdistl's order."""
    for y in range(start, stop + 1, 2):
        squares += _square_term(values, sample, x, y, oy, row_plane, b, c)
    return squares


@njit(cache=True, error_model="numpy")
def _add_row_squares_of_two(values, sample, x, ya, ya_stop, row_plane_a, ba, ca, squares_a, yb, yb_stop, row_plane_b,
                            bb, cb, squares_b):
    """_add_row_squares for two windows at once (each window's origin column is its first one).  Each total
    is still added in its own order, but the two chains of dependent additions interleave, so that one
    runs while the other waits: with the unsigned indices, the classification takes 0.94x the time of one
    window after the other (2-core EPYC); a core that keeps fewer instructions in flight should gain more."""
    count_a, count_b = (ya_stop - ya) // 2 + 1, (yb_stop - yb) // 2 + 1
    both = min(count_a, count_b)
    for k in range(both):
        squares_a += _square_term(values, sample, x, ya + 2 * k, ya, row_plane_a, ba, ca)
        squares_b += _square_term(values, sample, x, yb + 2 * k, yb, row_plane_b, bb, cb)
    for k in range(both, count_a):
        squares_a += _square_term(values, sample, x, ya + 2 * k, ya, row_plane_a, ba, ca)
    for k in range(both, count_b):
        squares_b += _square_term(values, sample, x, yb + 2 * k, yb, row_plane_b, bb, cb)
    return squares_a, squares_b


@njit(cache=True, error_model="numpy")
def _fit_window(values, background, x0, y0, sx0, sx1, sy0, sy1):
    """The plane of one window from the sample of a widened span, and the RMS residual about it (divided
    by n, as libdistl does)."""
    sums = np.zeros(MOMENTS)
    for x in range(sx0, sx1 + 1, 2):
        _add_row_moments(values, background, x, sy0, sy1, y0, float(x - x0), sums)
    a, b, c = _plane(sums, np.empty((3, 3)), np.empty(3))
    squares = 0.0
    for x in range(sx0, sx1 + 1, 2):
        squares = _add_row_squares(values, background, x, sy0, sy1, y0, a * (x - x0), b, c, squares)
    return a, b, c, np.sqrt(squares / sums[8]), int(sums[8])


@njit(cache=True, error_model="numpy")  # numpy semantics for x/0: no per-division check
def _classify_cycle(values, background, usable, z, flags, next_background, threshold, spot_height, saturation,
                    store_z, store_flags, mark, sampled_rows, windows, size_x, size_y, planes, samples):
    """One cycle over all windows; returns how many windows were done (fewer when one found too little
    background even widened to MAX_WINDOW, libdistl's "cannot distinguish signal/background") and whether
    any window had to be widened.  ``planes`` gets each window's (a, b, c, sigma), ``samples`` its sample
    size.

    Windows come in bands that share their rows; each band is swept row by row across all its windows,
    since walking a 6M frame window by window (short rows far apart) runs several times slower.
    ``store_z`` writes z, ``store_flags`` the pixel classes of the band's rows, whole (the gaps between its
    windows and the pixels either side of them as z = 0), ``mark`` the next cycle's background sample (usable
    and z below ``threshold``), on the rows the next cycle samples (``sampled_rows``) only; the last two sweep
    a band's whole row at once with its planes spread by column (_spread_planes).  Z is rounded to float32
    before any test, as libdistl stores it.
    """
    widened = False
    count = windows.shape[0]
    column_planes = np.empty((PLANE_COLUMNS, size_y))  # scratch of _spread_planes
    z_row = np.empty(size_y, dtype=np.float32)  # scratch of _flag_row
    system, solution = np.empty((3, 3)), np.empty(3)  # scratch of the plane fits
    columns = np.empty((COLUMN_SUMS, size_y))  # scratch of _band_moments
    first = 0
    while first < count:
        end = first + 1
        while end < count and windows[end, 0] == windows[first, 0] and windows[end, 1] == windows[first, 1]:
            end += 1
        x0, x1 = windows[first, 0], windows[first, 1]
        sums = np.zeros((end - first, MOMENTS))
        _band_moments(values, background, windows[first:end], columns, sums)
        stop = end
        own_sample = np.ones(end - first, dtype=np.bool_)
        for i in range(first, end):
            y0, y1 = windows[i, 2], windows[i, 3]
            needed = (((x1 - x0 + 1) * (y1 - y0 + 1) * 2) // 3) // 4
            if sums[i - first, 8] >= needed:
                planes[i, 0], planes[i, 1], planes[i, 2] = _plane(sums[i - first], system, solution)
                continue
            widened = True
            own_sample[i - first] = False
            sx0, sx1, sy0, sy1 = x0, x1, y0, y1
            gave_up = False
            while _count_background(background, sx0, sx1, sy0, sy1) < needed:
                grow = min(sx1 - sx0 + 1, sy1 - sy0 + 1) // 3
                before = (sx0, sx1, sy0, sy1)
                sx0, sx1 = _widen_axis(sx0, sx1, grow, size_x)
                sy0, sy1 = _widen_axis(sy0, sy1, grow, size_y)
                # libdistl gives up past MAX_WINDOW; on a frame smaller than that, once the window is the whole
                # frame (or cannot grow), where DISTL itself crashes
                if sx1 - sx0 + 1 > MAX_WINDOW or sy1 - sy0 + 1 > MAX_WINDOW or (sx0, sx1, sy0, sy1) == before:
                    gave_up = True
                    break
            if gave_up:
                stop = i
                break
            a, b, c, sigma, n = _fit_window(values, background, x0, y0, sx0, sx1, sy0, sy1)
            planes[i, 0], planes[i, 1], planes[i, 2], planes[i, 3] = a, b, c, sigma
            samples[i] = n
        squares = np.zeros(end - first)
        for x in range(x0, x1 + 1, 2):
            i = first
            while i < stop:
                if not own_sample[i - first]:
                    i += 1
                elif i + 1 < stop and own_sample[i + 1 - first]:
                    squares[i - first], squares[i + 1 - first] = _add_row_squares_of_two(
                        values, background, x, windows[i, 2], windows[i, 3], planes[i, 0] * (x - x0), planes[i, 1],
                        planes[i, 2], squares[i - first], windows[i + 1, 2], windows[i + 1, 3],
                        planes[i + 1, 0] * (x - x0), planes[i + 1, 1], planes[i + 1, 2], squares[i + 1 - first])
                    i += 2
                else:
                    y0, y1 = windows[i, 2], windows[i, 3]
                    squares[i - first] = _add_row_squares(values, background, x, y0, y1, y0, planes[i, 0] * (x - x0),
                                                          planes[i, 1], planes[i, 2], squares[i - first])
                    i += 1
        for i in range(first, stop):
            if own_sample[i - first]:
                n = sums[i - first, 8]
                planes[i, 3] = np.sqrt(squares[i - first] / n)
                samples[i] = int(n)
        if stop > first and (store_flags or mark):
            ys, ye = windows[first, 2], windows[stop - 1, 3] + 1
            _spread_planes(windows[first:stop], planes[first:stop], column_planes)
            plane_a, plane_bdy = column_planes[0, ys:ye], column_planes[1, ys:ye]
            plane_c, plane_scale = column_planes[2, ys:ye], column_planes[3, ys:ye]
        for x in range(x0, x1 + 1):
            if store_z:  # window by window: the columns between them keep an earlier cycle's z
                for i in range(first, stop):
                    y0, y1 = windows[i, 2], windows[i, 3]
                    a, b, c, sigma = planes[i, 0], planes[i, 1], planes[i, 2], planes[i, 3]
                    scale = sigma if sigma > 0 else np.inf  # z = 0 when sigma is 0, as libdistl has it
                    _store_row(values[x, y0:y1 + 1], z[x, y0:y1 + 1], a * (x - x0), b, c, scale)
            if stop == first:
                continue
            if store_flags:
                _flag_row(values[x, ys:ye], plane_a, plane_bdy, plane_c, plane_scale, float(x - x0), z_row[ys:ye],
                          flags[x, ys:ye], spot_height, saturation)
                # the pixels either side of the band's windows have z = 0, classed with the rest of the row: a
                # pass over every uncovered pixel before the cycles classed the gaps between windows too, which
                # the row classes again (1.1 ms of a 6M frame's 30.7, 2-core EPYC)
                _flag_zero_span(flags[x, :ys], values[x, :ys], spot_height, saturation)
                _flag_zero_span(flags[x, ye:], values[x, ye:], spot_height, saturation)
            if mark and sampled_rows[x]:
                _mark_row(values[x, ys:ye], usable[x, ys:ye], next_background[x, ys:ye], plane_a, plane_bdy, plane_c,
                          plane_scale, float(x - x0), threshold)
        if stop < end:
            return stop, widened
        first = end
    return count, widened


# The row loops are functions of their own: plain loops over 0-based row views, which the compiler
# vectorises (the same loops written inline in the window loop run several times slower).
@njit(cache=True, error_model="numpy")
def _store_row(value_row, z_row, row_plane, b, c, scale):
    for j in range(value_row.size):
        z_row[j] = (value_row[j] - (row_plane + b * j + c)) / scale


PLANE_COLUMNS = 4  # a, b dy (dy: the column's offset in its window), c of the plane; the z scale (sigma)


@njit(cache=True)
def _spread_planes(band, planes, column_planes):
    """Each column of a band's windows gets its window's a and c, b times its offset dy from the window's
    first column (the product the plane's value at a pixel is summed from, in libdistl's order: a dx + b dy,
    then + c; a load and a product fewer a pixel: 0.94x the time of classing the rows) and the window's
    sigma (inf for 0, so that z is 0, as libdistl has it); the columns between two windows get z = 0 (a zero
    plane, an infinite scale), as every pixel outside the windows has it.  The rows are then classed or marked
    in loops across the band's whole width, which vectorise, where a window's row is some fifty pixels: on a 6M
    frame the last cycle's classes take 2.9 ms instead of 3.9 (4.0 instead of 4.4 with code for AVX2), a
    marking pass 1.2 ms instead of 1.4-2.6 (2-core EPYC)."""
    start, stop = band[0, 2], band[band.shape[0] - 1, 3] + 1
    column_planes[0:3, start:stop] = 0.0
    column_planes[3, start:stop] = np.inf
    for i in range(band.shape[0]):
        y0, y1 = band[i, 2], band[i, 3]
        a, b, c, sigma = planes[i, 0], planes[i, 1], planes[i, 2], planes[i, 3]
        for y in range(y0, y1 + 1):
            column_planes[0, y], column_planes[1, y], column_planes[2, y] = a, b * float(y - y0), c
            column_planes[3, y] = sigma if sigma > 0 else np.inf


@njit(cache=True, error_model="numpy")
def _flag_row(value_row, a, bdy, c, scale, dx, z_row, flag_row, spot_height, saturation):
    """The classes of a band's row from its float32 z (``a`` to ``scale``: the band's planes by column).  z
    is computed first, into ``z_row``, and classed in a loop of its own: one loop doing both ran 1.35x
    slower with code for AVX2 (no faster with AVX-512's)."""
    for j in range(value_row.size):
        z_row[j] = (value_row[j] - (a[j] * dx + bdy[j] + c[j])) / scale[j]
    for j in range(value_row.size):
        flag_row[j] = _pixel_flags(z_row[j], value_row[j], spot_height, saturation)


@njit(cache=True, inline="always")
def _pixel_flags(z, value, spot_height, saturation):
    """The classes of a pixel from its float32 z and its value.  ``spot_height`` is ``float32_at_most`` of
    the double threshold, so that the float32 tests here are exactly libdistl's double ones (and run twice as
    wide); the ice thresholds are float32 numbers."""
    # bits 0-3: BELOW_MEDIAN, BELOW_UPPER, STRONG, SATURATED (shifts of int32 vectorise; products are int64)
    return np.uint8(np.int32(z < np.float32(ICE_MEDIAN_Z)) | (np.int32(z < np.float32(ICE_UPPER_Z)) << 1)
                    | (np.int32(z > spot_height) << 2) | (np.int32(value >= saturation) << 3))


def float32_at_most(threshold: float) -> np.float32:
    """The largest float32 not above ``threshold``: for a float32 z, z > it exactly when z > threshold."""
    f = np.float32(threshold)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > threshold else f


@njit(cache=True, error_model="numpy")
def _mark_row(value_row, usable_row, next_row, a, bdy, c, scale, dx, threshold):
    """The next cycle's sample on a band's row: usable pixels whose float32 z is below ``threshold``."""
    for j in range(value_row.size):
        z = np.float32((value_row[j] - (a[j] * dx + bdy[j] + c[j])) / scale[j])
        next_row[j] = usable_row[j] & (z < threshold)


@njit(cache=True)
def _widen_axis(lo, hi, grow, size):
    """Grow a span by ``grow`` on both sides, shifted back onto the image."""
    lo -= grow
    hi += grow
    if lo < 0:
        hi -= lo
        lo = 0
    if hi > size - 1:
        lo = max(0, lo - (hi - size + 1))
        hi = size - 1
    return lo, hi


def classify(pixels: np.ndarray, geometry: Geometry, settings: Settings, region: Region,
             underload: int) -> Classification:
    """Run the three classification cycles; later cycles refine the sample with earlier z-scores."""
    tiling = Tiling.of(geometry, region, settings.scanbox_windows, settings.res_outer, looks_circular(pixels))
    # When every cycle covers the same pixels, the last one rewrites all z-scores, so the earlier ones
    # only need to mark the next cycle's background sample, on the rows it samples: a byte on half the
    # pixels instead of two floats on all.  That holds unless a later window must be widened (its wider
    # sample reads other rows) or a cycle stops early; then everything is classified the long way.
    if tiling.same_coverage:
        result = _run_short(pixels, geometry, settings, underload, tiling)
        if result is not None:
            return result
    return _run_long(pixels, geometry, settings, underload, tiling.cycles)


@dataclass(frozen=True)
class Tiling:
    """The windows of each cycle, and what the short path needs to know of them.  The same for every frame
    of a run (one detector, one geometry; two when some frames look circular), so it is made once: building it is
    ~2 ms of Python a frame."""

    cycles: tuple[np.ndarray, ...]  # (n, 4) windows (x0, x1, y0, y1) of each cycle, read-only
    same_coverage: bool
    sampled_rows: tuple[np.ndarray, ...]  # the rows each cycle after the first samples, read-only

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def of(geometry: Geometry, region: Region, boxes: tuple[int, ...], res_outer: float | None,
           circular: bool = False) -> Tiling:
        cycles = [scanbox_windows(geometry, region, box) for box in boxes]
        if res_outer is not None:
            cycles = [[w for w in windows if _window_reaches(geometry, w, res_outer)] for windows in cycles]
        if circular:
            cycles = [[w for w in windows if _window_in_circle(geometry, w)] for windows in cycles]
        arrays = tuple(_read_only(np.array(windows, dtype=np.int64).reshape(-1, 4)) for windows in cycles)
        rows = tuple(_read_only(_sampled_rows(windows, geometry.size_slow)) for windows in arrays[1:])
        return Tiling(arrays, _same_coverage(arrays), rows)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# No rows to mark: read-only like the tiling's row masks, so that every call of _classify_cycle has the same
# argument types and numba compiles it once (a writable mask here made a second specialisation: 1.3 s).
NO_ROWS = _read_only(np.zeros(0, dtype=np.bool_))


def _sampled_rows(windows: np.ndarray, size: int) -> np.ndarray:
    """The rows a cycle's windows take their stride-2 background samples from."""
    rows = np.zeros(size, dtype=np.bool_)
    for x0, x1 in {(int(w[0]), int(w[1])) for w in windows}:
        rows[x0:x1 + 1:2] = True
    return rows


def _run_short(pixels, geometry, settings, underload, tiling: Tiling) -> Classification | None:
    """Cycles before the last only mark the next one's sample; None when that does not hold (a window
    widened after the first cycle, or a cycle stopped early)."""
    cycles = tiling.cycles
    threshold = float(settings.signal_height)
    usable = _usable(pixels, underload, geometry.saturation, settings.report_overloads)
    # the sample of each cycle.  The marks cover every position the next cycle reads, so neither a copy nor
    # zeros are needed: a later cycle reads unmarked positions only when it widens a window, and then this
    # path gives up and the long one runs.
    sample = [usable if 0.0 < threshold else np.zeros_like(usable)] + [np.empty_like(usable) for _ in cycles[1:]]
    spot_height = float32_at_most(settings.spot_height)
    flags = np.empty(pixels.shape, dtype=np.uint8)  # the last cycle classes its bands' rows, whole
    _flag_rows_outside(flags, pixels, cycles[-1], spot_height, geometry.saturation)
    no_z = np.zeros((0, 0), dtype=np.float32)  # this path keeps no z: the classes are all the stages test
    last = len(cycles) - 1
    for k, windows in enumerate(cycles):
        planes = np.zeros((len(windows), 4))  # a, b, c, sigma
        counts = np.zeros(len(windows), dtype=np.int64)
        sampled_rows = tiling.sampled_rows[k] if k < last else NO_ROWS
        done, widened = _classify_cycle(pixels, sample[k], usable, no_z, flags, sample[min(k + 1, last)], threshold,
                                        spot_height, geometry.saturation, False, k == last, k < last, sampled_rows,
                                        windows, pixels.shape[0], pixels.shape[1], planes, counts)
        if done < len(windows) or (widened and k > 0):
            return None
    return _classification(flags, pixels, windows, planes, counts, [(windows, planes)], None)


def _run_long(pixels, geometry, settings, underload, cycles) -> Classification:
    """Every cycle writes z for all its windows and the next one's sample is taken from it, as libdistl does."""
    z = np.zeros(pixels.shape, dtype=np.float32)
    flags = np.empty(pixels.shape, dtype=np.uint8)  # set from the final z at the end
    threshold = float(settings.signal_height)
    spot_height = float32_at_most(settings.spot_height)
    usable = _usable(pixels, underload, geometry.saturation, settings.report_overloads)
    background = usable if 0.0 < threshold else np.zeros_like(usable)  # z starts at 0 everywhere
    written = []
    error = None
    for number, windows in enumerate(cycles):
        planes = np.zeros((len(windows), 4))  # a, b, c, sigma
        counts = np.zeros(len(windows), dtype=np.int64)
        # the sample is fixed from the previous cycle, so z can be rewritten in place
        done, _ = _classify_cycle(pixels, background, usable, z, flags, background, threshold, spot_height,
                                  geometry.saturation, True, False, False, NO_ROWS, windows,
                                  pixels.shape[0], pixels.shape[1], planes, counts)
        written.append((windows[:done], planes[:done]))
        if done < len(windows):
            # libdistl stops classifying at that window; the DISTL pipeline prints the message and goes on
            error = "cannot distinguish signal/background"
            windows, planes, counts = windows[:done], planes[:done], counts[:done]
            break
        if number < len(cycles) - 1:
            background = usable & (z < np.float64(threshold))
    _flag_all(z, flags, pixels, spot_height, geometry.saturation)  # a pixel's z may come from any cycle
    return _classification(flags, pixels, windows, planes, counts, written, error)


def _classification(flags, pixels, windows, planes, counts, written, error) -> Classification:
    """The result, with the background plane at each window's centre for the resolution tables."""
    centres = np.stack([(windows[:, 0] + windows[:, 1]) // 2, (windows[:, 2] + windows[:, 3]) // 2], axis=1)
    at_centres = planes[:, 0] * (centres[:, 0] - windows[:, 0]) + planes[:, 1] * (centres[:, 1] - windows[:, 2]) \
        + planes[:, 2]
    return Classification(flags=flags, pixels=pixels, window_centres=centres.astype(np.int64),
                          window_background=at_centres, window_sample=counts, written=written, error=error)


@njit(cache=True)
def _flag_all(z, flags, pixels, spot_height, saturation):
    for x in range(z.shape[0]):
        for y in range(z.shape[1]):
            flags[x, y] = _pixel_flags(z[x, y], pixels[x, y], spot_height, saturation)


@njit(cache=True)
def _flag_rows_outside(flags, pixels, windows, spot_height, saturation):
    """Class the rows no window covers as z = 0 (the last cycle classes every row of its bands whole)."""
    covered = np.zeros(flags.shape[0], dtype=np.bool_)
    for i in range(windows.shape[0]):
        covered[windows[i, 0]:windows[i, 1] + 1] = True
    for x in range(flags.shape[0]):
        if not covered[x]:
            _flag_zero_span(flags[x], pixels[x], spot_height, saturation)


@njit(cache=True)
def _flag_zero_span(flag_row, value_row, spot_height, saturation):
    for j in range(value_row.size):  # over 0-based row views, which vectorise (as the row loops above)
        flag_row[j] = _pixel_flags(np.float32(0.0), value_row[j], spot_height, saturation)


@njit(cache=True)
def _usable(pixels, underload, saturation, overloads_usable):
    """Pixels that can be background: not in a gap or bad, and not saturated unless overloads are kept
    (one pass; the numpy way takes three).  One loop over the flat frame and one comparison for each bound:
    0.9x the time of the loop over rows with the overloads test in it, 0.75x with code for AVX2."""
    usable = np.empty(pixels.shape, dtype=np.bool_)
    ceiling = 2 ** 31 if overloads_usable else saturation  # above every int32 value when overloads are kept
    values, out = pixels.ravel(), usable.ravel()
    for k in range(values.size):
        out[k] = (values[k] > underload) & (values[k] < ceiling)
    return usable


def _same_coverage(cycles: list[np.ndarray]) -> bool:
    """Whether every cycle's windows cover exactly the same pixels.

    Compared on the grid cut by every window edge of every cycle: a window covers whole cells of it, so
    equal cell masks mean equal pixel sets.  (The spans along each axis alone are not enough: with
    ``res.outer`` a coarse window can be kept while a fine one inside it is dropped.)
    """
    xs = np.unique(np.concatenate([np.concatenate((w[:, 0], w[:, 1] + 1)) for w in cycles]))
    ys = np.unique(np.concatenate([np.concatenate((w[:, 2], w[:, 3] + 1)) for w in cycles]))
    masks = []
    for w in cycles:
        # each window adds 1 to its cells: +1/-1 at its corners of a difference grid, then two running sums
        i0, i1 = np.searchsorted(xs, w[:, 0]), np.searchsorted(xs, w[:, 1] + 1)
        j0, j1 = np.searchsorted(ys, w[:, 2]), np.searchsorted(ys, w[:, 3] + 1)
        grid = np.zeros((len(xs) + 1, len(ys) + 1), dtype=np.int64)
        for i, j, sign in ((i0, j0, 1), (i0, j1, -1), (i1, j0, -1), (i1, j1, 1)):
            np.add.at(grid, (i, j), sign)
        masks.append(grid.cumsum(axis=0).cumsum(axis=1) > 0)
    return all(np.array_equal(masks[0], m) for m in masks[1:])


def looks_circular(pixels: np.ndarray) -> bool:
    """libdistl's guess that the active area is the circle inscribed in the frame (an image plate's): the
    pixels 50..99 along both axes all hold the same value.  It guesses so for every detector, so a dark
    frame whose corner reads all 0 is classified only in the windows inside that circle."""
    if pixels.shape[0] < 100 or pixels.shape[1] < 100:
        return False
    corner = pixels[50:100, 50:100]
    return bool((corner == corner[0, 0]).all())


def _window_in_circle(geometry: Geometry, window: tuple[int, int, int, int]) -> bool:
    """On a circular frame only windows with all 4 corners in the circle are classified.  libdistl takes
    its radius and both centre coordinates from the slow size alone."""
    r = geometry.size_slow // 2
    x0, x1, y0, y1 = window
    return all((x - r) ** 2 + (y - r) ** 2 <= r * r for x in (x0, x1) for y in (y0, y1))


def _window_reaches(geometry: Geometry, window: tuple[int, int, int, int], res_outer: float) -> bool:
    """With res.outer, only windows with a corner at lower resolution than the limit are classified."""
    x0, x1, y0, y1 = window
    d = pixel_resolution(geometry, np.array([x0, x0, x1, x1]), np.array([y0, y1, y0, y1]))
    return bool(np.any(d > res_outer))
