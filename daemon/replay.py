"""Play a detector: write copies of frames under new numbered names, at a rate, in chunks or atomically.

Beamline staff use it to exercise the pipeline and the tests use it to feed the service.  Each frame is
written the way a detector writes it: in ``chunks`` pieces spread over half the frame period, flushed
one by one (or to a hidden temporary name and renamed into place with ``atomic``).  One JSON line per
frame goes to ``out`` with the moment the file became complete, for latency measurements.
"""
from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import sys
import time

COMPRESSORS = {".gz": gzip, ".bz2": bz2}


class ReplayError(ValueError):
    """Bad replay arguments; the message is for the user."""


def _suffix(name: str) -> str:
    return next((ext for ext in COMPRESSORS if name.endswith(ext)), "")


def frame_bytes(source: str, target_suffix: str) -> bytes:
    """The source frame's bytes, (de)compressed to match the target's .gz/.bz2/plain suffix."""
    with open(source, "rb") as fh:
        data = fh.read()
    source_suffix = _suffix(source)
    if source_suffix != target_suffix:
        if source_suffix:
            try:
                data = COMPRESSORS[source_suffix].decompress(data)
            except (OSError, EOFError, ValueError) as exc:
                raise ReplayError("cannot decompress %s: %s" % (source, exc)) from None
        if target_suffix:
            data = COMPRESSORS[target_suffix].compress(data)
    return data


def default_template(source: str) -> str:
    from spotfinder_core.image import name_template  # with numpy and numba: only when no --template is given

    template = name_template(source)[0]
    return template + _suffix(source) if "#" in template else "replay_#####.cbf"


def numbered(template: str, number: int) -> str:
    runs = re.findall("#+", template)
    if len(runs) != 1:
        raise ReplayError("template %r must hold exactly one run of # for the frame number" % template)
    width = len(runs[0])
    return template.replace(runs[0], "%0*d" % (width, number))


def replay(frames: list[str], to_dir: str, rate: float | None = None, count: int | None = None,
           template: str | None = None, atomic: bool = False, chunks: int = 4, start: int = 1,
           out=sys.stdout) -> int:
    """Write ``count`` frames (cycling through ``frames``) into ``to_dir``; how many were written."""
    if not frames:
        raise ReplayError("no frames given")
    for source in frames:
        if not os.path.isfile(source):
            raise ReplayError("no such frame file: %s" % source)
    if not os.path.isdir(to_dir):
        raise ReplayError("target folder %s does not exist" % to_dir)
    if rate is not None and rate <= 0:
        raise ReplayError("--rate must be positive")
    if chunks < 1:
        raise ReplayError("--chunks must be at least 1")
    template = template or default_template(frames[0])
    numbered(template, start)  # validate before writing anything
    count = len(frames) if count is None else count
    period = 1.0 / rate if rate else 0.0
    cache: dict[str, bytes] = {}
    t0 = time.monotonic()
    for index in range(count):
        pause = t0 + index * period - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        source = frames[index % len(frames)]
        if source not in cache:
            cache[source] = frame_bytes(source, _suffix(template))
            if not cache[source]:
                raise ReplayError("frame file %s is empty" % source)
        data = cache[source]
        name = numbered(template, start + index)
        final = os.path.join(to_dir, name)
        path = os.path.join(to_dir, ".%s.part" % name) if atomic else final
        step = -(-len(data) // chunks)
        with open(path, "wb") as fh:
            for offset in range(0, len(data), step):
                if offset:
                    time.sleep(period * 0.5 / chunks)
                fh.write(data[offset:offset + step])
                fh.flush()
        if atomic:
            os.rename(path, final)
        out.write(json.dumps({"file": final, "source": source, "t_complete": time.time(), "bytes": len(data)}) + "\n")
        out.flush()
    return count
