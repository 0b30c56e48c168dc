"""The one table of DISTL parameters, and the ``key=value`` parser shared by the CLI and the HTTP API.

The table lists every definition of ``distl.signal_strength``'s master parameters (paths, types, defaults
and expert levels as the real program has them), because key matching scores a word against *all* of
them: ``outer=2`` means ``distl.res.outer`` and ``verbose=True`` is ambiguous.  Values are kept as
Python objects in an immutable mapping keyed by full path.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass


class ParameterError(ValueError):
    """A word that is not a known parameter (``unknown``) or has a value that does not convert."""

    def __init__(self, message: str, *, unknown: bool = False):
        super().__init__(message)
        self.unknown = unknown


@dataclass(frozen=True)
class Parameter:
    path: str
    kind: str  # str, bool, int, float, ints, floats
    default: object = None
    expert_level: int = 0
    help: str = ""
    size: tuple[int, int] | None = None  # (min, max) number of values for ints/floats
    value_min: float | None = None  # inclusive; 1e-6 stands for "positive"
    value_max: float | None = None


def _p(path, kind, default=None, expert_level=0, help="", **kw):
    return Parameter(path, kind, default, expert_level, help, **kw)


# Order is the order of the real program's definitions (it decides nothing but the listing).
PARAMETERS: tuple[Parameter, ...] = (
    _p("distl.image", "str", help="Image file name"),
    _p("distl.res.outer", "float", value_min=1e-6, help="High resolution limit in angstroms"),
    _p("distl.res.inner", "float", value_min=1e-6, help="Low resolution limit in angstroms"),
    _p("distl.verbose", "bool", False, help="Lengthy spot printout"),
    _p("distl.dxtbx", "bool", False, help="Accepted and ignored (dead switch in DISTL)"),
    _p("distl.bins.verbose", "bool", False, help="Additional printout binned by resolution range"),
    _p("distl.bins.N", "int", 20, value_min=1, help="Maximum number of bins"),
    _p("distl.bins.corner", "bool", True, help="Extend the binning to the detector corner"),
    _p("distl.range", "ints", None, size=(1, 2), value_min=0, help="HDF5 image index or [a,b) range"),
    _p("wedgelimit", "int", 2, 2),
    _p("goniometer_rotation", "str", "", 3),
    _p("convention_override", "int", None, 3),
    _p("spot_convention", "int", None, 3),
    _p("override_pickled_spotfinders", "bool", True, 3),
    _p("spotfinder_header_tests", "bool", True, 3),
    _p("spotfinder_mode", "str", "distl", 3),
    _p("spotfinder_verbose", "bool", False, 2),
    _p("force_method2_resolution_limit", "float", None, 2),
    _p("distl_lowres_limit", "float", 50.0, 3, value_min=1e-6),
    _p("distl_highres_limit", "float", None, 3),
    _p("distl_binned_image_spot_size", "int", 4, 2),
    _p("distl_maximum_number_spots_for_indexing", "int", 300, 3),
    _p("distl_minimum_number_spots_for_indexing", "int", 40, 3, value_min=2),  # halved, then divides
    _p("distl_profile_bumpiness", "int", 2, 2),
    _p("distl_report_overloads", "bool", True, 3),
    _p("distl_keep_Zdata", "bool", True, 3),
    _p("percent_overlap_forcing_detail", "float", 30.0, 3),
    _p("overlapping_spot_criterion", "float", 1.2, 3),
    _p("spots_pickle", "str", "./DISTL_pickle", 3),
    _p("distl_spotcenter_algorithm", "str", "center_of_mass", 3),
    _p("distl_permit_binning", "bool", True, 2),
    _p("distl_force_binning", "bool", False, 2),
    _p("autoindex_override_beam", "floats", None, 1, "Beam (slow, fast) in mm", size=(2, 2)),
    _p("autoindex_override_distance", "float", None, 1, "Detector distance in mm"),
    _p("autoindex_override_wavelength", "float", None, 1, "Wavelength in Angstrom"),
    _p("autoindex_override_twotheta", "float", None, 1, "Detector two-theta in degrees"),
    _p("autoindex_override_deltaphi", "float", None, 1),
    _p("image_specific_osc_start", "str", None, 1),
    _p("codecamp.maxcell", "float", None, 2, "Print this as the maximum unit cell"),
    _p("codecamp.minimum_spot_count", "int", None, 2),
    _p("pdf_output.file", "str", "", 4),
    _p("pdf_output.box_selection", "str", "all", 4),
    _p("pdf_output.enable_legend", "bool", False, 4),
    _p("pdf_output.enable_legend_font_size", "float", 10.0, 4),
    _p("pdf_output.enable_legend_ink_color", "str", "black", 4),
    _p("pdf_output.enable_legend_vertical_offset", "float", 10.0, 4),
    _p("pdf_output.box_linewidth", "float", 0.04, 4),
    _p("pdf_output.window_fraction", "float", 0.666666, 4),
    _p("pdf_output.window_offset_x", "float", 0.16667, 4),
    _p("pdf_output.window_offset_y", "float", 0.16667, 4),
    _p("pdf_output.markup_inliers", "bool", True, 4),
    _p("pdf_output.render_all", "bool", False, 4),
    _p("pdf_output.profile_shrink", "int", 0, 4),
    _p("distl.minimum_spot_area", "int", None, value_min=1, help="Minimum spot area in pixels (PADs 5, others 10)"),
    _p("distl.minimum_signal_height", "float", None, value_min=1e-6,
       help="Background cut in sigma (PILATUS 2.5, Eiger 4, CCD 1.5)"),
    _p("distl.minimum_spot_height", "float", None, value_min=1e-6, help="Spot maximum and growth cut in sigma (3.5)"),
    _p("distl.spot_area_maximum_factor", "float", None, value_min=1e-6,
       help="Maximum spot area as a multiple of the minimum (5)"),
    _p("distl.peak_intensity_maximum_factor", "float", None, help="Peak height filter factor (10)"),
    _p("distl.method2_cutoff_percentage", "float", 20.0, value_min=1e-6, help="Method 2 shell cutoff in percent"),
    _p("distl.compactness_filter", "bool", False, help="Drop small non-compact spots"),
    _p("distl.detector_tiling", "ints", None, 2),
    _p("distl.tile_translations", "ints", None, 2),
    _p("distl.tile_flags", "ints", None, 2, value_min=0, value_max=1),
    _p("distl.quad_translations", "ints", None, 2),
    _p("distl.detector_format_version", "str", None, 2),
    # at most 1448: windows (< 2 boxes wide) then stay below 2896 pixels, where the background fit's sums in
    # doubles are exact (background._add_row_moments)
    _p("distl.scanbox_windows", "ints", (101, 51, 51), size=(3, 3), value_min=10, value_max=1448,
       help="Background box sizes of the three classification cycles"),
    _p("distl.peripheral_margin", "int", 20, value_min=0, help="Margin in pixels without spots"),
    _p("distl.pdf_output", "str", None),
    _p("distl.image_viewer", "bool", False, 2),
    _p("distl.port", "int", 8125, help="Server port"),
    _p("distl.processors", "int", 1, help="Server worker processes"),
    _p("distl.nproc", "int", 1, help="Defined by DISTL, never used"),
)

BY_PATH: dict[str, Parameter] = {p.path: p for p in PARAMETERS}

# Detector-specific defaults DISTL applies per image (config_detector); see effective_settings().
PILATUS_SIGNAL_HEIGHT = 2.5
EIGER_SIGNAL_HEIGHT = 4.0
CCD_SIGNAL_HEIGHT = 1.5
PAD_SPOT_AREA = 5
CCD_SPOT_AREA = 10
DEFAULT_SPOT_HEIGHT = 3.5
DEFAULT_AREA_FACTOR = 5.0
DEFAULT_PEAK_FACTOR = 10.0


class Params(Mapping):
    """Immutable values of every parameter, keyed by full path."""

    def __init__(self, values: Mapping[str, object] | None = None):
        merged = {p.path: p.default for p in PARAMETERS}
        merged.update(values or {})
        self._values = merged
        self._explicit = frozenset(values or ())

    def __getitem__(self, path: str) -> object:
        return self._values[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **by_path: object) -> Params:
        """A copy with some values changed; keys are full paths with dots written as ``__``."""
        updates = {k.replace("__", "."): v for k, v in by_path.items()}
        unknown = set(updates) - set(BY_PATH)
        if unknown:
            raise KeyError(", ".join(sorted(unknown)))
        return Params({**self.explicit(), **updates})

    def merged(self, other: Params) -> Params:
        """These values, overridden by what ``other`` set explicitly (server defaults + request)."""
        return Params({**self.explicit(), **other.explicit()})

    def explicit(self) -> dict[str, object]:
        return {k: self._values[k] for k in self._explicit}

    def __repr__(self) -> str:
        return "Params(%r)" % self.explicit()


def _path_score(word: str, target: str, home_scope: str | None) -> int:
    """How well a word names a definition path; the real program's scoring, higher is better."""
    if word not in target:
        return 0
    if target == word:
        return 8
    in_home = False
    if home_scope is not None:
        if home_scope + "." + word == target:
            return 7
        if target.startswith(home_scope + "."):
            if target.endswith("." + word):
                return 6
            if target.endswith(word):
                return 5
            in_home = True
    if in_home:
        return 2
    if target.endswith("." + word):
        return 4
    if target.endswith(word):
        return 3
    return 1


def resolve_key(key: str, home_scope: str | None = "distl") -> Parameter:
    """The parameter a key names (full path or unique suffix); None when unknown or ambiguous."""
    scored = [(_path_score(key, p.path, home_scope), p) for p in PARAMETERS]
    best = max(s for s, _ in scored)
    if best == 0:
        return None
    tied = [p for s, p in scored if s == best]
    if len(tied) > 1:  # ties are broken towards the lower expert level, as the real interpreter does
        lowest = min(p.expert_level for p in tied)
        tied = [p for p in tied if p.expert_level == lowest]
        if len(tied) > 1:
            return None
    return tied[0]


def _power(base, exponent):
    """``**``, but a power of whole numbers with a large exponent is taken in floats: ``9**9**9`` in integers
    would tie a thread up for minutes, in floats it overflows at once (and is refused as infinite)."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and abs(exponent) > 64:
        try:
            return float(base) ** exponent
        except OverflowError:
            return math.inf
    return base ** exponent


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: _power, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}


def _numeric(text: str) -> float:
    """Evaluate a numeric expression (DISTL accepts ``2*1.5``) without eval(); an infinite or NaN result
    (``1e999``, ``10**400``) is refused as ``inf`` and ``nan`` are."""

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError("not a number")

    try:
        value = walk(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as exc:
        raise ValueError("not a numeric expression") from exc
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond any float (10**400) is as infinite as 1e999 for a float parameter
        finite = False
    if not finite:
        raise ValueError("not a finite number")
    return value


def convert(param: Parameter, text: str) -> object:
    """A parameter's value from its text; ValueError with a short reason when it does not convert."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    if text == "None" and param.kind != "str":
        return None
    if param.kind == "str":
        return None if text == "None" else text
    if param.kind == "bool":
        lowered = text.lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        raise ValueError("not a boolean (True or False)")
    if param.kind in ("int", "float"):
        values = [_numeric(text)]
    else:
        values = [_numeric(t) for t in text.replace(",", " ").split()]
        low, high = param.size or (0, 10**9)
        if not low <= len(values) <= high:
            raise ValueError("needs %s values" % (low if low == high else "%d to %d" % (low, high)))
    if param.kind in ("int", "ints"):
        if any(float(v) != int(v) for v in values):
            raise ValueError("not an integer")
        values = [int(v) for v in values]
    else:
        values = [float(v) for v in values]
    for v in values:
        if param.value_min is not None and v < param.value_min:
            raise ValueError("below the minimum %g" % param.value_min)
        if param.value_max is not None and v > param.value_max:
            raise ValueError("above the maximum %g" % param.value_max)
    return values[0] if param.kind in ("int", "float") else tuple(values)


def parse_word(word: str, home_scope: str | None = "distl") -> tuple[str, object]:
    """One ``key=value`` word as (path, value); DISTL's error text for an unknown or ambiguous key."""
    key, sep, text = word.partition("=")
    key = key.strip()
    param = resolve_key(key, home_scope) if sep and key else None
    if param is None:
        raise ParameterError("Unknown file or keyword: %s" % word, unknown=True)
    try:
        return param.path, convert(param, text)
    except ValueError as exc:
        raise ParameterError("Bad value for %s: %r (%s)" % (param.path, text.strip(), exc)) from None


def parse_words(words: Iterable[str], base: Params | None = None, home_scope: str | None = "distl") -> Params:
    """Parameters from ``key=value`` words, over ``base`` (or the defaults); a later word wins."""
    values = dict(base.explicit()) if base is not None else {}
    for word in words:
        path, value = parse_word(word, home_scope)
        values[path] = value
    return Params(values)


def _show(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return '"%s"' % value
    if isinstance(value, tuple):
        return " ".join(_show(v) for v in value)
    if isinstance(value, float):
        return "%.10g" % value  # phil's float format: 20.0 prints as 20
    return str(value)


def listing(params: Params, max_expert_level: int = 1) -> str:
    """Our own parameter listing, in the nested ``scope { key = value }`` form DISTL prints."""
    lines: list[str] = []
    open_scopes: list[str] = []
    for p in PARAMETERS:
        *scopes, name = p.path.split(".")
        common = 0
        while common < min(len(scopes), len(open_scopes)) and scopes[common] == open_scopes[common]:
            common += 1
        while len(open_scopes) > common:
            open_scopes.pop()
            lines.append("  " * len(open_scopes) + "}")
        for scope in scopes[common:]:
            lines.append("  " * len(open_scopes) + scope + " {")
            open_scopes.append(scope)
        if p.expert_level <= max_expert_level:  # a scope is shown even when all it holds is hidden, as phil does
            lines.append("  " * len(open_scopes) + "%s = %s" % (name, _show(params[p.path])))
    while open_scopes:
        open_scopes.pop()
        lines.append("  " * len(open_scopes) + "}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Settings:
    """The values the analysis uses for one frame, after DISTL's per-detector defaults and clamps."""

    signal_height: float  # background cut (bgupperint), sigma
    spot_height: float  # maxima and growth cut (difflowerint), sigma
    spot_area_min: int
    spot_area_max: int
    peak_factor: float
    scanbox_windows: tuple[int, int, int]
    margin: int
    res_outer: float | None
    res_inner: float
    method2_ratio: float
    compactness: bool
    bumpiness: int
    report_overloads: bool
    overlap: float  # overlapping_spot_criterion: a spot this many major axes from its neighbour is close
    neighbour_bins: int  # NspotMin // 2: the scale of the neighbour-distance histogram for the max cell


def effective_settings(params: Params, family: str) -> Settings:
    """DISTL's per-detector defaults: ``family`` is 'pilatus', 'eiger' or 'other'."""
    area = params["distl.minimum_spot_area"]
    signal = params["distl.minimum_signal_height"]
    if family == "pilatus":
        signal = PILATUS_SIGNAL_HEIGHT if signal is None else signal
        # Quirk kept: DISTL clamps a PILATUS user value above 5 down to 5 (its output is identical).
        area = PAD_SPOT_AREA if area is None or area > PAD_SPOT_AREA else area
    elif family == "eiger":
        signal = EIGER_SIGNAL_HEIGHT if signal is None else signal
        area = PAD_SPOT_AREA if area is None else area
    else:
        signal = CCD_SIGNAL_HEIGHT if signal is None else signal
        area = CCD_SPOT_AREA if area is None else area
    spot_height = params["distl.minimum_spot_height"]
    spot_height = DEFAULT_SPOT_HEIGHT if spot_height is None else spot_height
    spot_height = max(spot_height, signal)
    factor = params["distl.spot_area_maximum_factor"]
    factor = max(1.0, DEFAULT_AREA_FACTOR if factor is None else factor)
    peak = params["distl.peak_intensity_maximum_factor"]
    inner = params["distl.res.inner"]
    return Settings(
        signal_height=float(signal),
        spot_height=float(spot_height),
        spot_area_min=int(area),
        spot_area_max=int(area * factor),
        peak_factor=float(DEFAULT_PEAK_FACTOR if peak is None else peak),
        scanbox_windows=tuple(params["distl.scanbox_windows"]),
        margin=int(params["distl.peripheral_margin"]),
        res_outer=params["distl.res.outer"],
        res_inner=float(params["distl_lowres_limit"] if inner is None else inner),
        method2_ratio=100.0 / float(params["distl.method2_cutoff_percentage"]),
        compactness=bool(params["distl.compactness_filter"]),
        bumpiness=int(params["distl_profile_bumpiness"]),
        overlap=float(params["overlapping_spot_criterion"]),
        neighbour_bins=int(params["distl_minimum_number_spots_for_indexing"]) // 2,
        report_overloads=bool(params["distl_report_overloads"]),
    )
