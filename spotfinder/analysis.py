"""The single entry point: one frame in, one Result out (never an exception for a bad frame)."""
from __future__ import annotations

import time

from .image import FrameError, read_frame
from .params import Params
from .result import Result


def _overrides(params: Params) -> dict:
    return {"beam": params["autoindex_override_beam"], "distance": params["autoindex_override_distance"],
            "wavelength": params["autoindex_override_wavelength"], "twotheta": params["autoindex_override_twotheta"]}


def analyse(path: str, params: Params | None = None) -> Result:
    """Analyse one frame the DISTL way. Bad frames give ``status="error"`` with a one-line cause."""
    params = params or Params()
    start = time.perf_counter()
    try:
        frame = read_frame(path, _overrides(params))
        result = analyse_frame(frame, params)
    except FrameError as exc:
        result = Result.failure(path, str(exc))
    except MemoryError:
        result = Result.failure(path, "out of memory")
    result.proc_ms = round((time.perf_counter() - start) * 1000.0, 3)
    return result


def analyse_frame(frame, params: Params) -> Result:
    # Provisional until the pipeline lands: the frame is read and validated, no spots are counted.
    return Result(path=frame.path, file=frame.label, image_number=frame.image_number, spot_total=0)
