"""Play a detector: write copies of frames under new numbered names, at a rate, in chunks or atomically.

Beamline staff use it to exercise the pipeline and the tests use it to feed the service.  Each frame is
written the way a detector writes it: in ``chunks`` pieces spread over half the frame period, flushed
one by one (or to a hidden temporary name and renamed into place with ``atomic``).  One JSON line per
frame goes to ``out`` with the moment the file became complete, for latency measurements.

An EIGER HDF5 series (:func:`replay_series`: a ``*_master.h5`` with its data files, or CBF frames written as
one with :func:`spotfinder_core.nexus.write_series` first) is delivered the way the EIGER FileWriter and the
common downloaders deliver one: the master first, then each data file once its batch of frames
(``nimages_per_file``) is due at the rate, written to its final name in ``chunks`` spread over the batch's
period, or (``atomic``) to a hidden temporary name renamed into place.  One JSON line per file.  With ``swmr``
each data file is written as an SWMR writer writes one (:func:`write_swmr`): created when its first frame is due
and held open, each frame appended and flushed when due (one JSON line per frame), closed after its last.
"""
from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
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


def check_delivery(to_dir: str, rate: float | None, chunks: int) -> None:
    """ReplayError for a delivery that cannot start: no target folder, a rate or chunk count out of range."""
    if not os.path.isdir(to_dir):
        raise ReplayError("target folder %s does not exist" % to_dir)
    if rate is not None and rate <= 0:
        raise ReplayError("--rate must be positive")
    if chunks < 1:
        raise ReplayError("--chunks must be at least 1")


def replay(frames: list[str], to_dir: str, rate: float | None = None, count: int | None = None,
           template: str | None = None, atomic: bool = False, chunks: int = 4, start: int = 1,
           out=sys.stdout) -> int:
    """Write ``count`` frames (cycling through ``frames``) into ``to_dir``; how many were written."""
    if not frames:
        raise ReplayError("no frames given")
    for source in frames:
        if not os.path.isfile(source):
            raise ReplayError("no such frame file: %s" % source)
    check_delivery(to_dir, rate, chunks)
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
        write_as_delivered(data, final, chunks, period * 0.5, atomic)
        out.write(json.dumps({"file": final, "source": source, "t_complete": time.time(), "bytes": len(data)}) + "\n")
        out.flush()
    return count


def write_as_delivered(data: bytes, final: str, chunks: int, span_s: float, atomic: bool) -> None:
    """Write ``data`` to ``final`` the way a detector or downloader writes a file: in ``chunks`` flushed pieces
    spread over ``span_s`` seconds, in place or (``atomic``) under a hidden temporary name renamed into place at
    the end."""
    path = os.path.join(os.path.dirname(final), ".%s.part" % os.path.basename(final)) if atomic else final
    step = max(1, -(-len(data) // chunks))
    with open(path, "wb") as fh:
        for offset in range(0, len(data), step):
            if offset:
                time.sleep(span_s / chunks)
            fh.write(data[offset:offset + step])
            fh.flush()
    if atomic:
        os.rename(path, final)


def deliver(source: str, final: str, chunks: int, span_s: float, atomic: bool) -> None:
    """Copy the file ``source`` to ``final`` as :func:`write_as_delivered` writes."""
    with open(source, "rb") as fh:
        write_as_delivered(fh.read(), final, chunks, span_s, atomic)


def write_swmr(source: str, final: str, *, due=lambda position: None, done=lambda position: None) -> None:
    """Write the data file ``source`` to ``final`` as an SWMR writer does (a detector writer that lets readers in
    while it writes): the file and its empty, growing bitshuffle-LZ4 frame dataset are created (one chunk per
    frame, the source's attributes such as image_nr_low/high: SWMR allows no new attributes later), SWMR mode is
    switched on, then frame by frame, once ``due(position)`` returns, the frame is appended and flushed and
    ``done(position)`` called; the file is closed after the last frame."""
    import h5py
    import hdf5plugin

    from spotfinder_core import nexus

    with nexus.open_hdf5(source) as src_file:
        src = src_file["/entry/data/data"]
        count, slow, fast = src.shape
        copied = src.chunks == (1, slow, fast) and nexus.direct_codec(src) == "bslz4"
        with h5py.File(final, "w", libver="latest") as h5:
            for group, nx_class in (("entry", "NXentry"), ("entry/data", "NXdata")):
                h5.require_group(group).attrs["NX_class"] = nx_class
            dst = h5.create_dataset("/entry/data/data", shape=(0, slow, fast), maxshape=(None, slow, fast),
                                    dtype=src.dtype, chunks=(1, slow, fast),
                                    **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            h5.swmr_mode = True
            for position in range(count):
                due(position)
                dst.resize(position + 1, axis=0)
                if copied:  # the compressed chunk as it is, the way detector writers store frames
                    mask, chunk = src.id.read_direct_chunk((position, 0, 0))
                    dst.id.write_direct_chunk((position, 0, 0), chunk, filter_mask=mask)
                else:
                    dst[position] = src[position]
                dst.flush()
                done(position)


def series_sources(master: str):
    """The series at ``master`` (its data files, in order); ReplayError when it cannot be read."""
    from spotfinder_core import nexus  # h5py: only for an HDF5 replay
    from spotfinder_core.image import FrameError

    try:
        series = nexus.open_series(master)
    except FrameError as exc:
        raise ReplayError("cannot replay %s: %s" % (master, exc)) from None
    folder = os.path.dirname(master)
    data_files = [(os.path.join(folder, d.path), d.first_index, d.count) for d in series.data_files]
    for path, _first, _count in data_files:
        if not os.path.isfile(path):
            raise ReplayError("cannot replay %s: its data file %s is missing" % (master, path))
    return data_files


def replay_series(master: str, to_dir: str, rate: float | None = None, atomic: bool = False, chunks: int = 4,
                  swmr: bool = False, out=sys.stdout) -> int:
    """Deliver the HDF5 series at ``master`` into ``to_dir`` under its own names, as the FileWriter does (or, with
    ``swmr``, an SWMR writer); how many frames it holds.  With ``rate`` (frames/s) a data file is complete when
    its last frame is due (with ``swmr``, each frame when it is due)."""
    check_delivery(to_dir, rate, chunks)
    if swmr and atomic:
        raise ReplayError("--swmr writes each data file in place, frame by frame: not with --atomic")
    data_files = series_sources(master)
    period = 1.0 / rate if rate else 0.0
    t0 = time.monotonic()

    def done(path: str, **fields) -> None:
        out.write(json.dumps({"file": path, **fields, "t_complete": time.time()}) + "\n")
        out.flush()

    def pace(index: int) -> None:
        """Wait until frame ``index`` is due at the rate."""
        pause = t0 + index * period - time.monotonic()
        if pause > 0:
            time.sleep(pause)

    target = os.path.join(to_dir, os.path.basename(master))
    deliver(master, target, 1, 0.0, atomic)
    done(target, source=master, kind="master")
    frames = 0
    for path, first, count in data_files:
        pace(first)
        target = os.path.join(to_dir, os.path.basename(path))
        if swmr:
            write_swmr(path, target, due=lambda position, first=first: pace(first + position),
                       done=lambda position, first=first, path=path, target=target:
                       done(target, source=path, kind="frame", frame=first + position))
        else:
            deliver(path, target, chunks, count * period, atomic)  # written while its frames are taken
        done(target, source=path, kind="data", frames=[first, first + count])
        frames += count
    return frames


def replay_cbf_as_series(frames: list[str], to_dir: str, name: str, per_file: int, layout: str = "legacy",
                         **delivery) -> int:
    """Write the CBF ``frames`` as the HDF5 series ``name`` (``per_file`` frames per data file, the geometry of
    the first frame's header) in a private folder, then deliver it into ``to_dir``; how many frames."""
    import numpy as np

    from spotfinder_core import nexus
    from spotfinder_core.image import FrameError, read_frame

    if per_file < 1:
        raise ReplayError("--per-file must be at least 1")
    if not name or os.path.basename(name) != name:
        raise ReplayError("--hdf5 takes a series name, not a path: %r" % name)
    try:
        pixels = [read_frame(path, verify_md5=False).pixels for path in frames]
        geometry = nexus.cbf_geometry(frames[0])
    except FrameError as exc:
        raise ReplayError("cannot replay: %s" % exc) from None
    if any(p.shape != pixels[0].shape for p in pixels):
        raise ReplayError("cannot replay: the frames of one HDF5 series must all be of one size")
    work = tempfile.mkdtemp(prefix="spotfinder-replay-")
    try:
        master = nexus.write_series(work, name, pixels, layout=layout, nimages_per_file=per_file, geometry=geometry,
                                    dtype=np.uint32)  # every count of the CBF kept
        return replay_series(master, to_dir, **delivery)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def is_master(path: str) -> bool:
    return path.endswith("_master.h5")


def play(frames: list[str], to_dir: str, *, hdf5: str | None = None, per_file: int = 100, layout: str = "legacy",
         rate: float | None = None, count: int | None = None, template: str | None = None, atomic: bool = False,
         chunks: int = 4, start: int = 1, swmr: bool = False, out=sys.stdout) -> int:
    """What ``spotfinder replay`` does: CBF frames as copies (:func:`replay`) or as an HDF5 series (``hdf5``:
    its name), or HDF5 masters' series delivered as they are (``swmr``: by an SWMR writer); how many frames."""
    masters = [path for path in frames if is_master(path)]
    delivery = {"rate": rate, "atomic": atomic, "chunks": chunks, "out": out}
    if swmr:
        if not (masters or hdf5):
            raise ReplayError("--swmr writes the data files of an HDF5 series (a *_master.h5, or --hdf5)")
        delivery["swmr"] = True
    if masters and len(masters) != len(frames):
        raise ReplayError("give either CBF frames or HDF5 masters (*_master.h5), not both")
    if masters or hdf5:
        if count is not None or template is not None or start != 1:
            raise ReplayError("--count, --template and --start are for CBF frames written as CBF frames")
        for source in frames:
            if not os.path.isfile(source):
                raise ReplayError("no such file: %s" % source)
    if hdf5:
        if masters:
            raise ReplayError("--hdf5 writes CBF frames as an HDF5 series; an HDF5 master is replayed as it is")
        return replay_cbf_as_series(frames, to_dir, hdf5, per_file, layout, **delivery)
    if masters:
        return sum(replay_series(master, to_dir, **delivery) for master in masters)
    return replay(frames, to_dir, count=count, template=template, start=start, **delivery)
