"""A tiny synthetic PILATUS-style miniCBF frame, for tests that must run without the shared real data."""
from __future__ import annotations

import fabio.cbfimage
import numpy as np

HEADER = """# Detector: PILATUS 300K, S/N 3-0000, synthetic
# 2026-01-01T00:00:00.000
# Pixel_size 172e-6 m x 172e-6 m
# Silicon sensor, thickness 0.000450 m
# Exposure_time 0.1 s
# Exposure_period 0.1 s
# Count_cutoff 1048575 counts
# Wavelength 0.9795 A
# Detector_distance 0.2 m
# Beam_xy (%(beam_x).1f, %(beam_y).1f) pixels
# Start_angle 0.0 deg.
# Angle_increment 0.1 deg.
"""


def make_frame(path: str, shape: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """Write a noise frame with a valid header; returns the bytes written."""
    pixels = np.random.default_rng(seed).poisson(5.0, size=shape).astype(np.int32)
    image = fabio.cbfimage.CbfImage(data=pixels)
    image.header["_array_data.header_convention"] = "PILATUS_1.2"
    image.header["_array_data.header_contents"] = HEADER % {"beam_x": shape[1] / 2, "beam_y": shape[0] / 2}
    image.write(path)
    with open(path, "rb") as fh:
        return fh.read()
