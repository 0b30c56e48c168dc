"""Detector geometry and DISTL's two conventions for it, side by side.

DISTL computes resolution in two places that do not agree to the last bit, and its numbers come from both:

* **libdistl (C++)**, which classifies pixels, finds ice rings and computes Method 1, gets the beam as a
  ``"%f"`` string in mm and rounds it to an *integer pixel*; its d of a pixel is
  ``wavelength / sqrt(2 - 2 / sqrt(1 + k r^2))`` with ``k = (pixel / distance)^2``, r in pixels from that
  integer beam (:func:`integer_beam`, :func:`pixel_resolution`, :func:`pixel_d`, :func:`radius_px`).
* **DISTL's Python layer**, which runs the filter chain, Method 2, the bin tables and the maximum cell, gets
  every geometry value as a ``"%f"`` string (:func:`python_geometry`) and works in mm from the exact beam
  with math's trigonometry (:func:`radius_mm`, :func:`resolution_at_mm` and their array forms, which call
  math's functions element by element so the bits are the same).

Each stage of the library uses the convention of the DISTL layer it reproduces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .jit import njit


@dataclass(frozen=True)
class Geometry:
    """Detector geometry in DISTL's frame: x is the slow axis, y the fast one, lengths in mm."""

    wavelength: float  # Angstrom
    distance: float  # mm
    pixel_size: float  # mm
    beam_x: float  # slow, mm
    beam_y: float  # fast, mm
    saturation: int  # Count_cutoff
    twotheta: float  # degrees, 0 when below 0.02
    size_slow: int
    size_fast: int
    vendortype: str

    @property
    def family(self) -> str:
        """'pilatus', 'eiger' or 'other': selects the tiling and DISTL's per-detector defaults."""
        if self.vendortype.startswith("Pilatus"):
            return "pilatus"
        if self.vendortype.startswith("Eiger"):
            return "eiger"
        return "other"


# ----- libdistl (C++): integer beam, pixels ------------------------------------------------------------
def integer_beam(geometry: Geometry) -> tuple[int, int]:
    """libdistl's beam in pixels, rounded half away from zero.

    DISTL hands libdistl the beam as a "%f" string (mm), so a beam on a half pixel can round either way
    after the division: 41.882 mm / 0.172 mm is 243.49999999999997, pixel 243.
    """

    def rnd(v: float) -> int:
        return int(np.sign(v) * np.floor(abs(v) + 0.5))

    return (rnd(float("%f" % geometry.beam_x) / geometry.pixel_size),
            rnd(float("%f" % geometry.beam_y) / geometry.pixel_size))


def pixel_resolution(geometry: Geometry, x, y):
    """libdistl's d (Angstrom) of pixels (x, y): from the integer beam, 1e9 at the beam itself."""
    bx, by = integer_beam(geometry)
    k = (geometry.pixel_size / geometry.distance) ** 2
    xs, ys = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    out = _resolutions(xs.ravel(), ys.ravel(), bx, by, k, geometry.wavelength)
    return out.reshape(xs.shape) if xs.ndim else float(out[0])


@njit(cache=True)
def pixel_d(x, y, bx, by, k, wavelength):
    """d = wavelength / sqrt(2 - 2 / sqrt(1 + k r^2)) with k = (pixel / distance)^2; 1e9 near the beam."""
    r2 = (x - bx) ** 2 + (y - by) ** 2
    denominator = np.sqrt(2.0 - 2.0 / np.sqrt(1.0 + k * r2))
    return 1e9 if denominator < 1e-7 else wavelength / denominator


@njit(cache=True)
def _resolutions(xs, ys, bx, by, k, wavelength):
    out = np.empty(xs.size)
    for i in range(xs.size):
        out[i] = pixel_d(xs[i], ys[i], bx, by, k, wavelength)
    return out


def radius_px(geometry: Geometry, d: float) -> float:
    """libdistl's inverse of its d formula: r in pixels at resolution d."""
    k = (geometry.pixel_size / geometry.distance) ** 2
    ratio = (geometry.wavelength / d) ** 2
    return math.sqrt(max(0.0, ((2.0 / (2.0 - ratio)) ** 2 - 1.0) / k))


# ----- DISTL's Python layer: "%f" values, mm, math's trigonometry -----------------------------------------
def python_geometry(g: Geometry) -> Geometry:
    """DISTL hands geometry to its Python layer as "%f" strings; round the same way so d agrees."""

    def six(v: float) -> float:
        return float("%f" % v)

    return replace(g, wavelength=six(g.wavelength), distance=six(g.distance), pixel_size=six(g.pixel_size),
                   beam_x=six(g.beam_x), beam_y=six(g.beam_y), twotheta=six(g.twotheta))


def radius_mm(geometry: Geometry, d: float) -> float:
    """r (mm) on the detector of resolution d, as DISTL's Python layer computes it."""
    ratio = geometry.wavelength / (2.0 * d)
    if ratio >= 1.0:
        return math.inf
    return geometry.distance * math.tan(2.0 * math.asin(ratio))


def radii_mm(geometry: Geometry, d: np.ndarray) -> np.ndarray:
    """``radius_mm`` of each d, bit for bit: math's asin and tan, the arithmetic in numpy."""
    with np.errstate(divide="ignore"):
        ratio = geometry.wavelength / (2.0 * np.asarray(d, dtype=float))
    radius = np.full(ratio.shape, math.inf)
    on = np.flatnonzero(~(ratio >= 1.0))
    angle = 2.0 * np.array(list(map(math.asin, ratio[on].tolist())), dtype=float)
    radius[on] = geometry.distance * np.array(list(map(math.tan, angle.tolist())), dtype=float)
    return radius


def resolution_at_mm(geometry: Geometry, r: float) -> float:
    theta = math.atan2(r, geometry.distance) / 2.0
    return geometry.wavelength / (2.0 * math.sin(theta)) if theta > 0 else math.inf


def resolutions_at_mm(geometry: Geometry, r: np.ndarray) -> np.ndarray:
    """``resolution_at_mm`` of each r, bit for bit: math's atan2 and sin, the arithmetic in numpy."""
    r = np.asarray(r, dtype=float).tolist()
    theta = np.array(list(map(math.atan2, r, [geometry.distance] * len(r))), dtype=float) / 2.0
    sine = np.array(list(map(math.sin, theta.tolist())), dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(theta > 0, geometry.wavelength / (2.0 * sine), math.inf)
