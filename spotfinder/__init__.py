"""DISTL-compatible spot finding for X-ray diffraction frames (the analysis library; no service code).

The parameters (pure Python) load with the package; the analysis and the frame reader, which bring numpy
and numba (about half a second), load on first use of their names (PEP 562), so the commands and services
that only parse parameters or settings start at once.
"""
import importlib

from .params import ParameterError, Params, parse_words

_MODULE_OF = {"analyse": ".analysis", "read_frame": ".image", "FrameError": ".image", "Result": ".result",
              "open_series": ".nexus"}

__all__ = ["analyse", "read_frame", "FrameError", "Params", "ParameterError", "parse_words", "Result", "open_series"]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
