"""What each ``spotfinder`` subcommand does: ``run_<name>(args) -> exit code`` (their arguments are in cli.py).

Only the standard library and the settings load with this module; a handler imports the part it drives (the
analysis, the service, ZeroMQ) when it runs, so that ``spotfinder stop``, ``listen`` and every ``--help``
start at once instead of after half a second of numpy and numba.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from spotfinder_core import ParameterError, parse_words

from . import config, pidfile
from .config import ConfigError, Settings
from .logs import setup_logging

EXIT_OK, EXIT_USAGE = 0, 2


def fail(message: str, code: int) -> int:
    print("spotfinder: error: %s" % message, file=sys.stderr)
    return code


def split_words(words: list[str]) -> tuple[list[str], list[str]]:
    """Frames and ``key=value`` parameter words, as DISTL tells them apart (an existing file is a frame)."""
    frames, params = [], []
    for word in words:
        (params if "=" in word and not os.path.isfile(word) else frames).append(word)
    return frames, params


TABLE_FIELDS = (("file", "%-32s", "%-32s"), ("spot_total", "%6s", "%6d"), ("in_resolution_total", "%6s", "%6d"),
                ("good_bragg_candidates", "%6s", "%6d"), ("ice_rings", "%4s", "%4d"),
                ("method1_resolution", "%6s", "%6.2f"), ("method2_resolution", "%6s", "%6.2f"),
                ("max_unit_cell", "%7s", "%7.1f"), ("proc_ms", "%8s", "%8.0f"))
TABLE_HEADINGS = ("frame", "spots", "in-res", "good", "ice", "M1", "M2", "maxcell", "ms")


def _frame_name(record: dict) -> str:
    """The table's frame cell: the file's name, and the frame index for a frame of an HDF5 file."""
    index = "" if record.get("frame_index") is None else ":%d" % record["frame_index"]
    return os.path.basename(record["file"])[:32 - len(index)] + index


def _table_row(record: dict) -> str:
    if record["status"] != "ok":
        return "%-32s error: %s" % (_frame_name(record), record["error"])
    cells = []
    for name, head_fmt, fmt in TABLE_FIELDS:
        value = record[name]
        if name == "file":
            value = _frame_name(record)
        cells.append(head_fmt % "None" if value is None else fmt % value)
    return " ".join(cells)


def _frame_jobs(paths: list[str], frame_range) -> list[tuple[str, range | list, str | None]]:
    """(path, frame indices, error) per file: every frame of an HDF5 master or data file (those of
    ``distl.range`` when given), a CBF as itself (indices [None]); a file whose frames cannot be counted is one
    error.  A data file whose master is also named (``find x_*.h5``) is left to the master, so no frame comes
    twice.  The indices are ranges, so a series of any length costs no memory before it is analysed."""
    from spotfinder_core import nexus

    jobs = []
    masters = {os.path.abspath(path) for path in paths if nexus.master_of(path) == path}
    for path in paths:
        if not nexus.read_as_hdf5(path):
            jobs.append((path, [None], "distl.range names frames of an HDF5 file; a CBF holds one frame"
                         if frame_range is not None else None))
            continue
        try:
            series = nexus.open_series(path)
        except nexus.FrameError as exc:
            jobs.append((path, [None], str(exc)))
            continue
        if series.layout == "data" and series.master in masters:
            continue
        if frame_range is None:
            indices = range(series.count)
        else:
            indices = range(frame_range[0], frame_range[0] + 1 if len(frame_range) == 1 else frame_range[1])
        jobs.append((path, indices, None))
    return jobs


def run_find(args: argparse.Namespace) -> int:
    """One line per frame (a table row, or a JSON object); bad frames do not stop it.  An HDF5 master or data
    file stands for all its frames; a progress bar counts them on a terminal."""
    frames, words = split_words(args.items)
    try:
        params = parse_words(words)
    except ParameterError as exc:
        print("spotfinder find: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    if not frames:
        print("spotfinder find: no frames given", file=sys.stderr)
        return EXIT_USAGE
    from spotfinder_core.analysis import analyse, retain_freed_memory
    from spotfinder_core.result import Result

    jobs = _frame_jobs(frames, params["distl.range"])
    total = sum(len(indices) for _, indices, _ in jobs)
    progress = None
    if sys.stderr.isatty() and total > 1:
        from tqdm import tqdm
        progress = tqdm(total=total, unit="frame", file=sys.stderr)
    if not args.json:
        print(" ".join(head % title for (_, head, _), title in zip(TABLE_FIELDS, TABLE_HEADINGS)))
    failed = 0
    retain_freed_memory()
    for path, index, error in ((p, i, e) for p, indices, e in jobs for i in indices):
        result = Result.failure(path, error, index) if error else analyse(path, params, index=index)
        record = result.as_dict()
        failed += record["status"] != "ok"
        line = json.dumps(record) if args.json else _table_row(record)
        if progress:
            progress.write(line, file=sys.stdout)
            progress.update()
        else:
            print(line, flush=True)
    if progress:
        progress.close()
    return EXIT_USAGE if failed else EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config, config.flag_overrides(args))
    except ConfigError as exc:
        return fail(str(exc), 2)
    return serve_settings(settings)


def serve_settings(settings: Settings) -> int:
    """Run the service with validated settings (``spotfinder serve`` and the DISTL-style start); exit code."""
    from .service import ServiceError, serve

    setup_logging(settings.log_level)
    try:
        return serve(settings)
    except ServiceError as exc:
        return fail(str(exc), EXIT_USAGE)


def run_worker(args: argparse.Namespace) -> int:
    from .pool import WorkerPool

    if args.processes is not None and args.processes < 1:
        return fail("--processes must be at least 1", 2)
    work = "tcp://%s:%d" % (args.connect, args.work_port)
    results = "tcp://%s:%d" % (args.connect, args.results_port)
    for name, endpoint in (("work", work), ("results", results)):
        try:
            config.check_endpoint(name, endpoint)
        except ConfigError as exc:
            return fail(str(exc), 2)
    setup_logging(args.log_level)
    pool = WorkerPool(count=args.processes or os.cpu_count() or 1, work_endpoint=work, results_endpoint=results,
                      log_level=args.log_level)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    pool.start()
    while not stopping:
        time.sleep(0.2)
        pool.reap()
    pool.stop()
    return 0


def run_listen(args: argparse.Namespace) -> int:
    from .listen import listen

    try:
        config.check_endpoint("endpoint", args.endpoint)
    except ConfigError as exc:
        return fail(str(exc), 2)
    listen(args.endpoint, topic=args.topic, count=args.count, timeout=args.timeout)
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from .replay import ReplayError, play

    try:
        play(args.frames, args.to, hdf5=args.hdf5, per_file=args.per_file, layout=args.layout, rate=args.rate,
             count=args.count, template=args.template, atomic=args.atomic, chunks=args.chunks, start=args.start,
             swmr=args.swmr)
    except ReplayError as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail("%s: %s" % (exc.filename or "write", exc.strerror or exc), 1)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config, {"state_dir": args.state_dir})
    except ConfigError as exc:
        return fail(str(exc), 2)
    state_dir = settings.state_dir
    try:
        pid = pidfile.holder(state_dir)
    except ValueError:
        return fail("the pid file %s of the running service is empty or garbled" % pidfile.path_in(state_dir), 1)
    if pid is None:
        return fail("no service is running with state folder %s" % state_dir, 1)
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as exc:  # not ours to signal, or gone meanwhile
        return fail("cannot stop the service: %s" % (exc.strerror or exc), 1)
    deadline = time.monotonic() + args.timeout
    while _still_held(state_dir):
        if time.monotonic() > deadline:
            return fail("service pid %d still running after %.0f s" % (pid, args.timeout), 1)
        time.sleep(0.1)
    print("stopped service pid %d" % pid)
    return 0


def _still_held(state_dir: str) -> bool:
    try:
        return pidfile.holder(state_dir) is not None
    except ValueError:  # held by a service that has not written its pid yet
        return True


def run_config(args: argparse.Namespace) -> int:
    sys.stdout.write(config.example())
    return 0
