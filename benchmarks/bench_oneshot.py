"""Whole-process time of the one-shot command, ours beside the real DISTL's, alternating in the same run.

    python benchmarks/bench_oneshot.py [FRAME] [--rounds N] [distl.param=value ...]

Runs ``distl.signal_strength FRAME`` (ours, from this venv) and the real DISTL's (``../shared/peer/distl``)
one after the other ``--rounds`` times, with warm caches (our modules' bytecode written, then one untimed
run of each: the page cache holds the frame and the programs, numba's cache holds our compiled kernels, and
our untimed run has started the warm helper, spotfinder_daemon/warm.py, which answers the timed ones), and
prints the median wall time of each whole process, their ratio and their peak RSS.  Ours runs twice a round:
as installed (answered by the helper) and with ``SPOTFINDER_WARM=0`` (each call loads everything itself).
The helper lives in a runtime folder of the benchmark's own and is stopped at the end.  Then the commands that
analyse nothing (``spotfinder --help``, ``spotfinder stop --help``, ``spotfinder listen --help``), and where our
process's time goes (imports, the first analysis, which loads the compiled kernels, and a second one).  Timings on a
shared 2-core machine drift: compare the ratio, and run it more than once.
"""
from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer import DISTL_VENV, SHARED, THAUMATIN, cpu_name, plain_frames
from spotfinder_daemon import warm

BIN = Path(sys.executable).parent
DISTL = SHARED / "peer" / "distl"

BREAKDOWN = r"""
import sys, time
t0 = time.perf_counter()
import numpy
t1 = time.perf_counter()
import numba
t2 = time.perf_counter()
from spotfinder_core.analysis import analyse
t3 = time.perf_counter()
analyse(sys.argv[1])
t4 = time.perf_counter()
analyse(sys.argv[1])
t5 = time.perf_counter()
for name, s in (("import numpy", t1 - t0), ("import numba", t2 - t1),
                ("import the rest of spotfinder_core.analysis", t3 - t2),
                ("first analyse (loads the compiled kernels)", t4 - t3), ("second analyse", t5 - t4)):
    print("  %-44s %6.3f s" % (name, s))
"""


def timed(command: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MB) and exit code of one whole process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024.0, process.returncode


def wait_for_helper(runtime: Path, within_s: float = 300.0) -> int:
    """The pid of the helper our untimed run started, once it takes calls (it loads, or compiles, the kernels)."""
    folder = runtime / "spotfinder-daemon"
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        logs = list(folder.glob("warm-*.log"))
        if logs and " ready in " in logs[0].read_text():
            pid = warm.helper_pid(str(logs[0])[:-len(".log")] + ".lock")
            if pid is not None:
                return pid
        time.sleep(0.1)
    raise SystemExit("the warm helper did not start within %g s (see %s)" % (within_s, folder))


def stop_helper(runtime: Path) -> None:
    for lock in (runtime / "spotfinder-daemon").glob("warm-*.lock"):
        pid = warm.helper_pid(str(lock))
        if pid is None:
            continue  # no helper: the pid left in it may be anybody's
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    time.sleep(0.5)
    shutil.rmtree(runtime, ignore_errors=True)


def resident_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024.0


def compile_bytecode() -> None:
    """Write our modules' bytecode: a first run does so unless PYTHONDONTWRITEBYTECODE is set (it is on the
    development host), and pip does at a regular install, so warm caches hold it."""
    for package in ("spotfinder_core", "spotfinder_daemon"):
        for folder in importlib.util.find_spec(package).submodule_search_locations:
            compileall.compile_dir(folder, quiet=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("items", nargs="*", metavar="FRAME|distl.param=value")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    words = [w for w in args.items if "=" in w]
    items = [w for w in args.items if "=" not in w]
    with tempfile.TemporaryDirectory() as tmp:
        frames = list(plain_frames(items or sorted(THAUMATIN.glob("thau_3_2_0001.cbf*")), Path(tmp)).values())
        if not frames:
            print("no frame: give FRAME or provide %s" % THAUMATIN)
            return 2
        frame = str(frames[0])
        runtime = Path(tempfile.mkdtemp(prefix="sfbench-"))  # short: a socket's address must fit in 108 bytes
        helper = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), SPOTFINDER_WARM="600")
        ours = [str(BIN / "distl.signal_strength"), frame, *words]
        commands = {"ours": (ours, helper), "ours, no helper": (ours, dict(helper, SPOTFINDER_WARM="0"))}
        if DISTL_VENV.is_dir():
            commands["DISTL"] = ([str(DISTL), frame, *words], None)
        else:
            print("real DISTL skipped: %s is missing (run %s)" % (DISTL_VENV, SHARED / "peer" / "setup.sh"))
        print("CPU: %s, %d cores; frame %s; %d rounds, alternating" % (cpu_name(), os.cpu_count(), Path(frame).name,
                                                                     args.rounds))
        compile_bytecode()
        try:
            for command, env in commands.values():  # warm the caches, untimed; ours starts its helper
                subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            helper_pid = wait_for_helper(runtime)
            seconds: dict[str, list[float]] = {name: [] for name in commands}
            rss: dict[str, float] = dict.fromkeys(commands, 0.0)
            for _ in range(args.rounds):
                for name, (command, env) in commands.items():
                    wall, peak, code = timed(command, env)
                    if code != 0:
                        print("%s failed (exit %d): %s" % (name, code, " ".join(command)))
                        return 1
                    seconds[name].append(wall)
                    rss[name] = max(rss[name], peak)
            served = (runtime / "spotfinder-daemon").glob("warm-*.log")
            calls = sum(line.count(" call ") for log in served for line in log.read_text().splitlines())
            helper_mb = resident_mb(helper_pid)
        finally:
            stop_helper(runtime)
        print()
        print("%-16s %10s %10s %10s  %s" % ("", "median s", "min s", "peak MB", "every round"))
        for name, values in seconds.items():
            print("%-16s %10.3f %10.3f %10.0f  %s" % (name, statistics.median(values), min(values), rss[name],
                                                      " ".join("%.2f" % v for v in values)))
        for name in ("ours", "ours, no helper"):
            if "DISTL" in seconds:
                ratios = [a / b for a, b in zip(seconds[name], seconds["DISTL"])]
                print("%s / DISTL, whole process: median of the rounds' ratios %.2f (min %.2f, max %.2f)"
                      % (name, statistics.median(ratios), min(ratios), max(ratios)))
        print("the helper answered %d of the %d timed calls of \"ours\" and holds %.0f MB resident while it waits "
              "(peak MB above: the caller's process alone)" % (calls, args.rounds, helper_mb))
        print()
        print("commands that analyse nothing (median of %d):" % args.rounds)
        for command in (["spotfinder", "--help"], ["spotfinder", "stop", "--help"], ["spotfinder", "listen", "--help"]):
            walls = [timed([str(BIN / command[0]), *command[1:]])[0] for _ in range(args.rounds)]
            print("  %-30s %6.3f s" % (" ".join(command), statistics.median(walls)))
        print()
        print("where our process's time goes (one run):")
        subprocess.run([sys.executable, "-c", BREAKDOWN, frame], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
