"""DISTL-compatible spot finding for X-ray diffraction frames (the analysis library; no service code)."""
from .analysis import analyse
from .image import FrameError, read_frame
from .params import ParameterError, Params, parse_words
from .result import Result

__all__ = ["analyse", "read_frame", "FrameError", "Params", "ParameterError", "parse_words", "Result"]
