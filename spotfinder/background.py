"""Background and pixel classification: scanbox tiling and DISTL's three plane-fitted cycles.

Each cycle fits a plane to the background sample of every scanbox window and turns every pixel of the window
into a z-score against that plane.  The sample of a cycle excludes pixels the previous cycle found to be
signal, so spots do not lift their own background.  Z and the local background are kept as float32, as
libdistl keeps them: thresholds are then compared on the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .image import Geometry
from .params import Settings

# Module layout along (slow, fast): module width and gap in pixels.
MODULES = {"pilatus": ((195, 17), (487, 7)), "eiger": ((514, 37), (1030, 10))}
MAX_WINDOW = 1000  # libdistl gives up widening a window beyond this width


class ClassificationError(Exception):
    """libdistl's "cannot distinguish signal/background": a window found too little background."""


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
    z: np.ndarray  # float32 z-score of every pixel (0 where no window covered it)
    local_mean: np.ndarray  # float32 background plane value of every pixel
    window_centres: np.ndarray  # (n, 2) int centre (x, y) of each window of the last cycle
    window_background: np.ndarray  # plane value at each centre
    window_sample: np.ndarray  # background sample size of each window
    error: str | None = None  # the "cannot distinguish" message when a cycle stopped early


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


def integer_beam(geometry: Geometry) -> tuple[int, int]:
    """libdistl's beam in pixels, rounded half away from zero."""

    def rnd(v: float) -> int:
        return int(np.sign(v) * np.floor(abs(v) + 0.5))

    return rnd(geometry.beam_x / geometry.pixel_size), rnd(geometry.beam_y / geometry.pixel_size)


def pixel_resolution(geometry: Geometry, x, y):
    """libdistl's d (Angstrom) of pixel (x, y): from the integer beam, 1e9 at the beam itself."""
    bx, by = integer_beam(geometry)
    k = (geometry.pixel_size / geometry.distance) ** 2
    r2 = (np.asarray(x, dtype=float) - bx) ** 2 + (np.asarray(y, dtype=float) - by) ** 2
    denominator = np.sqrt(2.0 - 2.0 / np.sqrt(1.0 + k * r2))
    with np.errstate(divide="ignore"):
        return np.where(denominator < 1e-7, 1e9, geometry.wavelength / np.maximum(denominator, 1e-300))


def _fit_plane(values: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float, float]:
    """Least-squares plane v = a*x + b*y + c through the sample, and the RMS residual (divide by n)."""
    n = values.size
    sx, sy = xs.sum(), ys.sum()
    matrix = np.array([[np.dot(xs, xs), np.dot(xs, ys), sx], [np.dot(xs, ys), np.dot(ys, ys), sy], [sx, sy, n]])
    rhs = np.array([np.dot(xs, values), np.dot(ys, values), values.sum()])
    try:
        a, b, c = np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        a, b, c = 0.0, 0.0, values.mean()
    residual = values - (a * xs + b * ys + c)
    return a, b, c, float(np.sqrt(np.dot(residual, residual) / n))


def classify(pixels: np.ndarray, geometry: Geometry, settings: Settings, region: Region,
             underload: int) -> Classification:
    """Run the three classification cycles; later cycles refine the sample with earlier z-scores."""
    size_x, size_y = pixels.shape
    z = np.zeros(pixels.shape, dtype=np.float32)
    local_mean = np.zeros(pixels.shape, dtype=np.float32)
    values = pixels.astype(np.float64)
    usable = pixels > underload
    if not settings.report_overloads:
        usable &= pixels < geometry.saturation
    centres, backgrounds, samples = [], [], []
    error = None
    for cycle, box in enumerate(settings.scanbox_windows):
        threshold = settings.signal_height
        centres, backgrounds, samples = [], [], []
        background = usable & (z < threshold)
        new_z = z.copy()
        windows = scanbox_windows(geometry, region, box)
        if settings.res_outer is not None:
            windows = [w for w in windows if _window_reaches(geometry, w, settings.res_outer)]
        try:
            for x0, x1, y0, y1 in windows:
                w, h = x1 - x0 + 1, y1 - y0 + 1
                needed = ((w * h * 2) // 3) // 4
                sx0, sx1, sy0, sy1 = x0, x1, y0, y1
                while True:
                    mask = background[sx0:sx1 + 1:2, sy0:sy1 + 1:2]
                    if np.count_nonzero(mask) >= needed:
                        break
                    sx0, sx1, sy0, sy1 = _widen(sx0, sx1, sy0, sy1, size_x, size_y)
                    if sx1 - sx0 + 1 > MAX_WINDOW or sy1 - sy0 + 1 > MAX_WINDOW:
                        raise ClassificationError("cannot distinguish signal/background")
                gx, gy = np.nonzero(mask)
                xs = (sx0 + 2 * gx - x0).astype(np.float64)
                ys = (sy0 + 2 * gy - y0).astype(np.float64)
                sample = values[sx0:sx1 + 1:2, sy0:sy1 + 1:2][mask]
                a, b, c, sigma = _fit_plane(sample, xs, ys)
                plane = (a * np.arange(w)[:, None] + b * np.arange(h)[None, :] + c)
                block = values[x0:x1 + 1, y0:y1 + 1]
                new_z[x0:x1 + 1, y0:y1 + 1] = (block - plane) / sigma if sigma > 0 else 0.0
                local_mean[x0:x1 + 1, y0:y1 + 1] = plane
                cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
                centres.append((cx, cy))
                backgrounds.append(a * (cx - x0) + b * (cy - y0) + c)
                samples.append(sample.size)
        except ClassificationError as exc:
            error = "%s" % exc
            z = new_z
            break
        z = new_z
    return Classification(z=z, local_mean=local_mean, window_centres=np.array(centres, dtype=int).reshape(-1, 2),
                          window_background=np.array(backgrounds, dtype=float), window_sample=np.array(samples),
                          error=error)


def _widen(x0: int, x1: int, y0: int, y1: int, size_x: int, size_y: int) -> tuple[int, int, int, int]:
    """Grow a window by 2*(min side // 3) on each axis, shifted back onto the image."""
    grow = min(x1 - x0 + 1, y1 - y0 + 1) // 3

    def axis(lo: int, hi: int, size: int) -> tuple[int, int]:
        lo, hi = lo - grow, hi + grow
        if lo < 0:
            hi, lo = hi - lo, 0
        if hi > size - 1:
            lo, hi = max(0, lo - (hi - size + 1)), size - 1
        return lo, hi

    return (*axis(x0, x1, size_x), *axis(y0, y1, size_y))


def _window_reaches(geometry: Geometry, window: tuple[int, int, int, int], res_outer: float) -> bool:
    """With res.outer, only windows with a corner at lower resolution than the limit are classified."""
    x0, x1, y0, y1 = window
    d = pixel_resolution(geometry, np.array([x0, x0, x1, x1]), np.array([y0, y1, y0, y1]))
    return bool(np.any(d > res_outer))
