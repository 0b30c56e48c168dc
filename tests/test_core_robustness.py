"""Inputs the reference frames do not cover: analyse() answers every one of them, in bounded time."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

from spotfinder_core import analyse, parse_words
from spotfinder_core.analysis import analyse_frame
from spotfinder_core.params import Params
from spotfinder_core.simulate import Scene, frame_of, random_spots, render, write_cbf
from service_helpers import python_command

RUNNER = """
import json, sys
from spotfinder_core import analyse, parse_words
print(json.dumps(analyse(sys.argv[1], parse_words(sys.argv[2:])).as_dict(), allow_nan=False))
"""


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


@pytest.mark.parametrize("word", ["distl.bins.N=0", "distl.method2_cutoff_percentage=0", "distl.res.inner=0",
                                  "distl.minimum_signal_height=0"])
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
