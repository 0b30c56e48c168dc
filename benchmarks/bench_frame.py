"""Time per frame (decode + analysis) and peak memory, ours beside the real DISTL's in the same run.

    python benchmarks/bench_frame.py [FRAME...] [--repeat N] [--rounds N] [--stages] [--zen2] [distl.param=value ...]
    python benchmarks/bench_frame.py --eiger [--frames N] [--repeat N] [distl.param=value ...]

Without frames it uses the PILATUS 6M frames of ../shared/data/real (decompressed into a temporary folder,
since DISTL cannot read .bz2).  Our figure is the median over ``--repeat`` runs of each frame in one warm
process; DISTL's comes from ``../shared/peer/distl_batch`` on the same frames (imports excluded), when the
peer is set up (../shared/peer/setup.sh).  Peak resident memory is measured for both processes.  Ours is
measured twice: as the service runs it (the Content-MD5 checked) and as DISTL reads a frame (not checked).
The three runs alternate over ``--rounds`` rounds (DISTL first in even rounds, last in odd ones), so a host
whose speed drifts (a shared machine) slows both sides alike; each figure is the median over the rounds.
``--zen2`` runs ours with the code numba and numpy would run on an AVX2-only Zen 2 EPYC (``peer.zen2_code``), on
this host's core, caches and memory; DISTL runs its own code either way.

``--eiger`` times an EIGER2 16M series instead: the real thermolysin frame and copies with other counts, written
as a FileWriter series (legacy master, bitshuffle-LZ4 data files) and as miniCBFs; ms per frame for decoding and
for the whole analysis of each, a PILATUS 6M frame's in the same process for the ratio, and the real DISTL on the
CBFs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer import THAUMATIN, THERMOLYSIN, cpu_name, plain_frames, run_distl, zen2_code

CODE_FOR_ZEN2 = "; ours with the code for an AVX2-only Zen 2 EPYC (--zen2): its instructions, this host's core"



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
per_frame, cpu = {}, {}
for path in frames:
    times, cpu_times = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        r = analyse(path, params, verify_md5=verify_md5)
        times.append(time.perf_counter() - t); cpu_times.append(time.process_time() - c)
        assert r.status == "ok", r.error
    per_frame[path], cpu[path] = statistics.median(times), statistics.median(cpu_times)
print(json.dumps({"seconds": per_frame, "cpu_seconds": cpu,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
    job = json.dumps([[str(f) for f in frames], words, repeat, verify_md5])
    out = subprocess.run([sys.executable, "-c", code, job], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternating(frames: list[Path], words: list[str], repeat: int, rounds: int) -> tuple[dict | None, dict, dict]:
    """DISTL, ours with the MD5 check and ours without it, alternating over ``rounds``: per frame the median
    of the rounds.  DISTL runs first in round 0, so that the children's peak RSS then is DISTL's alone."""
    runs: dict[str, list[dict]] = {"distl": [], "checked": [], "unchecked": []}
    distl_rss = None
    for number in range(max(1, rounds)):
        order = ("distl", "checked", "unchecked") if number % 2 == 0 else ("checked", "unchecked", "distl")
        for name in order:
            if name == "distl":
                if number > 0 and distl_rss is None:
                    continue  # the peer is not set up: said once on stderr
                result = run_distl(frames, words)
                if result is not None:
                    distl_rss = distl_rss or result["maxrss_kb"]
                    runs[name].append(result)
            else:
                runs[name].append(ours(frames, words, repeat, name == "checked"))

    def merged(results: list[dict]) -> dict:
        out = {"maxrss_kb": max(r["maxrss_kb"] for r in results)}
        for key in ("seconds", "cpu_seconds"):  # DISTL's runs give no CPU time
            if key in results[0]:
                out[key] = {f: statistics.median(r[key][f] for r in results if f in r[key]) for f in results[0][key]}
        return out

    theirs = dict(merged(runs["distl"]), maxrss_kb=distl_rss) if runs["distl"] else None
    return theirs, merged(runs["checked"]), merged(runs["unchecked"])


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
        maxima = clock("maxima", spots.local_maxima, frame.pixels, cls.flags, region, s, analysis.UNDERLOAD)
        found = clock("assembly", spots.assemble, frame.pixels, cls, maxima, region, s, None)
        screened = clock("screening", spots.screen, found, s)
        clock("method 1", resolution.method1, screened.peak_x, screened.peak_y, g, region)
        final = screened.take(screened.area > s.spot_area_min)
        shape = clock("shapes", spots.shapes, final)
        pg = python_geometry(g)
        clock("heuristics", heuristics.run, final, shape, pg, s, rings, frame.pixels, resolution.DetectorCoverage(pg),
              g.pixel_size)
    return {name: statistics.median(values) for name, values in timings.items()}


def eiger_series(work: Path, count: int) -> tuple[list[Path], Path]:
    """``count`` EIGER2 16M frames (the thermolysin frame, then copies with its counts times 2, 3, ...) as
    miniCBFs with its header and as a legacy FileWriter series of bitshuffle-LZ4 data files (10 frames each)."""
    import gzip
    import re

    import numpy as np
    from fabio.cbfimage import CbfImage

    from spotfinder_core import nexus, read_frame

    raw = gzip.decompress(THERMOLYSIN.read_bytes())
    contents = re.search(rb"_array_data\.header_contents\s*;\s*\n(.*?)\n;", raw, re.S).group(1).decode("latin-1")
    pixels = read_frame(str(THERMOLYSIN)).pixels
    frames = [np.where(pixels >= 0, pixels * (k + 1), pixels) for k in range(count)]
    cbfs = []
    for k, frame in enumerate(frames):
        cbfs.append(work / ("therm_%04d.cbf" % (k + 1)))
        CbfImage(data=frame, header={"_array_data.header_convention": "PILATUS_1.2",
                                     "_array_data.header_contents": contents}).write(str(cbfs[-1]))
    master = nexus.write_series(str(work), "therm", frames, layout="legacy", nimages_per_file=10,
                                geometry=nexus.cbf_geometry(str(THERMOLYSIN)))
    return cbfs, Path(master)


def eiger_timings(cbfs: list[Path], master: Path, pilatus: Path | None, words: list[str], repeat: int) -> dict:
    """ms per frame (medians) in one warm child process: decoding and analysis, HDF5 and CBF, and a PILATUS 6M
    frame's analysis for the ratio."""
    code = r"""
import json, statistics, sys, time
from spotfinder_core import analyse, nexus, parse_words, read_frame
from spotfinder_core.analysis import retain_freed_memory
cbfs, master, pilatus, words, repeat = json.loads(sys.argv[1])
retain_freed_memory()
params = parse_words(words)
def median_ms(fn):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000
out = {"decode_h5": [], "decode_cbf": [], "analyse_h5": [], "analyse_cbf": [], "chunk_h5py": [], "chunk_direct": []}
series = nexus.open_series(master)
with nexus.open_hdf5(series.data_files[0].path) as h5:  # the stored frame only: HDF5's filter pipeline or ours
    dataset = h5["/entry/data/data"]
    out["chunk_h5py"].append(median_ms(lambda: dataset[0]))
    out["chunk_direct"].append(median_ms(lambda: nexus.read_chunk(dataset, 0, "bench")))
for index, cbf in enumerate(cbfs):
    out["decode_h5"].append(median_ms(lambda: read_frame(master, index=index)))
    out["decode_cbf"].append(median_ms(lambda: read_frame(cbf)))
    out["analyse_h5"].append(median_ms(lambda: analyse(master, params, index=index)))
    out["analyse_cbf"].append(median_ms(lambda: analyse(cbf, params)))
    assert analyse(master, params, index=index).spot_total == analyse(cbf, params).spot_total
if pilatus:
    out["analyse_pilatus"] = [median_ms(lambda: analyse(pilatus, params))]
print(json.dumps({k: statistics.median(v) for k, v in out.items()}))
"""
    job = json.dumps([[str(c) for c in cbfs], str(master), str(pilatus) if pilatus else None, words, repeat])
    done = subprocess.run([sys.executable, "-c", code, job], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def eiger_main(args, words: list[str]) -> int:
    if not THERMOLYSIN.exists():
        print("no EIGER2 16M frame: %s not found" % THERMOLYSIN)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cbfs, master = eiger_series(work, args.frames)
        pilatus = next(iter(plain_frames(THAUMATIN.glob("thau_3_2_0005.cbf*"), work).values()), None)
        theirs = run_distl(cbfs, words)
        mine = eiger_timings(cbfs, master, pilatus, words, args.repeat)
    distl_ms = statistics.median(theirs["seconds"].values()) * 1000 if theirs else None
    print("EIGER2 16M (4148 x 4362), %d frames, median ms per frame, on %s (%d cores)%s"
          % (len(cbfs), cpu_name(), os.cpu_count(), CODE_FOR_ZEN2 if args.zen2 else ""))
    print("%-50s %10s" % ("", "ms"))
    rows = (("stored frame through h5py's filter pipeline", mine["chunk_h5py"]),
            ("stored frame, direct chunk + dectris-compression", mine["chunk_direct"]),
            ("decode, HDF5 (bitshuffle-LZ4, legacy master)", mine["decode_h5"]),
            ("decode, the same frame as miniCBF", mine["decode_cbf"]),
            ("analysis with decoding, HDF5", mine["analyse_h5"]),
            ("analysis with decoding, miniCBF", mine["analyse_cbf"]),
            ("real DISTL on the miniCBF", distl_ms))
    for label, ms in rows:
        print("%-50s %10s" % (label, "%.1f" % ms if ms is not None else "-"))
    if "analyse_pilatus" in mine:
        print("PILATUS 6M frame (thau_3_2_0005), analysis with decoding: %.1f ms; EIGER2 16M HDF5 / PILATUS 6M = "
              "%.2f (target <= 3.5)" % (mine["analyse_pilatus"], mine["analyse_h5"] / mine["analyse_pilatus"]))
    if distl_ms:
        print("EIGER2 16M HDF5 / real DISTL on its CBF = %.2f (target <= 0.3); CBF / DISTL = %.2f"
              % (mine["analyse_h5"] / distl_ms, mine["analyse_cbf"] / distl_ms))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("items", nargs="*", metavar="FRAME|distl.param=value")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of DISTL and ours, alternating")
    ap.add_argument("--stages", action="store_true", help="also print ms per pipeline stage")
    ap.add_argument("--eiger", action="store_true", help="time an EIGER2 16M series as HDF5 and as miniCBF")
    ap.add_argument("--frames", type=int, default=4, help="frames of the --eiger series")
    ap.add_argument("--zen2", action="store_true",
                    help="run our code as generated for an AVX2-only Zen 2 EPYC (emulated: the host's core and memory)")
    args = ap.parse_args(argv)
    if args.zen2:  # before anything imports numba or numpy, here or in the children
        os.environ.update(zen2_code())
    words = [w for w in args.items if "=" in w]
    items = [w for w in args.items if "=" not in w]
    if args.eiger:
        return eiger_main(args, words)
    with tempfile.TemporaryDirectory() as tmp:
        frames = list(plain_frames(items or THAUMATIN.glob("thau_3_2_*.cbf*"), Path(tmp)).values())
        if not frames:
            print("no frames: give FRAME arguments or provide %s" % THAUMATIN)
            return 2
        theirs, checked, unchecked = alternating(frames, words, args.repeat, args.rounds)
        print("%d frames, %d rounds alternating DISTL and ours, on %s (%d cores)%s"
              % (len(frames), max(1, args.rounds), cpu_name(), os.cpu_count(), CODE_FOR_ZEN2 if args.zen2 else ""))
        print("ours: as the service runs (Content-MD5 checked, verify_md5: true); ours as DISTL reads: the same")
        print("analysis without that check, which DISTL does not make (verify_md5: false); CPU: our process's CPU")
        print("time per frame, what a busy 2-worker service pays")
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
            cpu_ours = statistics.median(mine["cpu_seconds"].values()) * 1000
            print("median ms/frame: %s %.1f (CPU %.1f)" % (label, total_ours, cpu_ours), end="")
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
