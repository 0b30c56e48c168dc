"""The whole command-line text, ours beside the real DISTL's: banner, parameter echo and body, byte for byte.

    python benchmarks/compare_cli.py [FRAME...]

Each frame is named relative to its folder, as a user in that folder would (DISTL then prints absolute paths
in some places), under several parameter sets.  Without frames it takes seven of ../shared/data/real: three
PILATUS3 6M, two PILATUS 2M at 2θ = 30°, two PILATUS 300K at 2θ = 20°.  ``compare_distl.py`` checks the
recorded references; this one runs the real program (../shared/peer/distl, set up by ../shared/peer/setup.sh).
"""
from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

from peer import REAL, SHARED, THAUMATIN, plain_frames

DISTL = SHARED / "peer" / "distl"
DEFAULT_FRAMES = {THAUMATIN: ("thau_3_2_0001", "thau_3_2_0005", "thau_3_2_0012"),
                  REAL / "l_cysteine_dls_i19_pilatus_2m": ("l-cyst_01_00003", "l-cyst_01_00008"),
                  REAL / "small_molecule_dls_i19_pilatus_300k": ("ximg2700_00001", "ximg2701_00001")}
PARAMETER_SETS = [[], ["distl.bins.verbose=True"], ["distl.res.outer=4.9", "distl.bins.verbose=True"],
                  ["distl.method2_cutoff_percentage=25", "distl.minimum_spot_area=4"], ["distl.verbose=True"]]
OURS = [sys.executable, "-c",
        "import sys; from spotfinder_daemon.cli import distl_signal_strength as run; sys.exit(run())"]


def text(command: list[str], folder: Path) -> str:
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("frames", nargs="*")
    args = ap.parse_args(argv)
    if not DISTL.exists():
        print("real DISTL not found at %s (run %s)" % (DISTL, SHARED / "peer" / "setup.sh"))
        return 2
    sources = [Path(f) for f in args.frames] or [path for folder, names in DEFAULT_FRAMES.items() for name in names
                                                 for path in folder.glob(name + ".cbf*")]
    with tempfile.TemporaryDirectory() as tmp:
        frames = list(plain_frames(sources, Path(tmp)).values())
        same = 0
        for frame in frames:
            for words in PARAMETER_SETS:
                command = [frame.name, *words]
                theirs = text([str(DISTL), *command], frame.parent)
                ours = text([*OURS, *command], frame.parent)
                label = " ".join(command)
                if theirs and ours == theirs:
                    same += 1
                    print("identical  %s" % label)
                else:
                    print("DIFFERENT  %s" % label)
                    sys.stdout.writelines(list(difflib.unified_diff(theirs.splitlines(True), ours.splitlines(True),
                                                                    "DISTL", "ours", n=0))[:12])
        print("\nwhole CLI text identical: %d of %d" % (same, len(frames) * len(PARAMETER_SETS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
