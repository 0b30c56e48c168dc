"""The project's frame simulator: PILATUS-geometry miniCBF frames with known content, for tests and demos.

A frame has a Poisson background, Gaussian spots at known positions, module gaps (-1), bad pixels (-2),
optionally saturated spots and an ice ring.  ``write_cbf`` writes it with a PILATUS_1.2 header that DISTL
and our reader both understand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# PILATUS module layout: (slow, fast) sizes, module width and gap along each axis.
DETECTORS = {"6M": (2527, 2463), "2M": (1679, 1475), "300K": (619, 487)}
MODULE_SLOW, GAP_SLOW, MODULE_FAST, GAP_FAST = 195, 17, 487, 7


@dataclass
class Scene:
    detector: str = "300K"
    wavelength: float = 0.9795
    distance: float = 150.0  # mm
    pixel_size: float = 0.172  # mm
    background: float = 8.0  # mean counts
    spots: list[tuple[float, float, float]] = field(default_factory=list)  # (slow, fast, total counts)
    spot_sigma: float = 0.9  # pixels
    saturation: int = 1048500
    saturated: list[tuple[int, int]] = field(default_factory=list)  # (slow, fast) of saturated spots
    ice_ring_d: float | None = None  # Angstrom
    ice_ring_counts: float = 12.0
    bad_pixels: int = 20
    seed: int = 1
    size: tuple[int, int] | None = None  # (slow, fast) of a frame smaller than the detector, for fast tests

    @property
    def shape(self) -> tuple[int, int]:
        return self.size or DETECTORS[self.detector]

    @property
    def beam(self) -> tuple[float, float]:
        """(slow, fast) beam in pixels: the detector centre."""
        slow, fast = self.shape
        return slow / 2.0, fast / 2.0


def gap_mask(shape: tuple[int, int]) -> np.ndarray:
    """True on pixels between PILATUS modules."""
    slow, fast = shape
    s = np.arange(slow) % (MODULE_SLOW + GAP_SLOW) >= MODULE_SLOW
    f = np.arange(fast) % (MODULE_FAST + GAP_FAST) >= MODULE_FAST
    return s[:, None] | f[None, :]


def render(scene: Scene) -> np.ndarray:
    """The pixel array (int32, (slow, fast)) of a scene."""
    rng = np.random.default_rng(scene.seed)
    slow, fast = scene.shape
    expected = np.full(scene.shape, scene.background, dtype=np.float64)
    if scene.ice_ring_d is not None:
        bs, bf = scene.beam
        r = np.hypot((np.arange(slow)[:, None] - bs), (np.arange(fast)[None, :] - bf)) * scene.pixel_size
        ring_r = scene.distance * math.tan(2 * math.asin(scene.wavelength / (2 * scene.ice_ring_d)))
        expected += scene.ice_ring_counts * np.exp(-0.5 * ((r - ring_r) / (2.5 * scene.pixel_size)) ** 2)
    for x, y, total in scene.spots:
        _add_spot(expected, x, y, total, scene.spot_sigma)
    image = rng.poisson(expected).astype(np.int64)
    for x, y in scene.saturated:
        image[x - 1:x + 2, y - 1:y + 2] = scene.saturation
    image = np.minimum(image, scene.saturation).astype(np.int32)
    image[gap_mask(scene.shape)] = -1
    bad = rng.choice(image.size, scene.bad_pixels, replace=False)
    image.flat[bad] = -2
    return image


def _add_spot(expected: np.ndarray, x: float, y: float, total: float, sigma: float) -> None:
    half = int(4 * sigma) + 1
    x0, y0 = int(round(x)), int(round(y))
    xs = np.arange(x0 - half, x0 + half + 1)
    ys = np.arange(y0 - half, y0 + half + 1)
    xs, ys = xs[(xs >= 0) & (xs < expected.shape[0])], ys[(ys >= 0) & (ys < expected.shape[1])]
    profile = np.exp(-0.5 * (((xs[:, None] - x) / sigma) ** 2 + ((ys[None, :] - y) / sigma) ** 2))
    expected[np.ix_(xs, ys)] += total * profile / (2 * math.pi * sigma * sigma)


def random_spots(scene: Scene, count: int, total: float = 3000.0, margin: int = 40) -> list[tuple[float, float, float]]:
    """Spot positions inside modules (not on gaps, away from the edges), reproducible from the seed."""
    rng = np.random.default_rng(scene.seed + 1)
    slow, fast = scene.shape
    gaps = gap_mask(scene.shape)
    spots: list[tuple[float, float, float]] = []
    while len(spots) < count:
        x, y = rng.uniform(margin, slow - margin), rng.uniform(margin, fast - margin)
        near = gaps[int(x) - 3:int(x) + 4, int(y) - 3:int(y) + 4].any()
        far_from_others = all(math.hypot(x - a, y - b) > 12 for a, b, _ in spots)
        far_from_beam = math.hypot(x - scene.beam[0], y - scene.beam[1]) > 30
        if not near and far_from_others and far_from_beam:
            spots.append((x, y, total))
    return spots


def frame_of(scene: Scene, name: str):
    """The scene as a decoded Frame, without a file: its geometry comes from its own header through the
    reader's parser, so it is what reading its CBF would give, to the last bit."""
    from .image import Frame, geometry_from_header, name_template, parse_header

    slow, fast = scene.shape
    head = ("_array_data.header_contents\n;\n%s\n;\n_array_data.data\n;\n--CIF-BINARY-FORMAT-SECTION--\n"
            "X-Binary-Size-Fastest-Dimension: %d\nX-Binary-Size-Second-Dimension: %d\n\n"
            % (header_text(scene), fast, slow))
    template, number, _ = name_template(name)
    return Frame(path=name, pixels=render(scene), geometry=geometry_from_header(parse_header(head.encode())),
                 template=template, image_number=number)


def header_text(scene: Scene) -> str:
    bs, bf = scene.beam
    lines = [
        "Detector: PILATUS3 %s, S/N 60-0000 (simulated)" % scene.detector,
        "2026-01-01T00:00:00.000",
        "Pixel_size %de-6 m x %de-6 m" % (round(scene.pixel_size * 1000), round(scene.pixel_size * 1000)),
        "Silicon sensor, thickness 0.000450 m",
        "Exposure_time 0.0400000 s",
        "Exposure_period 0.0400000 s",
        "Count_cutoff %d counts" % scene.saturation,
        "Wavelength %.5f A" % scene.wavelength,
        "Detector_distance %.5f m" % (scene.distance / 1000.0),
        "Beam_xy (%.2f, %.2f) pixels" % (bf, bs),
        "Start_angle 0.0000 deg.",
        "Angle_increment 0.1000 deg.",
        "Detector_2theta 0.0000 deg.",
    ]
    return "\n".join("# " + line for line in lines)


def write_cbf(path: str, scene: Scene, pixels: np.ndarray | None = None) -> np.ndarray:
    """Write a scene (or given pixels) as a byte-offset miniCBF; returns the pixels."""
    from fabio.cbfimage import CbfImage

    pixels = render(scene) if pixels is None else pixels
    header = {"_array_data.header_convention": "PILATUS_1.2", "_array_data.header_contents": header_text(scene)}
    CbfImage(data=pixels, header=header).write(path)
    return pixels
