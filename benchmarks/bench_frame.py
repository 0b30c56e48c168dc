"""Time per frame (decode + analysis) and peak memory, ours beside the real DISTL's in the same run.

    python benchmarks/bench_frame.py [FRAME...] [--repeat N] [--stages] [distl.param=value ...]

Without frames it uses the PILATUS 6M frames of ../shared/data/real (decompressed into a temporary folder,
since DISTL cannot read .bz2).  Our figure is the median over ``--repeat`` runs of each frame in one warm
process; DISTL's comes from ``../shared/peer/distl_batch`` on the same frames (imports excluded), when the
peer is set up (../shared/peer/setup.sh).  Peak resident memory is measured for both processes.  Ours is
measured twice: as the service runs it (the Content-MD5 checked) and as DISTL reads a frame (not checked).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer import THAUMATIN, plain_frames, run_distl



def ours(frames: list[Path], words: list[str], repeat: int, verify_md5: bool) -> dict:
    """Run in a child process so its peak RSS is ours alone."""
    code = r"""
import json, resource, statistics, sys, time
from spotfinder_core import analyse, parse_words
from spotfinder_core.analysis import retain_freed_memory
frames, words, repeat, verify_md5 = json.loads(sys.argv[1])
retain_freed_memory()  # as a worker runs
params = parse_words(words)
analyse(frames[0], params, verify_md5=verify_md5)  # warm-up: imports, caches
per_frame = {}
for path in frames:
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); r = analyse(path, params, verify_md5=verify_md5); times.append(time.perf_counter() - t)
        assert r.status == "ok", r.error
    per_frame[path] = statistics.median(times)
print(json.dumps({"seconds": per_frame, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
    job = json.dumps([[str(f) for f in frames], words, repeat, verify_md5])
    out = subprocess.run([sys.executable, "-c", code, job], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage_profile(path: Path, words: list[str]) -> dict[str, float]:
    """ms per pipeline stage on one frame (median of 5, kernels compiled first), for the performance table."""
    from spotfinder_core import analysis, background, heuristics, ice, read_frame, resolution, spots
    from spotfinder_core.geometry import python_geometry
    from spotfinder_core.params import effective_settings, parse_words

    params = parse_words(words)
    analysis.retain_freed_memory()
    analysis.warm_up()
    timings: dict[str, list[float]] = {}

    def clock(name, fn, *args):
        t = time.perf_counter()
        value = fn(*args)
        timings.setdefault(name, []).append((time.perf_counter() - t) * 1000)
        return value

    for _ in range(5):
        frame = clock("decode", read_frame, str(path))
        g = frame.geometry
        s = effective_settings(params, g.family)
        region = background.Region.of(g, s.margin)
        cls = clock("classify", background.classify, frame.pixels, g, s, region, analysis.UNDERLOAD)
        rings = clock("ice rings", ice.pixel_rings, cls.flags, g, region)
        maxima = clock("maxima", spots.local_maxima, frame.pixels, cls.flags, region, s, analysis.UNDERLOAD,
                       g.saturation)
        found = clock("assembly", spots.assemble, frame.pixels, cls, maxima, region, s, None)
        screened = clock("screening", spots.screen, found, s)
        clock("method 1", resolution.method1, screened.peak_x, screened.peak_y, g, region)
        final = screened.take(screened.area > s.spot_area_min)
        shape = clock("shapes", spots.shapes, final)
        pg = python_geometry(g)
        clock("heuristics", heuristics.run, final, shape, pg, s, rings, frame.pixels, resolution.DetectorCoverage(pg))
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("items", nargs="*", metavar="FRAME|distl.param=value")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stages", action="store_true", help="also print ms per pipeline stage")
    args = ap.parse_args(argv)
    words = [w for w in args.items if "=" in w]
    items = [w for w in args.items if "=" not in w]
    with tempfile.TemporaryDirectory() as tmp:
        frames = list(plain_frames(items or THAUMATIN.glob("thau_3_2_*.cbf*"), Path(tmp)).values())
        if not frames:
            print("no frames: give FRAME arguments or provide %s" % THAUMATIN)
            return 2
        theirs = run_distl(frames, words)  # first, so the children's peak RSS is DISTL's alone
        checked = ours(frames, words, args.repeat, True)
        unchecked = ours(frames, words, args.repeat, False)
        print("ours: as the service runs (Content-MD5 checked, verify_md5: true); ours as DISTL reads: the same")
        print("analysis without that check, which DISTL does not make (verify_md5: false)")
        print()
        print("%-22s %10s %10s %10s %7s %7s" % ("frame", "ours ms", "as DISTL", "DISTL ms", "ratio", "as DISTL"))
        for f in frames:
            a, u = checked["seconds"][str(f)] * 1000, unchecked["seconds"][str(f)] * 1000
            b = theirs["seconds"].get(str(f)) * 1000 if theirs and str(f) in theirs["seconds"] else None
            print("%-22s %10.1f %10.1f %10s %7s %7s" % (f.name, a, u, "%.1f" % b if b else "-",
                                                        "%.2f" % (a / b) if b else "-", "%.2f" % (u / b) if b else "-"))
        print()
        for label, mine in (("ours", checked), ("ours as DISTL reads", unchecked)):
            total_ours = statistics.median(mine["seconds"].values()) * 1000
            print("median ms/frame: %s %.1f" % (label, total_ours), end="")
            if theirs:
                total_theirs = statistics.median(theirs["seconds"].values()) * 1000
                print(", DISTL %.1f, ratio %.2f" % (total_theirs, total_ours / total_theirs))
            else:
                print(" (real DISTL not set up: run ../shared/peer/setup.sh for the side-by-side figure)")
        print("peak RSS: ours %.0f MB" % (checked["maxrss_kb"] / 1024), end="")
        print(", DISTL %.0f MB" % (theirs["maxrss_kb"] / 1024) if theirs else "")
        if args.stages:
            print()
            print("stage ms (median of 5, %s):" % frames[0].name)
            for name, ms in stage_profile(frames[0], words).items():
                print("  %-12s %8.1f" % (name, ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
