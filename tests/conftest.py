"""Shared fixtures: the real frames of ../shared (skipped with a reason when absent) and simulated frames, all
written by the project's one frame writer (spotfinder_core.simulate)."""
from __future__ import annotations

import bz2
import os
import shutil
from pathlib import Path

import pytest

from shared_data import REAL, REFERENCE, need
from spotfinder_core.simulate import Scene, random_spots, write_cbf

# The console script distl.signal_strength starts a warm helper that outlives it (spotfinder_daemon.warm):
# no test but those of the helper itself (test_cli_warm.py, with folders of their own) may leave one behind.
os.environ["SPOTFINDER_WARM"] = "0"


@pytest.fixture(scope="session")
def real_frames(tmp_path_factory) -> dict[str, Path]:
    """Reference frame name -> a plain .cbf path, decompressed into a temporary folder where needed."""
    need(REAL, REFERENCE, what="real frames and DISTL references")
    out = tmp_path_factory.mktemp("real")
    frames: dict[str, Path] = {}
    for path in sorted(REAL.rglob("*.cbf*")):
        name = path.name
        if name.endswith(".cbf"):
            frames.setdefault(name, path)
        elif name.endswith(".cbf.bz2") and name[:-4] not in frames:
            target = out / name[:-4]
            with bz2.open(path, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            frames[name[:-4]] = target
    return frames


@pytest.fixture(scope="session")
def simulated(tmp_path_factory) -> dict[str, object]:
    """A few simulated PILATUS 300K frames with known content."""
    out = tmp_path_factory.mktemp("sim")
    spots = Scene(seed=11)
    spots.spots = random_spots(spots, 40)
    spots.saturated = [(150, 150)]
    ice = Scene(seed=12, ice_ring_d=3.67, ice_ring_counts=30.0)
    ice.spots = random_spots(ice, 40)
    blank = Scene(seed=13)
    scenes = {"spots": spots, "ice": ice, "blank": blank}
    paths = {}
    for name, scene in scenes.items():
        paths[name] = out / ("%s_0001.cbf" % name)
        write_cbf(str(paths[name]), scene)
    return {"paths": paths, "scenes": scenes, "dir": out}


@pytest.fixture
def make_frame():
    """A writer of small noise frames (64 x 48 pixels unless told otherwise) with a complete PILATUS header:
    ``make_frame(path, shape=..., seed=...)`` writes one and returns its bytes."""

    def write(path: str, shape: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
        write_cbf(path, Scene(size=shape, background=5.0, bad_pixels=0, seed=seed))
        return Path(path).read_bytes()

    return write
