"""The compiled kernels: kept where a reinstall leaves them, known by their source's content, compiled once.

A first start compiles every kernel (~13 s of CPU a process on the 2-core development host); these tests
hold the things that keep it from being paid again: the cache folder is outside the installed package, an
entry survives a new time stamp on unchanged source (pip rewrites every file it installs), and no kernel is
compiled twice for argument types that differ only in a flag (each extra specialisation costs its whole
compilation again).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import types

import numpy as np

from service_helpers import REPO, child_env
from shared_data import real_files

PROBE = """
import json, sys
from spotfinder_core import ice, jit
value = int(ice._floor_sqrt(99))
json.dump({"value": value, "hits": sum(ice._floor_sqrt.stats.cache_hits.values()),
           "misses": sum(ice._floor_sqrt.stats.cache_misses.values()), "cache_dir": jit.cache_dir()},
          open(sys.argv[1], "w"))
"""


def run_probe(tmp_path, env: dict) -> dict:
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-c", PROBE, str(out)], cwd=REPO, env=child_env(**env), check=True, timeout=120)
    return json.loads(out.read_text())


def test_kernels_are_cached_in_the_users_cache_folder_and_loaded_from_it(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "NUMBA_CACHE_DIR": ""}
    first = run_probe(tmp_path, env)
    assert first["value"] == 9 and first["misses"] == 1 and first["hits"] == 0
    assert first["cache_dir"] == str(tmp_path / "xdg" / "spotfinder-daemon" / "numba")
    cached = [name for _, _, names in os.walk(first["cache_dir"]) for name in names]
    assert any(name.startswith("ice._floor_sqrt") and name.endswith(".nbi") for name in cached), cached
    second = run_probe(tmp_path, env)
    assert second["hits"] == 1 and second["misses"] == 0


def test_numba_cache_dir_is_honoured(tmp_path):
    result = run_probe(tmp_path, {"NUMBA_CACHE_DIR": str(tmp_path / "state" / "numba-cache")})
    assert result["cache_dir"] == str(tmp_path / "state" / "numba-cache")
    assert any(name.endswith(".nbi") for _, _, names in os.walk(result["cache_dir"]) for name in names)


def test_an_entry_is_known_by_its_sources_content_not_its_time_stamp(tmp_path):
    from spotfinder_core.jit import KernelCacheLocator

    source = tmp_path / "kernels.py"
    source.write_text("def kernel():\n    return 1\n")
    namespace: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    locator = KernelCacheLocator(namespace["kernel"], str(source))
    stamp = locator.get_source_stamp()
    os.utime(source, (1e9, 1e9))  # a reinstall: the same bytes, a new time stamp
    assert locator.get_source_stamp() == stamp
    source.write_text("def kernel():\n    return 2\n")
    assert locator.get_source_stamp() != stamp


def test_the_locator_takes_only_this_packages_functions(tmp_path):
    from spotfinder_core.jit import KernelCacheLocator

    source = tmp_path / "other.py"
    source.write_text("def f():\n    pass\n")
    function = types.FunctionType(compile("pass", str(source), "exec"), {})
    assert KernelCacheLocator.from_function(function, str(source)) is None


def test_every_kernel_the_analysis_calls_is_compiled_once():
    """After the warm-up (both of its orders) and real frames through both classification paths, each kernel
    called from Python has one specialisation: a second one would double its compilation on every first start.
    Counted in a fresh process: tests that call the kernels with arrays of their own make specialisations of
    their own in this one."""
    real_files(("small_molecule_dls_i19_pilatus_300k/ximg2700_00001.cbf",), "the real frames")
    counted = subprocess.run([sys.executable, "-c", "import test_core_kernel_cache as t; print(t.specialisations())"],
                             cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=600)
    assert counted.returncode == 0, counted.stderr
    twice = ast.literal_eval(counted.stdout.strip().splitlines()[-1])
    assert not twice, twice


def specialisations() -> dict:
    """The kernels with other than one specialisation, after a worker's warm-up and real frames."""
    from spotfinder_core import analysis, background, geometry, ice, image, spots
    from spotfinder_core.params import Params, effective_settings

    analysis.warm_up()
    # what the workers warming up at once compile first, each its half, on stand-ins: the same types
    stand_in = image.read_frame(real_files(("small_molecule_dls_i19_pilatus_300k/ximg2700_00001.cbf",),
                                           "the real frames")[0])
    analysis._compile_classification(stand_in)
    analysis._compile_later_stages(stand_in)
    for path in real_files(("thaumatin_grid_dls_i24_pilatus3_6m/thau_3_2_0001.cbf.bz2",
                            "small_molecule_dls_i19_pilatus_300k/ximg2700_00001.cbf"), "the real frames"):
        assert analysis.analyse(path).status == "ok"
        frame = image.read_frame(path)
        g = frame.geometry
        settings = effective_settings(Params(), g.family)
        region = background.Region.of(g, settings.margin)
        tiling = background.Tiling.of(g, region, settings.scanbox_windows, settings.res_outer)
        cls = background._run_long(frame.pixels, g, settings, analysis.UNDERLOAD, tiling.cycles)
        assert cls.flags.dtype == np.uint8
    entry_points = [background._classify_cycle, background._usable, background._flag_rows_outside, background._flag_all,
                    background._window_map, background._look_up_planes, ice._ring_counts, spots._maxima, spots._grow,
                    image._byte_offset, geometry._resolutions]
    return {k.py_func.__name__: len(k.signatures) for k in entry_points if len(k.signatures) != 1}


SHARING_PROBE = """
import json, os, sys, time
from numba.core import event

compiled, depth = [], [0]


class TopLevel(event.Listener):
    def on_start(self, e):
        depth[0] += 1

    def on_end(self, e):
        depth[0] -= 1
        if depth[0] == 0:
            compiled.append(e.data["dispatcher"].py_func.__qualname__)


event.register("numba:compile", TopLevel())
from spotfinder_core import analysis
open(sys.argv[1] + ".ready", "w").close()
while not os.path.exists(sys.argv[2]):  # the two warm up together, as a service's workers on a first start
    time.sleep(0.01)
analysis.warm_up()
json.dump(compiled, open(sys.argv[1], "w"))
"""


def test_two_workers_warming_up_at_once_compile_each_kernel_once(tmp_path):
    """On a first start the workers share the compilation: every kernel is compiled by one of them and loaded
    from the cache by the other (both compiling the nearest-neighbour search at once cost the start 3 s)."""
    go = tmp_path / "go"
    outputs = [tmp_path / ("worker%d.json" % n) for n in (1, 2)]
    workers = [subprocess.Popen([sys.executable, "-c", SHARING_PROBE, str(out), str(go)], cwd=REPO,
                                env=child_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))) for out in outputs]
    try:
        deadline = time.monotonic() + 120
        while not all(os.path.exists(str(out) + ".ready") for out in outputs) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        assert [worker.wait(timeout=300) for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            worker.kill()
    first, second = (set(json.loads(out.read_text())) for out in outputs)
    assert first and second and not first & second, (first, second)
    assert {"_classify_cycle", "_nearest_others", "_ring_counts", "_byte_offset"} <= first | second
