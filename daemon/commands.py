"""The service subcommands of ``spotfinder``: serve, worker, listen, replay, stop.

``add_service_commands(subparsers)`` adds them to the main parser; each sets ``func=handler(args) -> int``.
``python -m spotfinder_daemon.commands ...`` runs them without the rest of the CLI.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time

from . import config
from .config import ConfigError, Settings
from .logs import setup_logging

DEFAULTS = Settings()


def _fail(message: str, code: int) -> int:
    print("spotfinder: error: %s" % message, file=sys.stderr)
    return code


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.config, {
            "watch": args.watch, "pub": args.pub, "http": args.http, "workers": args.workers,
            "state_dir": args.state_dir, "data_root": args.data_root, "log_level": args.log_level,
            "polling": True if args.polling else None})
    except ConfigError as exc:
        return _fail(str(exc), 2)
    return serve_settings(settings)


def serve_settings(settings: Settings) -> int:
    """Run the service with validated settings (``spotfinder serve`` and the DISTL-style start); exit code."""
    from .service import ServiceError, serve  # imports numpy & co. only for the commands that need them

    setup_logging(settings.log_level)
    try:
        return serve(settings)
    except ServiceError as exc:
        return _fail(str(exc), 1)


def _port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def run_worker(args: argparse.Namespace) -> int:
    from .pool import WorkerPool

    if args.processes is not None and args.processes < 1:
        return _fail("--processes must be at least 1", 2)
    work = "tcp://%s:%d" % (args.connect, args.work_port)
    results = "tcp://%s:%d" % (args.connect, args.results_port)
    for name, endpoint in (("work", work), ("results", results)):
        try:
            config.check_endpoint(name, endpoint)
        except ConfigError as exc:
            return _fail(str(exc), 2)
    setup_logging(args.log_level)
    pool = WorkerPool(args.processes or os.cpu_count() or 1, work, results, log_level=args.log_level)
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
        return _fail(str(exc), 2)
    listen(args.endpoint, args.topic, args.count, args.timeout)
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from .replay import ReplayError, replay

    try:
        replay(args.frames, args.to, rate=args.rate, count=args.count, template=args.template, atomic=args.atomic,
               chunks=args.chunks, start=args.start)
    except ReplayError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail("%s: %s" % (exc.filename or "write", exc.strerror or exc), 1)
    except KeyboardInterrupt:
        return 130
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from .service import PID_FILE

    try:
        settings = config.load(args.config, {"state_dir": args.state_dir})
    except ConfigError as exc:
        return _fail(str(exc), 2)
    path = os.path.join(settings.state_dir, PID_FILE)

    def running() -> bool:  # the service holds an exclusive lock on its pid file while it runs
        try:
            with open(path) as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            return False
        except BlockingIOError:
            return True
        return False

    if not running():
        return _fail("no service is running with state folder %s" % settings.state_dir, 1)
    try:
        with open(path) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, signal.SIGTERM)
    except ValueError:
        return _fail("the pid file %s of the running service is empty or garbled" % path, 1)
    except OSError as exc:  # not ours to signal, or gone meanwhile
        return _fail("cannot stop the service: %s" % (exc.strerror or exc), 1)
    deadline = time.monotonic() + args.timeout
    while running():
        if time.monotonic() > deadline:
            return _fail("service pid %d still running after %.0f s" % (pid, args.timeout), 1)
        time.sleep(0.1)
    print("stopped service pid %d" % pid)
    return 0


def add_service_commands(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="watch folders, analyse every frame, publish every result",
        description="Run the service: watch folders for CBF frames, fan them out to workers over ZeroMQ, publish "
                    "every result on a PUB socket and serve status over HTTP. Flags override the config file, "
                    "which overrides the embedded defaults (see config/spotfinder.yaml).")
    serve.add_argument("--config", metavar="FILE", help="YAML settings file")
    serve.add_argument("--watch", metavar="DIR", action="append", help="folder to watch recursively (repeatable)")
    serve.add_argument("--pub", metavar="ENDPOINT", help="PUB endpoint to bind (default %s)" % DEFAULTS.pub)
    serve.add_argument("--http", metavar="HOST:PORT", help="HTTP address (default %s)" % DEFAULTS.http)
    serve.add_argument("--workers", metavar="N", type=int, help="local worker processes (default: number of cores)")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="folder of the ledger (default %s)" % config.default_state_dir())
    serve.add_argument("--data-root", metavar="DIR", action="append",
                       help="folder watched and queried frames must lie under (repeatable; default for HTTP "
                            "queries: the watched folders)")
    serve.add_argument("--polling", action="store_true", help="poll the folders (NFS/GPFS) instead of inotify")
    serve.add_argument("--log-level", choices=config.LOG_LEVELS, help="default info")
    serve.set_defaults(func=run_serve)

    worker = subparsers.add_parser(
        "worker", help="run extra workers for a service on another host",
        description="Run worker processes that pull frames from a service's dispatcher (the frames must be on a "
                    "shared filesystem) and push results to its collector. The service must bind its work and "
                    "results endpoints on a reachable interface (e.g. work_endpoint: tcp://*:5602).")
    worker.add_argument("--connect", metavar="HOST", required=True, help="host running spotfinder serve")
    worker.add_argument("--work-port", type=int, default=_port(DEFAULTS.work_endpoint), metavar="PORT",
                        help="its work_endpoint port (default %(default)s)")
    worker.add_argument("--results-port", type=int, default=_port(DEFAULTS.results_endpoint), metavar="PORT",
                        help="its results_endpoint port (default %(default)s)")
    worker.add_argument("--processes", type=int, metavar="N", help="worker processes (default: number of cores)")
    worker.add_argument("--log-level", choices=config.LOG_LEVELS, default="info")
    worker.set_defaults(func=run_worker)

    listen = subparsers.add_parser("listen", help="print the service's published messages as JSON lines",
                                   description="Subscribe to the PUB socket and print each message body as one "
                                               "JSON line.")
    listen.add_argument("endpoint", nargs="?", default=config.connect_endpoint(DEFAULTS.pub), metavar="ENDPOINT",
                        help="PUB endpoint to connect to (default %(default)s)")
    listen.add_argument("--topic", default="spotfinder.v1.", help="topic prefix, e.g. spotfinder.v1.result. "
                                                                  "(default %(default)s)")
    listen.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    listen.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds without a message")
    listen.set_defaults(func=run_listen)

    replay = subparsers.add_parser(
        "replay", help="play a detector: write copies of frames into a folder at a rate",
        description="Write copies of FRAMEs under new numbered names into --to, in chunks as a detector does "
                    "(or to a temporary name renamed into place with --atomic). Prints one JSON line per frame "
                    "written, with the time it became complete.")
    replay.add_argument("frames", nargs="+", metavar="FRAME", help="source frames (.cbf, .cbf.gz, .cbf.bz2)")
    replay.add_argument("--to", required=True, metavar="DIR", help="folder to write into")
    replay.add_argument("--rate", type=float, metavar="HZ", help="frames per second (default: as fast as possible)")
    replay.add_argument("--count", type=int, metavar="N", help="frames to write, cycling through FRAMEs "
                                                               "(default: one per FRAME)")
    replay.add_argument("--template", metavar="NAME_#####.cbf", help="output names; the #s become the number "
                                                                     "(default: the first FRAME's template)")
    replay.add_argument("--start", type=int, default=1, metavar="N", help="first frame number (default 1)")
    replay.add_argument("--chunks", type=int, default=4, metavar="K",
                        help="write each frame in K chunks spread over half the frame period (default 4)")
    replay.add_argument("--atomic", action="store_true", help="write to a hidden temporary name, then rename")
    replay.set_defaults(func=run_replay)

    stop = subparsers.add_parser("stop", help="stop a running service (SIGTERM) and wait for it to exit",
                                 description="Send SIGTERM to the service that owns the state folder, and wait. "
                                             "(A service started by distl.mp_spotfinder_server_read_file keeps its "
                                             "state in <default state folder>/distl-PORT.)")
    stop.add_argument("--config", metavar="FILE", help="YAML settings file (for its state_dir)")
    stop.add_argument("--state-dir", metavar="DIR", help="the service's state folder")
    stop.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to wait (default 60)")
    stop.set_defaults(func=run_stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spotfinder")
    add_service_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
