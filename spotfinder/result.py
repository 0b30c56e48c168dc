"""The one result schema: what the analysis of one frame produced, as JSON-ready fields."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

# Field order of as_dict(); consumers (JSON lines, PUB messages, HTTP) rely on these names.
FIELDS = (
    "file", "image_number", "frame_index", "status", "error", "spot_total", "remove_ice", "in_resolution_total",
    "good_bragg_candidates", "ice_rings", "method1_resolution", "method2_resolution", "max_unit_cell",
    "eccentricity", "saturation_top_peaks", "saturation_percent", "overloaded_spots",
    "total_integrated_signal", "focus_spots", "proc_ms",
)


def _plain(value):
    """numpy scalars as Python numbers, so results encode as standard JSON; NaN becomes None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


@dataclass
class Result:
    """One frame's outcome.  ``details`` carries what only the text report needs (bin tables, spots)."""

    path: str
    file: str
    image_number: int | None = None
    frame_index: int | None = None  # 0-based frame index in an HDF5 series; None for a CBF
    status: str = "ok"
    error: str | None = None
    spot_total: int | None = None
    remove_ice: int | None = None
    in_resolution_total: int | None = None
    good_bragg_candidates: int | None = None
    ice_rings: int | None = None
    method1_resolution: float | None = None
    method2_resolution: float | None = None
    max_unit_cell: float | None = None
    eccentricity: float | None = None
    saturation_top_peaks: int | None = None
    saturation_percent: float | None = None
    overloaded_spots: int | None = None
    total_integrated_signal: int | None = None
    focus_spots: int | None = None
    proc_ms: float = 0.0
    details: object = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        """JSON-ready fields (plain Python numbers); ``file`` is the path as given, ``None`` where DISTL
        prints None."""
        out = {name: _plain(getattr(self, name)) for name in FIELDS}
        out["file"] = self.path
        return out

    @classmethod
    def failure(cls, path: str, error: str, frame_index: int | None = None) -> Result:
        return cls(path=path, file=os.path.basename(path), frame_index=frame_index, status="error", error=error)
