"""The single entry point: one frame in, one Result out (never an exception for a bad frame)."""
from __future__ import annotations

import ctypes
import os
import platform
import time
from dataclasses import replace

import numpy as np

from . import background, heuristics, ice, neighbours, report, resolution, spots
from .geometry import pixel_resolution, python_geometry
from .image import BinarySection, Frame, FrameError, checked_frame, decode_pixels, name_template
from .params import Params, effective_settings
from .result import Result
from .sums import flex_mean, sequential_sum

UNDERLOAD = -1  # PILATUS and EIGER: gap (-1) and bad (-2) pixels are unusable
# warm_up's locks in numba's cache folder, and how long a worker waits for another's compilation at most
WARM_UP_LOCK, LATER_STAGES_LOCK = "warm-up.lock", "later-stages.lock"
COMPILE_WAIT_S = 300.0


def _overrides(params: Params) -> dict:
    return {"beam": params["autoindex_override_beam"], "distance": params["autoindex_override_distance"],
            "wavelength": params["autoindex_override_wavelength"], "twotheta": params["autoindex_override_twotheta"]}


def analyse(path: str, params: Params | None = None, shown_as: str | None = None, verify_md5: bool = True,
            index: int | None = None) -> Result:
    """Analyse one frame the DISTL way. Bad frames give ``status="error"`` with a one-line cause.

    ``shown_as`` is the name the result and the report use when it differs from the path opened (a
    service opens the resolved path it checked, and reports the one it was asked about).  ``verify_md5``
    checks the binary section against its Content-MD5 beside the analysis (see ``checked_frame``).  ``index``
    names a frame of an HDF5 (EIGER) file, 0-based; a file holding one frame needs none.
    """
    params = params or Params()
    start = time.perf_counter()
    shown = shown_as or path
    try:
        with checked_frame(path, _overrides(params), verify_md5, index) as frame:
            if shown_as is not None:
                if frame.index is None:
                    template, number, _ = name_template(shown_as)
                    frame = replace(frame, path=shown_as, template=template, image_number=number)
                else:
                    frame = replace(frame, path=shown_as, template=os.path.basename(shown_as))
            result = analyse_frame(frame, params)
    except FrameError as exc:
        result = Result.failure(shown, str(exc), index)
    except MemoryError:
        result = Result.failure(shown, "out of memory", index)
    except Exception as exc:  # a bug must cost one frame, never the caller (a CLI batch, a worker)
        result = Result.failure(shown, "internal error: %s: %s" % (type(exc).__name__, exc), index)
    result.proc_ms = round((time.perf_counter() - start) * 1000.0, 3)
    return result


def analyse_frame(frame: Frame, params: Params) -> Result:
    """Run the DISTL pipeline on a decoded frame."""
    g = frame.geometry
    settings = effective_settings(params, g.family)
    region = background.Region.of(g, settings.margin)
    if region.x1 - region.x0 < 2 or region.y1 - region.y0 < 2:
        raise FrameError("frame of %dx%d pixels is too small for a peripheral margin of %d"
                         % (g.size_fast, g.size_slow, settings.margin))
    pixels = frame.pixels
    cls = background.classify(pixels, g, settings, region, UNDERLOAD)
    rings = ice.pixel_rings(cls.flags, g, region)
    maxima = spots.local_maxima(pixels, cls.flags, region, settings, UNDERLOAD)
    found = spots.assemble(pixels, cls, maxima, region, settings, ice.IceTest.of(rings, g) if rings else None)
    screened = spots.screen(found, settings)
    method1 = resolution.method1(screened.peak_x, screened.peak_y, g, region)
    final = screened.take(screened.area > settings.spot_area_min)
    if settings.compactness:
        final = final.take(spots.compact(final))
    shape = spots.shapes(final)
    pg = python_geometry(g)
    coverage = resolution.DetectorCoverage(pg)
    chain = heuristics.run(final, shape, pg, settings, rings, pixels, coverage, g.pixel_size)
    subsets = chain.subsets
    inliers = subsets["spots_inlier"]
    focus = subsets.get("lo_pass_resolution_spots", inliers)
    wts_sum = final.signal
    wts_max = final.peak_height
    maxcell = params["codecamp.maxcell"]
    if maxcell is None:
        maxcell = heuristics.max_unit_cell(chain.neighbours, pg, settings.neighbour_bins)
    _, _, echo = name_template(frame.path)
    tables = []
    if params["distl.bins.verbose"] and chain.shells_d is not None:
        tables = _bin_tables(frame, final, shape, chain, pg, coverage, cls, params)
    listing = None
    if params["distl.verbose"]:
        heights = final.heights
        listing = [_listing(final, i, pixels, heights) for i in focus]
    result = Result(
        path=frame.path, file=frame.label, image_number=frame.image_number, frame_index=frame.index,
        spot_total=len(final),
        remove_ice=len(subsets["ice_free_resolution_spots"]) if "ice_free_resolution_spots" in subsets else None,
        in_resolution_total=len(subsets["spots_resolution"]),
        good_bragg_candidates=len(inliers),
        ice_rings=chain.ice_rings,
        method1_resolution=round(method1, 2),
        method2_resolution=None if chain.method2 is None else round(chain.method2, 2),
        max_unit_cell=None if maxcell is None else round(maxcell, 1),
        eccentricity=None if chain.eccentricity is None else round(chain.eccentricity, 3),
        saturation_top_peaks=chain.saturation_top,
        saturation_percent=round(100.0 * chain.saturation_fraction, 2),
        overloaded_spots=chain.overloaded,
        total_integrated_signal=int(sequential_sum(wts_sum[inliers])) if len(focus) else None,
        focus_spots=len(focus),
    )
    result.details = report.Details(
        echo_template=echo, tables=tables, focus_signals=list(wts_sum[focus]),
        focus_saturations=list(wts_max[focus] / g.saturation), inlier_signal=sequential_sum(wts_sum[inliers]),
        listing=listing, cutoff_percent=100.0 / settings.method2_ratio,
        classification_error=cls.error, method2_unrounded=chain.method2)
    return result


def _listing(found: spots.Spots, i: int, pixels: np.ndarray, all_heights: np.ndarray) -> report.SpotListing:
    """One spot of the distl.verbose listing: its wts (``all_heights``, per body pixel of all spots), their
    maximum and their sum added pixel by pixel as flex.sum does."""
    bx, by = found.body(i)
    heights = all_heights[found.starts[i]:found.starts[i + 1]]
    px, py = int(found.peak_x[i]), int(found.peak_y[i])
    return report.SpotListing(
        area=int(found.area[i]), peak_wts=float(heights.max()), signal=sequential_sum(heights),
        peak_z=float(found.intensity[i]), x=px, y=py, value=int(pixels[px, py]),
        body=[(int(x), int(y), int(pixels[x, y]), float(h)) for x, y, h in zip(bx, by, heights)])


TABLE_MESSAGES = (
    ("ice_free_resolution_spots",
     "Analysis of spots after ice removal, but prior to resolution cutoff, for image \n%s"),
    ("lo_pass_resolution_spots",
     "Analysis of spots after resolution filtering, but prior to spot quality heuristics, for image \n%s"),
    ("spots_inlier", "Analysis of good Bragg spots after quality heuristics, for image \n%s"),
)


def _bin_tables(frame, found, shape, chain, g, coverage, cls, params) -> list:
    """The three distl.bins.verbose tables; all share the binning made from the ice-free spots."""
    free_d = chain.shells_d
    target = free_d[chain.target_bins - 1]
    rows = min(int((target / free_d[-1]) ** 3) + 1, params["distl.bins.N"])
    if params["distl.bins.corner"]:
        last_d_star = 1.0 / min(coverage.corner_resolutions())
    else:
        last_d_star = 1.0 / free_d[-1]
    fraction = (1.0 / rows) * last_d_star ** 3  # DISTL's product, not a division: other last bits
    limits = np.array([1.0 / ((k + 1) * fraction) ** (1.0 / 3.0) for k in range(rows)])
    fract = coverage.fractions(limits).tolist()
    missing = resolution.missing_cone(limits, g.wavelength)
    pxl, wsz = _window_rows(frame, cls, limits)
    signals, backgrounds = found.signal, found.background
    spot_columns = {"Integrated": signals, "MeanI": signals, "MeanBkg": backgrounds,
                    "MeanSz": found.area.astype(np.float64), "MnEccen": shape.eccentricity, "MnSkew": shape.skewness}
    tables = []
    for key, message in TABLE_MESSAGES:
        subset = chain.subsets.get(key)
        if subset is None or len(subset) == 0:
            continue
        # the subsets keep the order of DISTL's resolution sort, the order its tables walk the spots in
        pops = resolution.populations(chain.d[subset], limits[0], rows)
        cols = {name: [0] * rows for name in (*spot_columns, "MeanIsigI")}
        starts = np.concatenate(([0], np.cumsum(pops)))
        for k in range(rows):
            members = subset[starts[k]:starts[k + 1]]
            if len(members) == 0:
                continue
            cols["Integrated"][k] = sequential_sum(signals[members])
            for name in ("MeanI", "MeanBkg", "MeanSz", "MnEccen", "MnSkew"):
                cols[name][k] = flex_mean(spot_columns[name][members])
        cols["MeanIsigI"] = _isigi_column(subset, pops, pxl, wsz, signals, backgrounds, found.area)
        columns = {"Limit": list(limits), "Population": [int(p) for p in pops], "Missing": list(missing),
                   "Fract": fract, "PxlBkgrd": pxl, "MnWndwSz": wsz, **cols}
        # DISTL names the frame by its absolute path here, even when it was given a relative one
        tables.append(report.BinTable(message=message % os.path.abspath(frame.path), columns=columns,
                                      legend=not tables))
    return tables


def _window_rows(frame, cls, limits: np.ndarray) -> tuple[list, list]:
    """PxlBkgrd and MnWndwSz per row: the means over the background windows whose centre falls in it, taken
    in order of descending d as DISTL walks them; None for a row without a window."""
    rows = len(limits)
    window_d = pixel_resolution(frame.geometry, cls.window_centres[:, 0], cls.window_centres[:, 1])
    order = np.argsort(-window_d, kind="stable")
    bkg_rows = [[] for _ in range(rows)]
    size_rows = [[] for _ in range(rows)]
    row = 0
    for w in order:
        while window_d[w] < limits[row]:
            row += 1
            if row >= rows:
                break
        if row >= rows:
            break
        bkg_rows[row].append(cls.window_background[w])
        size_rows[row].append(cls.window_sample[w])
    pxl = [flex_mean(b) if b else None for b in bkg_rows]
    wsz = [flex_mean(s) if s else None for s in size_rows]
    return pxl, wsz


def _isigi_column(subset, pops, pxl, wsz, signals, backgrounds, area) -> list:
    """MeanIsigI per row: the mean of I / sqrt(I + B + m^2 / n * PxlBkgrd) over the row's spots.

    Quirk kept: DISTL's I/sig(I) walks the spots only through rows that have a background value, so after a
    row without one it pairs later rows with the wrong spots."""
    column = [0] * len(pops)
    index = 0
    for k in range(len(pops)):
        if pxl[k] is None:
            continue
        members = subset[index:index + pops[k]]
        index += pops[k]
        if len(members):
            i_s, m = signals[members], area[members].astype(np.float64)
            ratios = i_s / np.sqrt(i_s + backgrounds[members] + m * m * (1.0 / wsz[k]) * pxl[k])
            column[k] = flex_mean(ratios)
    return column


def retain_freed_memory() -> bool:
    """Keep the memory one frame's arrays free for the next frame, in a process that analyses many (glibc).

    A 6M frame allocates about 100 MB of arrays.  By default glibc returns blocks that large to the kernel
    when they are freed, and the kernel has to fault them in and zero them again for the next frame: about
    8 ms a frame.  Served from a heap that is not trimmed below 256 MB, they are reused as they are; the
    resident size stays that of one frame's peak.  Returns whether the allocator took the settings.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel by analysing a small simulated frame in memory, so
    that a worker's first real frame is as fast as the rest; returns the seconds it took.

    On a first start the workers compile the same kernels at once, each on its own core.  They share the work
    through numba's cache: the first to start compiles decoding and the classification, another one meanwhile
    the later stages (on stand-ins of the same types), and each waits for the other's half before it analyses
    the frame, which then finds every kernel cached.  Without the waits each one compiled what it reached
    before the other had cached it (the nearest-neighbour search, 3 s, both at once): two warm-ups at once on
    an empty cache took 8.3 s on the 2-core EPYC, now 7.5; a first start 8.7 s, now 8.1 (bench_startup.py).
    """
    from .jit import cache_lock
    from .simulate import Scene, frame_of, random_spots

    start = time.perf_counter()
    scene = Scene(seed=7, ice_ring_d=3.67, ice_ring_counts=30.0)
    scene.spots = random_spots(scene, 40)
    frame = frame_of(scene, "warm_up_0001.cbf")
    with cache_lock(WARM_UP_LOCK) as first:
        if first:
            _compile_classification(frame)
            with cache_lock(LATER_STAGES_LOCK, COMPILE_WAIT_S):  # held while a helper compiles them
                pass
        else:
            with cache_lock(LATER_STAGES_LOCK, COMPILE_WAIT_S):  # one helper at a time: the next finds them cached
                _compile_later_stages(frame)
            with cache_lock(WARM_UP_LOCK, COMPILE_WAIT_S):  # held by the first until its warm-up ends
                pass
        analyse_frame(frame, Params({"distl.bins.verbose": True}))
        _decode_one_pixel()  # the frame above was never encoded
    return time.perf_counter() - start


def _compile_classification(frame: Frame) -> None:
    """The kernels of decoding, the resolution of a pixel and the classification (the path the frame takes): the
    half of the compilation a worker first to warm up does."""
    g = frame.geometry
    settings = effective_settings(Params(), g.family)
    _decode_one_pixel()
    pixel_resolution(g, 0.0, 0.0)
    background.classify(frame.pixels, g, settings, background.Region.of(g, settings.margin), UNDERLOAD)


def _decode_one_pixel() -> None:
    decode_pixels(b"\x00", BinarySection(start=0, size=1, present=1, md5=None, byte_offset=True), (1, 1))


def _compile_later_stages(frame: Frame) -> None:
    """The kernels of the stages after the classification (ice rings, maxima, spot growth and its background
    planes, the nearest neighbours), called on blank classes and planes: only the argument types decide what
    numba compiles."""
    g = frame.geometry
    settings = effective_settings(Params(), g.family)
    region = background.Region.of(g, settings.margin)
    flags = np.zeros(frame.pixels.shape, dtype=np.uint8)
    windows = background.Tiling.of(g, region, settings.scanbox_windows, settings.res_outer).cycles[-1]
    planes = np.zeros((len(windows), 4))
    blank = background.Classification(flags=flags, pixels=frame.pixels, window_centres=np.zeros((0, 2), np.int64),
                                      window_background=np.zeros(0), window_sample=np.zeros(0, np.int64),
                                      written=[(windows, planes)])
    ice.pixel_rings(flags, g, region)
    maxima = spots.local_maxima(frame.pixels, flags, region, settings, UNDERLOAD)
    spots.assemble(frame.pixels, blank, maxima, region, settings, None)
    neighbours.nearest_others(np.zeros((2, 2)))
