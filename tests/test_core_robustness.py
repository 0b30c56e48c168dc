"""Inputs the reference frames do not cover: analyse() answers every one of them, in bounded time."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

from spotfinder_core import analyse, parse_words
from spotfinder_core.analysis import analyse_frame
from spotfinder_core.params import Params
from spotfinder_core.simulate import Scene, frame_of, random_spots, render, write_cbf
from service_helpers import python_command

MEMORY_LIMIT = 3 << 30  # address space of the child: a runaway allocation fails its test, not the machine
RUNNER = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (%d, %d))
from spotfinder_core import analyse, parse_words
print(json.dumps(analyse(sys.argv[1], parse_words(sys.argv[2:])).as_dict(), allow_nan=False))
""" % (MEMORY_LIMIT, MEMORY_LIMIT)


def analysed(path, *words, timeout=60) -> dict:
    """The result dict, from a child process so that a hang fails the test instead of stalling it."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(path), *words], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def scene_file(tmp_path, name, scene, pixels=None):
    path = tmp_path / name
    write_cbf(str(path), scene, pixels)
    return path


def test_a_dead_frame_is_answered_not_hung(tmp_path):
    scene = Scene(seed=21)
    dead = np.full(scene.shape, -2, dtype=np.int32)
    record = analysed(scene_file(tmp_path, "dead_0001.cbf", scene, dead))
    assert record["status"] == "ok" and record["spot_total"] == 0


def test_beam_on_a_corner_with_bin_tables(tmp_path):
    scene = Scene(seed=22)
    scene.spots = random_spots(scene, 40)
    path = scene_file(tmp_path, "corner_0001.cbf", scene)
    record = analysed(path, "autoindex_override_beam=0,0", "distl.bins.verbose=True")
    assert record["status"] == "ok"


def test_a_tiny_frame_says_it_is_too_small(tmp_path):
    scene = Scene(seed=23)
    pixels = render(scene)[:30, :30].copy()
    record = analysed(scene_file(tmp_path, "tiny_0001.cbf", scene, pixels))
    assert record["status"] == "error" and "too small" in record["error"]


def test_unknown_sizes_get_a_tiling_that_finds_their_spots(tmp_path):
    scene = Scene(seed=24)
    scene.spots = random_spots(scene, 30)
    pixels = render(scene)[:300, :300].copy()
    pixels[pixels < 0] = 5  # no module gaps on this made-up detector
    record = analysed(scene_file(tmp_path, "square_0001.cbf", scene, pixels))
    assert record["status"] == "ok" and record["spot_total"] > 0


@pytest.mark.parametrize("field,value", [("Wavelength", b"nan"), ("Wavelength", b"inf"),
                                         ("Detector_distance", b"inf")])
def test_non_finite_geometry_is_refused(tmp_path, field, value):
    scene = Scene(seed=25)
    path = scene_file(tmp_path, "odd_0001.cbf", scene)
    data = path.read_bytes()
    start = data.index(b"# " + field.encode()) + len(field) + 3
    end = data.index(b" ", start)
    path.write_bytes(data[:start] + value + data[end:])
    record = analysed(path)
    assert record["status"] == "error" and "non-physical geometry" in record["error"]


def edited(path, field: bytes, value: bytes) -> None:
    """Replace the value of a header line (``# field value...``) or a MIME line (``field: value``)."""
    data = path.read_bytes()
    line = re.search(rb"(?m)^(# %s |%s: )[^\r\n]*" % (field, field), data)
    path.write_bytes(data[:line.start()] + line.group(1) + value + data[line.end():])


@pytest.mark.parametrize("field,value,cause", [
    (b"Beam_xy", b"(1e15, 1e15) pixels", "beam's slow offset"), (b"Detector_distance", b"1e6 m", "distance"),
    (b"Pixel_size", b"1e-9 m x 1e-9 m", "pixel size"), (b"Wavelength", b"1e-9 A", "wavelength"),
    (b"Beam_xy", b"(1e30, 243) pixels", "beam's fast offset")])
def test_non_physical_geometry_is_refused_early(tmp_path, field, value, cause):
    """Far beyond any experiment, each drove allocations (rings, shells) to GBs or numba to a TypingError."""
    path = scene_file(tmp_path, "absurd_0001.cbf", Scene(seed=27, size=(25, 600)))
    edited(path, field, value)
    record = analysed(path, "distl.peripheral_margin=0", timeout=30)
    assert record["status"] == "error" and record["error"].startswith("non-physical geometry: " + cause)


def test_an_odd_but_physical_geometry_is_analysed_in_bounded_time(tmp_path):
    """1 mm pixels on a 600 x 25 frame, the beam 90 frame heights off it: analysed, its rings and shells bounded."""
    scene = Scene(seed=28, size=(25, 600), bad_pixels=0)
    scene.spots = random_spots(scene, 30, margin=5)
    path = scene_file(tmp_path, "odd_0001.cbf", scene)
    edited(path, b"Pixel_size", b"1e-3 m x 1e-3 m")
    edited(path, b"Beam_xy", b"(300.00, 2250.00) pixels")
    started = time.monotonic()
    record = analysed(path, "distl.peripheral_margin=0", "distl.bins.verbose=True", timeout=30)
    assert record["status"] == "ok" and time.monotonic() - started < 20


@pytest.mark.parametrize("field,value,cause", [
    (b"Count_cutoff", b"9223372036854775808 counts", "Count_cutoff"), (b"Count_cutoff", b"0 counts", "Count_cutoff"),
    (b"Beam_xy", b"(1e30, 1e30) pixels", "non-physical geometry")])
def test_header_values_reach_no_kernel_that_would_compile(tmp_path, field, value, cause):
    """A value outside the kernels' fixed types (int64, float64) made numba compile a new specialisation while
    serving (48 s, new cache files) or fail to type it: such frames are refused, and no kernel gains a signature."""
    from numba.core.registry import CPUDispatcher

    from spotfinder_core import background, geometry, heuristics, ice, image, resolution, spots

    good = scene_file(tmp_path, "good_0001.cbf", Scene(seed=29))
    assert analyse(str(good)).status == "ok"  # every kernel loaded for the types of a good frame
    kernels = [obj for module in (background, geometry, heuristics, ice, image, resolution, spots)
               for obj in vars(module).values() if isinstance(obj, CPUDispatcher)]
    before = {kernel: list(kernel.signatures) for kernel in kernels}
    odd = scene_file(tmp_path, "odd_0001.cbf", Scene(seed=29))
    edited(odd, field, value)
    result = analyse(str(odd))
    assert result.status == "error" and result.error.startswith(cause)
    assert {kernel: list(kernel.signatures) for kernel in kernels} == before


@pytest.mark.parametrize("field,value,cause", [
    (b"X-Binary-Size-Second-Dimension", b"618", "X-Binary-Number-of-Elements 301453 does not match"),
    (b"X-Binary-Number-of-Elements", b"301452", "X-Binary-Number-of-Elements 301452 does not match"),
    (b"X-Binary-Size-Fastest-Dimension", b"-487", "is not a detector's"),
    (b"X-Binary-Size-Fastest-Dimension", b"0", "is not a detector's"),
    (b"X-Binary-Size-Second-Dimension", b"100000", "is not a detector's")])
def test_dimensions_are_checked(tmp_path, field, value, cause):
    """A 487 x 618 header over 487 x 619 pixels was analysed "ok"; a negative one was an internal error."""
    path = scene_file(tmp_path, "dims_0001.cbf", Scene(seed=30))
    edited(path, field, value)
    result = analyse(str(path))
    assert result.status == "error" and cause in result.error


def test_resolution_shells_are_bounded():
    """Spots spanning 10^4 in d asked for 10^12 equal-volume shells: refused before any is made."""
    from spotfinder_core import FrameError
    from spotfinder_core.geometry import python_geometry
    from spotfinder_core.resolution import DetectorCoverage, Shells
    from spotfinder_core.simulate import frame_of

    coverage = DetectorCoverage(python_geometry(frame_of(Scene(seed=31), "s_0001.cbf").geometry))
    with pytest.raises(FrameError, match="resolution shells"):
        Shells(np.geomspace(1e4, 1.0, 50), 1e4, coverage)


def test_method1_does_not_repeat_spots_in_memory():
    """Method 1 weighs a spot up to 628 times when the beam is off the detector: 200k spots with the beam
    2000 pixels off a 300K's edge took 1.9 GB when the copies were made; the answer stays the same."""
    import tracemalloc
    from dataclasses import replace

    from spotfinder_core.background import Region
    from spotfinder_core.resolution import method1
    from spotfinder_core.simulate import frame_of

    g = frame_of(Scene(seed=32), "m_0001.cbf").geometry
    g = replace(g, beam_x=-2000 * g.pixel_size, beam_y=240 * g.pixel_size)
    rng = np.random.default_rng(32)
    x, y = rng.integers(20, 599, 200_000).astype(float), rng.integers(20, 467, 200_000).astype(float)
    tracemalloc.start()
    d = method1(x, y, g, Region.of(g, 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100 << 20 and d == 0.887581228570091


@pytest.mark.parametrize("word", ["distl.bins.N=0", "distl.method2_cutoff_percentage=0", "distl.res.inner=0",
                                  "distl.minimum_signal_height=0", "distl_minimum_number_spots_for_indexing=1"])
def test_parameters_that_cannot_work_are_refused(word):
    from spotfinder_core import ParameterError

    with pytest.raises(ParameterError, match="below the minimum"):
        parse_words([word])


def test_in_memory_frames_match_their_files(tmp_path):
    scene = Scene(seed=26)
    scene.spots = random_spots(scene, 30)
    from_file = analyse(str(scene_file(tmp_path, "mem_0001.cbf", scene))).as_dict()
    in_memory = analyse_frame(frame_of(scene, str(tmp_path / "mem_0001.cbf")), Params()).as_dict()
    assert {**from_file, "proc_ms": 0} == {**in_memory, "proc_ms": 0}


def test_a_broken_pipe_ends_the_command_quietly(simulated):
    frames = [str(simulated["paths"]["spots"])] * 40
    proc = subprocess.run(shlex.join(python_command("find", *frames)) + " | head -1", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.startswith("frame") and "Traceback" not in proc.stderr
