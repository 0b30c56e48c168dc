"""The one text formatter: what DISTL prints for a frame, byte for byte (bin tables, stats, spot listing)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .result import Result
from .sums import flex_mean, sequential_sum, spreadsheet_total

LEGEND = """Limit: outer edge of (equal-volume) resolution shell (Angstroms)
Population: number of spots in the resolution shell
Missing: fraction of reciprocal space shell recorded in complete rotation, accounting for missing cone
Fract: fraction of shell recorded, accounting for truncated detector corner
PxlBkgrd: mean pixel background at center of scanbox windows in the shell
MnWndwSz: mean scanbox window size in pixels after discarding spot pixels
Integrated: total integrated signal within the shell in analog-digital units above background
MeanI: mean integrated signal for spots within the shell
MeanBkg: mean integrated background for spots within the shell
MeanSz: mean pixel count for spots within the shell
MeanIsigI: mean I over sig(I) for spots within the shell
MnEccen: mean eccentricity for spots within the shell; 0=circle, 1=parabola
MnSkew: mean skewness for spots within the shell; skew:= (maximum-center_of_gravity)/semimajor_axis
"""

COLUMNS = (("Limit", "%.2f"), ("Population", "%7d"), ("Missing", "%.2f"), ("Fract", "%.2f"), ("PxlBkgrd", "%.1f"),
           ("MnWndwSz", "%.0f"), ("Integrated", "%.0f"), ("MeanI", "%.0f"), ("MeanBkg", "%.1f"), ("MeanSz", "%.0f"),
           ("MeanIsigI", "%.3f"), ("MnEccen", "%.3f"), ("MnSkew", "%.3f"))
SUMMED = ("Population", "Integrated")
WEIGHTED = ("MeanI", "MeanBkg", "MeanSz", "MeanIsigI", "MnEccen", "MnSkew")

BANNER = "distl.signal_strength: characterization of candidate Bragg spots"


@dataclass
class BinTable:
    """One resolution-bin table: a message and one list of values per column (None = no background)."""

    message: str
    columns: dict[str, list]
    legend: bool


@dataclass
class SpotListing:
    """What distl.verbose prints for one focus spot."""

    area: int
    peak_wts: float
    signal: float
    peak_z: float
    x: int
    y: int
    value: int
    body: list[tuple[int, int, int, float]]  # x, y, pixel value, height above background


@dataclass
class Details:
    """What only the text report needs beyond the result fields."""

    echo_template: bool
    tables: list[BinTable]
    focus_signals: list[float]
    focus_saturations: list[float]
    inlier_signal: float
    listing: list[SpotListing] | None
    cutoff_percent: float
    classification_error: str | None
    # Method 2 before the result's rounding to 0.01 A: the BCSB XML prints it to 0.001 A
    method2_unrounded: float | None


def _table(table: BinTable) -> list[str]:
    cols = table.columns
    rows = len(cols["Limit"])
    width = {name: max(len(name), len(fmt % cols[name][0])) if cols[name][0] is not None else len(name)
             for name, fmt in COLUMNS}
    lines = ["".join("%*s  " % (width[name], name) for name, _ in COLUMNS)]
    pops = cols["Population"]
    for j in range(rows):
        if max(pops[j:]) > 0 and cols["PxlBkgrd"][j] is not None:
            lines.append("".join("%*s  " % (width[name], fmt % cols[name][j]) for name, fmt in COLUMNS))
    lines.append("".join((" " + "-" * width[name] + " ") if name in SUMMED else " " * (width[name] + 2)
                         for name, _ in COLUMNS))
    total_weight = sum(pops)  # integers
    cells = []
    for name, fmt in COLUMNS:
        if name in SUMMED:
            cells.append("%*s  " % (width[name], fmt % spreadsheet_total(cols[name])))
        elif name in WEIGHTED:
            # a table whose spots all fall beyond its last row (2-theta frames) has no weight at all
            mean = weighted_total(pops, cols[name]) / total_weight if total_weight else 0.0
            cells.append("%*s  " % (width[name], fmt % mean))
        else:
            cells.append(" " * (width[name] + 2))
    lines.append("".join(cells))
    return lines


def weighted_total(weights: list[int], values: list) -> float:
    """The sum of weight * value over the rows, added row by row as DISTL's total row and BCSB reply do."""
    return sequential_sum(w * v for w, v in zip(weights, values))


def _value(fmt: str, value) -> str:
    return "None" if value is None else fmt % value


def stats_block(result: Result) -> list[str]:
    """The "pretty_image_stats" block, labels right-justified to 25 characters."""
    sat_label = "%%Saturation, Top %d Peaks" % result.saturation_top_peaks
    items = [("File", "%s", result.file), ("Spot Total", "%6d", result.spot_total),
             ("Remove Ice", "%6d", result.remove_ice), ("In-Resolution Total", "%6d", result.in_resolution_total),
             ("Good Bragg Candidates", "%6d", result.good_bragg_candidates), ("Ice Rings", "%6d", result.ice_rings),
             ("Method 1 Resolution", "%6.2f", result.method1_resolution),
             ("Method 2 Resolution", "%6.2f", result.method2_resolution),
             ("Maximum unit cell", "%6.1f", result.max_unit_cell),
             ("<Spot model eccentricity>", "%7.3f ", result.eccentricity)]
    lines = ["%25s : %s" % (label, _value(fmt, value)) for label, fmt, value in items]
    lines.append("%25s : %6s" % (sat_label, "%.2f" % result.saturation_percent))
    lines.append("%25s : %6s" % ("In-Resolution Ovrld Spots", "%d" % result.overloaded_spots))
    return lines


def format_body(result: Result) -> str:
    """The text after DISTL's parameter block: identical to its CLI tail and its HTTP reply."""
    if result.status != "ok":
        return "Sorry, can't process %s.  %s\n" % (result.path, result.error)
    det: Details = result.details
    out: list[str] = []
    if det.echo_template:
        out.append(result.file)
    if det.classification_error:
        out.append(det.classification_error)
    for table in det.tables:
        out.append("")
        if table.legend:
            out.extend(LEGEND.rstrip("\n").split("\n"))
            out.append("")
        out.extend((table.message + ":").split("\n"))
        out.extend(_table(table))
    out.append("")
    out.extend(stats_block(result))
    out.append("")
    out.append("Bin population cutoff for method 2 resolution: %.0f%%" % det.cutoff_percent)
    out.append("")
    number = result.image_number if result.image_number is not None else 0
    out.append("Number of focus spots on image #%d within the input resolution range: %d"
               % (number, result.focus_spots))
    for i, spot in enumerate(det.listing or ()):
        out.append("%2d: Area in pixels=%d Peak=%.1f, Total integrated signal=%.1f "
                   "(in pixel-ADC units above background)" % (i, spot.area, spot.peak_wts, spot.signal))
        out.append("    Peak signal-to-noise=%.1f" % spot.peak_z)
        out.append("    Peak position x=%4d y=%4d (pixels); pixel value=%5d" % (spot.x, spot.y, spot.value))
        for x, y, value, height in spot.body:
            out.append("       body pixel x=%4d y=%4d; pixel value=%5d; ADC height above background=%.1f"
                       % (x, y, value, height))
    if det.focus_signals:
        signals = np.array(det.focus_signals)
        sats = np.array(det.focus_saturations)
        out.append("Total integrated signal, pixel-ADC units above local background (just the good Bragg candidates) %d"
                   % int(det.inlier_signal))
        out.append("Signals range from %.1f to %.1f with mean integrated signal %.1f"
                   % (signals.min(), signals.max(), flex_mean(signals)))
        # DISTL scales the mean of the fractions, not each fraction: 100 * mean(s) is not mean(100 * s)
        out.append("Saturations range from %.1f%% to %.1f%% with mean saturation %.1f%%"
                   % (100.0 * sats.min(), 100.0 * sats.max(), 100.0 * flex_mean(sats)))
    return "\n".join(out) + "\n"


def format_post(result: Result) -> str:
    """DISTL's short reply to a thin_client POST."""
    lines = ["Image: %s" % result.path]
    if result.status != "ok":
        return lines[0] + "\nSorry, can't process %s.  %s\n" % (result.path, result.error)

    def row(label: str, text: str) -> str:
        return "%63s : %s" % (label, text)

    lines += [row("Spot Total", "%7d" % result.spot_total),
              row("Method-2 Resolution Total", "%7d" % result.in_resolution_total),
              row("Good Bragg Candidates", "%7d" % result.good_bragg_candidates),
              row("Total integrated signal, pixel-ADC units above local background",
                  "%7.0f" % (result.details.inlier_signal if result.details else 0)),
              row("Ice Rings", "%7d" % result.ice_rings),
              row("Method 1 Resolution", "%7.2f" % result.method1_resolution),
              row("Method 2 Resolution", _value("%7.2f", result.method2_resolution)),
              row("Maximum unit cell", _value("%7.1f", result.max_unit_cell)),
              row("Saturation, Top %d Peaks" % result.saturation_top_peaks,
                  "%5s %%" % ("%.1f" % result.saturation_percent)),
              row("In-resolution overloaded spots", "%7s" % result.overloaded_spots)]
    return "\n".join(lines) + "\n"


def bcsb_xml(elements: list[tuple[str, object]]) -> str:
    """DISTL's BCSB XML as its Apache server writes it (libtbx's LongLineSimpleNode): a space after the
    opening tag, one element a line indented by two, contents not escaped."""
    lines = ["<spotfinder> "] + ["  <%s>%s</%s>" % (tag, text, tag) for tag, text in elements] + ["</spotfinder>"]
    return "\n".join(lines) + "\n"


def format_bcsb(result: Result) -> str:
    """DISTL's reply to GET /spotfinder/distl.signal_strength_bcsb: the spot counts, Method 2 to 0.001 A and,
    with distl.bins.verbose, the population-weighted I/sig(I) and the total signal of the last bin table.

    As there, an error ends the elements with its repr as the status: a frame without Method 2 stops at
    ``%.3f`` of None, a last table whose spots all lie beyond its rows at the division by its zero weight.
    """
    elements: list[tuple[str, object]] = [("file_name", result.path)]
    if result.status != "ok":
        return bcsb_xml(elements + [("status", "Sorry(%r)" % result.error)])
    det: Details = result.details
    try:
        elements.append(("total_spots", "%d" % result.spot_total))
        elements.append(("good_spots", "%d" % result.focus_spots))
        elements.append(("resolution", "%.3f" % det.method2_unrounded))
        if det.tables:
            last = det.tables[-1].columns
            weighted = weighted_total(last["Population"], last["MeanIsigI"])
            elements.append(("mean_isigi", "%.3f" % (weighted / sum(last["Population"]))))
            elements.append(("integrated", "%.3f" % spreadsheet_total(last["Integrated"])))
        else:  # DISTL's quirk: another tag, and the two in the other order, when there is no table
            elements += [("total_integrated", "0"), ("mean_isigi", "0")]
    except (TypeError, ZeroDivisionError) as exc:
        return bcsb_xml(elements + [("status", repr(exc))])
    return bcsb_xml(elements + [("status", "OK")])
