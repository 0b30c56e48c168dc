"""What every benchmark needs beside our code: the shared frames as plain CBFs, and the real DISTL run on them.

DISTL refuses compressed file names, so frames are decompressed into a working folder first; the real DISTL
runs in one process through ``../shared/peer/distl_batch`` (set up once by ``../shared/peer/setup.sh``).
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"
THAUMATIN = REAL / "thaumatin_grid_dls_i24_pilatus3_6m"
THERMOLYSIN = REAL / "eiger2_16m_cbf_dls_thermolysin" / "dlsnxs2cbf_therm_0001.cbf.gz"  # an EIGER2 16M frame
DISTL_BATCH = SHARED / "peer" / "distl_batch"
DISTL_VENV = Path(os.environ.get("DISTL_PEER_VENV", Path.home() / ".distl-peer"))



def cpu_name() -> str:
    """The CPU every benchmark names beside its figures (hosts differ)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"

# What an AVX2-only AMD EPYC (Zen 2, "Rome") has, in LLVM's names: code generated for it on a newer x86 host runs
# what that host would run, without AVX-512, GFNI, VAES or VPCLMULQDQ (the recipe the README gave before left out
# AVX-512 only, and numba then used GFNI's byte shuffle in the loop that classes pixels).
ZEN2_FEATURES = frozenset("""64bit adx aes avx avx2 bmi bmi2 clflushopt clwb clzero cmov crc32 cx16 cx8 f16c fma
    fsgsbase fxsr lzcnt mmx movbe mwaitx pclmul popcnt prfchw rdpid rdrnd rdseed sahf sha sse sse2 sse3 sse4.1
    sse4.2 sse4a ssse3 wbnoinvd x87 xsave xsavec xsaveopt xsaves""".split())


def zen2_code() -> dict[str, str]:
    """Environment for a process of ours to run the code it would run on an AVX2-only Zen 2 EPYC: numba's kernels
    compiled for that CPU (into a cache of their own) and numpy's AVX-512 loops left out.  The instructions are
    that host's; its caches, memory and the width of its core are this host's (a benchmark says so)."""
    import llvmlite.binding as llvm  # not numba: its settings are read from the environment when it is imported

    host = llvm.get_host_cpu_features()
    features = ",".join(("+" if on and name in ZEN2_FEATURES else "-") + name for name, on in sorted(host.items()))
    settings = {"NUMBA_CPU_NAME": "znver2", "NUMBA_CPU_FEATURES": features,
                "NUMBA_CACHE_DIR": os.path.join(tempfile.gettempdir(), "spotfinder-bench-znver2-cache")}
    if host.get("avx512f"):  # a host without AVX-512 has no such loops to leave out
        settings["NPY_DISABLE_CPU_FEATURES"] = "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
    return settings


ZEN2_SETTINGS = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_CACHE_DIR", "NPY_DISABLE_CPU_FEATURES")


def plain_frames(sources, into: Path) -> dict[str, Path]:
    """Frame name -> a plain .cbf: plain sources as they are, .cbf.bz2/.cbf.gz decompressed into ``into``
    (a frame present both ways is taken plain)."""
    sources = sorted(Path(s) for s in sources)
    found = {p.name: p for p in sources if p.name.endswith(".cbf")}
    for path in sources:
        if path.name.endswith((".cbf.bz2", ".cbf.gz")):
            name = path.name.rsplit(".", 1)[0]
            if name not in found:
                opener = bz2.open if path.name.endswith(".bz2") else gzip.open
                with opener(path, "rb") as src, open(into / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[name] = into / name
    return dict(sorted(found.items()))


def thaumatin_frames(into: Path, limit: int = 19) -> list[str]:
    """The PILATUS3 6M frames (one per frame number) as plain .cbf paths."""
    return [str(p) for p in list(plain_frames(THAUMATIN.glob("thau_3_2_*.cbf*"), into).values())[:limit]]


def thaumatin_present() -> bool:
    """Whether the shared PILATUS3 6M frames are there; when not, says so on stderr (the benchmark skips)."""
    if not THAUMATIN.is_dir():
        print("benchmark skipped: %s not found" % THAUMATIN, file=sys.stderr)
    return THAUMATIN.is_dir()


@contextlib.contextmanager
def thaumatin_workspace(prefix: str, limit: int):
    """A temporary working folder, and ``limit`` PILATUS3 6M frames as plain CBFs in its "frames" folder."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        (work / "frames").mkdir()
        yield work, thaumatin_frames(work / "frames", limit)


def run_distl(frames, words=()) -> dict | None:
    """The real DISTL on the frames in one process: seconds per frame (start-up excluded) and its peak
    resident memory; None, with the reason on stderr, when the peer is not set up."""
    if not DISTL_VENV.is_dir() or not DISTL_BATCH.exists():
        print("real DISTL skipped: %s is missing (run %s)" % (DISTL_VENV, SHARED / "peer" / "setup.sh"),
              file=sys.stderr)
        return None
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run([str(DISTL_BATCH), *map(str, frames), *words], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in ZEN2_SETTINGS})  # DISTL's own code
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not records:
        print("real DISTL failed: %s" % done.stderr.strip().splitlines()[-1:], file=sys.stderr)
        return None
    return {"seconds": {r["file"]: r["seconds"] for r in records},
            "maxrss_kb": max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)}
