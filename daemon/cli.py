"""The command tree: the four programs pyproject.toml installs, and the one parser of ``spotfinder``.

``spotfinder``'s subcommands are the rows of SUBCOMMANDS, each with its arguments and its handler (in
commands.py).  The three ``distl.*`` programs read ``key=value`` words the way DISTL's do (legacy.py).  Nothing
here imports the analysis or the service: a handler loads what it drives when it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import commands, config, legacy, warm

DEFAULTS = config.Settings()
LISTEN_TOPIC = "spotfinder.v1."  # every message the service publishes (publisher.SCHEMA + ".")


def _quiet_on_broken_pipe(command):
    """A reader that stops early (``| head``) ends the command quietly, as Unix tools do.  The output is flushed
    here, so that this holds for its last bytes too (and for a warm helper's child, whose output is buffered
    until then: warm.py)."""

    def wrapped(*args, **kwargs) -> int:
        try:
            status = command(*args, **kwargs)
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return commands.EXIT_OK

    wrapped.__doc__ = command.__doc__
    return wrapped


@_quiet_on_broken_pipe
def distl_signal_strength(argv: list[str] | None = None) -> int:
    """``distl.signal_strength FRAME [distl.param=value ...]``: the same text as cctbx's command.

    Run as the console script (no ``argv``), it is answered by the warm helper when one is running, and starts
    one once it has analysed a frame itself (warm.py); called from Python, it runs here."""
    if argv is not None:
        return legacy.signal_strength(argv)
    served = warm.run(sys.argv[1:])
    if served is not None:
        return served
    status = legacy.signal_strength(sys.argv[1:])
    if "spotfinder_core.analysis" in sys.modules:  # it analysed: the next call may as well find a helper
        warm.start()
    return status


def distl_thin_client(argv: list[str] | None = None) -> int:
    """``distl.thin_client FRAME|EXIT HOST PORT``: DISTL's client of the old server's POST protocol."""
    return legacy.thin_client(sys.argv[1:] if argv is None else argv)


def distl_mp_spotfinder_server_read_file(argv: list[str] | None = None) -> int:
    """``distl.mp_spotfinder_server_read_file distl.port=P distl.processors=N ...``: the service, the old way."""
    return legacy.mp_spotfinder_server_read_file(sys.argv[1:] if argv is None else argv)


# ----- spotfinder's subcommands: their arguments, then the table -------------------------------------------

def _find_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="+", metavar="FRAME|distl.param=value")
    parser.add_argument("--json", action="store_true", help="one JSON object per frame per line")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML settings file")
    config.add_flags(parser)


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", metavar="HOST", required=True, help="host running spotfinder serve")
    parser.add_argument("--work-port", type=int, default=config.REMOTE_WORK_PORT, metavar="PORT",
                        help="its work_endpoint port (default %(default)s)")
    parser.add_argument("--results-port", type=int, default=config.REMOTE_RESULTS_PORT, metavar="PORT",
                        help="its results_endpoint port (default %(default)s)")
    parser.add_argument("--processes", type=int, metavar="N", help="worker processes (default: number of cores)")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS, default="info")


def _listen_arguments(parser: argparse.ArgumentParser) -> None:
    endpoint = config.connect_endpoint(DEFAULTS.pub)
    # the default is spelled out: intermixed parsing hides a positional's %(default)s while it reads the options
    parser.add_argument("endpoint", nargs="?", default=endpoint, metavar="ENDPOINT",
                        help="PUB endpoint to connect to (default %s)" % endpoint)
    parser.add_argument("--topic", default=LISTEN_TOPIC, help="topic prefix, e.g. spotfinder.v1.result. "
                                                              "(default %(default)s)")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    parser.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds without a message")


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("frames", nargs="+", metavar="FRAME", help="source frames (.cbf, .cbf.gz, .cbf.bz2), or "
                                                                   "EIGER HDF5 masters (*_master.h5) with their data "
                                                                   "files")
    parser.add_argument("--to", required=True, metavar="DIR", help="folder to write into")
    parser.add_argument("--rate", type=float, metavar="HZ", help="frames per second (default: as fast as possible)")
    parser.add_argument("--count", type=int, metavar="N", help="frames to write, cycling through FRAMEs "
                                                               "(default: one per FRAME)")
    parser.add_argument("--template", metavar="NAME_#####.cbf", help="output names; the #s become the number "
                                                                     "(default: the first FRAME's template)")
    parser.add_argument("--start", type=int, default=1, metavar="N", help="first frame number (default 1)")
    parser.add_argument("--chunks", type=int, default=4, metavar="K",
                        help="write each frame in K chunks spread over half the frame period (default 4)")
    parser.add_argument("--atomic", action="store_true", help="write to a hidden temporary name, then rename")
    parser.add_argument("--hdf5", metavar="NAME", help="write the CBF FRAMEs as the EIGER HDF5 series NAME_master.h5 "
                                                       "+ NAME_data_NNNNNN.h5, delivered as the FileWriter does")
    parser.add_argument("--per-file", type=int, default=100, metavar="N",
                        help="with --hdf5: frames per data file (nimages_per_file, default 100)")
    parser.add_argument("--layout", choices=("legacy", "nxmx", "vds"), default="legacy",
                        help="with --hdf5: the master's layout (default legacy)")
    parser.add_argument("--swmr", action="store_true",
                        help="HDF5: write each data file as an SWMR writer does, in place, frame by frame as each "
                             "is due, held open until its last frame (one JSON line per frame)")


def _stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML settings file (for its state_dir)")
    parser.add_argument("--state-dir", metavar="DIR", help="the service's state folder")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to wait (default 60)")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--example", action="store_true", required=True,
                        help="print every setting with its default and documentation (config/spotfinder.yaml)")


@dataclass(frozen=True, kw_only=True)
class Subcommand:
    name: str
    help: str  # one line in ``spotfinder --help``
    description: str | None = None  # the paragraph of ``spotfinder NAME --help``
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # the handler: the exit code


SUBCOMMANDS = (
    Subcommand(name="find", help="analyse frames and print one line (or JSON object) per frame",
               arguments=_find_arguments, run=commands.run_find),
    Subcommand(name="serve", help="watch folders, analyse every frame, publish every result",
               description="Run the service: watch folders for CBF frames, fan them out to workers over ZeroMQ, "
                           "publish every result on a PUB socket and serve status over HTTP. Flags override the "
                           "config file, which overrides the embedded defaults (see config/spotfinder.yaml, or "
                           "spotfinder config --example).",
               arguments=_serve_arguments, run=commands.run_serve),
    Subcommand(name="worker", help="run extra workers for a service on another host",
               description="Run worker processes that pull frames from a service's dispatcher (the frames must be "
                           "on a shared filesystem) and push results to its collector. The service must bind its "
                           "work and results endpoints on a reachable interface (e.g. work_endpoint: "
                           "tcp://*:5602).",
               arguments=_worker_arguments, run=commands.run_worker),
    Subcommand(name="listen", help="print the service's published messages as JSON lines",
               description="Subscribe to the PUB socket and print each message body as one JSON line.",
               arguments=_listen_arguments, run=commands.run_listen),
    Subcommand(name="replay", help="play a detector: write copies of frames into a folder at a rate",
               description="Write copies of FRAMEs under new numbered names into --to, in chunks as a detector "
                           "does (or to a temporary name renamed into place with --atomic). Prints one JSON line "
                           "per frame written, with the time it became complete. An HDF5 master (or CBF FRAMEs "
                           "with --hdf5) is delivered as the EIGER FileWriter does: the master first, then each "
                           "data file when its frames are due at --rate (one JSON line per file).",
               arguments=_replay_arguments, run=commands.run_replay),
    Subcommand(name="stop", help="stop a running service (SIGTERM) and wait for it to exit",
               description="Send SIGTERM to the service that owns the state folder, and wait. (A service started "
                           "by distl.mp_spotfinder_server_read_file keeps its state in <default state "
                           "folder>/distl-PORT.)",
               arguments=_stop_arguments, run=commands.run_stop),
    Subcommand(name="config", help="print the documented example settings file",
               description="Print every setting of spotfinder serve with its embedded default and what it does, "
                           "as a YAML file to start a --config FILE from.",
               arguments=_config_arguments, run=commands.run_config),
)


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser, on which operands and options mix (``find F1 --json F2 distl.res.outer=4.9``).

    argparse hands a subcommand's words to its parser's parse_known_args, whose positionals end at the first
    option; this one reads them with parse_known_intermixed_args instead, which calls parse_known_args twice
    (options first, then operands) and is let through to argparse's own.
    """

    _reading = False

    def parse_known_args(self, args=None, namespace=None):
        if self._reading:
            return super().parse_known_args(args, namespace)
        self._reading = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._reading = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spotfinder", description="DISTL-compatible spot finding service")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)
    for subcommand in SUBCOMMANDS:
        sub = subparsers.add_parser(subcommand.name, help=subcommand.help, description=subcommand.description)
        subcommand.arguments(sub)
        sub.set_defaults(run=subcommand.run)
    return parser


@_quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    """``spotfinder SUBCOMMAND ...``."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
