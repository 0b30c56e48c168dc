"""Command-line glue: ``distl.signal_strength`` (the drop-in) and ``spotfinder`` with its subcommands."""
from __future__ import annotations

import argparse
import json
import os
import sys

from spotfinder_core import ParameterError, Params, analyse, parse_words
from spotfinder_core.analysis import retain_freed_memory
from spotfinder_core.params import listing
from spotfinder_core.report import BANNER, format_body

EXIT_OK, EXIT_USAGE = 0, 2


def _split_words(words: list[str]) -> tuple[list[str], list[str]]:
    """Frames and ``key=value`` parameter words, as DISTL tells them apart (an existing file is a frame)."""
    frames, params = [], []
    for word in words:
        (params if "=" in word and not os.path.isfile(word) else frames).append(word)
    return frames, params


def _quiet_on_broken_pipe(command):
    """A reader that stops early (``| head``) ends the command quietly, as Unix tools do."""

    def wrapped(*args, **kwargs) -> int:
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK

    wrapped.__doc__ = command.__doc__
    return wrapped


@_quiet_on_broken_pipe
def distl_signal_strength(argv: list[str] | None = None) -> int:
    """``distl.signal_strength FRAME [distl.param=value ...]``: the same text as cctbx's command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("h", "-h", "--help", "help", "-help", "H", "-H"):
        print("usage:   distl.signal_strength image_filename [parameter=value ...]")
        print("example: distl.signal_strength lysozyme_001.img distl.res.outer=2.0 distl.res.inner=6.0 "
              "distl.minimum_spot_area=8")
        print(listing(Params()), end="")
        return EXIT_OK
    frames, words = _split_words(argv)
    try:
        params = parse_words(words)
    except ParameterError as exc:
        print("Sorry: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    if len(frames) > 1:
        unknown = [f for f in frames if not os.path.isfile(f)]
        message = "Unknown file or keyword: %s" % unknown[0] if unknown else "Too many file names."
        print("Sorry: %s" % message, file=sys.stderr)
        return EXIT_USAGE
    image = frames[0] if frames else params["distl.image"]
    if image is None:
        print("Sorry: Missing file name: add distl.image=FRAME to the command line.", file=sys.stderr)
        return EXIT_USAGE
    params = params.replace(distl__image=image)
    result = analyse(image, params)
    if result.status != "ok":
        print("Sorry: %s: %s" % (image, result.error), file=sys.stderr)
        return EXIT_USAGE
    print(BANNER)
    print("#Parameters used:")
    print("#phil __ON__")
    print()
    print(listing(params), end="")
    print()
    print("#phil __OFF__")
    print()
    sys.stdout.write(format_body(result))
    return EXIT_OK


TABLE_FIELDS = (("file", "%-32s", "%-32s"), ("spot_total", "%6s", "%6d"), ("in_resolution_total", "%6s", "%6d"),
                ("good_bragg_candidates", "%6s", "%6d"), ("ice_rings", "%4s", "%4d"),
                ("method1_resolution", "%6s", "%6.2f"), ("method2_resolution", "%6s", "%6.2f"),
                ("max_unit_cell", "%7s", "%7.1f"), ("proc_ms", "%8s", "%8.0f"))
TABLE_HEADINGS = ("frame", "spots", "in-res", "good", "ice", "M1", "M2", "maxcell", "ms")


def _table_row(record: dict) -> str:
    if record["status"] != "ok":
        return "%-32s error: %s" % (os.path.basename(record["file"])[:32], record["error"])
    cells = []
    for name, head_fmt, fmt in TABLE_FIELDS:
        value = record[name]
        if name == "file":
            value = os.path.basename(value)[:32]
        cells.append(head_fmt % "None" if value is None else fmt % value)
    return " ".join(cells)


def find(args: argparse.Namespace) -> int:
    """``spotfinder find FRAME... [--json] [distl.x=y ...]``: one line per frame; bad frames do not stop it."""
    frames, words = _split_words(args.items)
    try:
        params = parse_words(words)
    except ParameterError as exc:
        print("spotfinder find: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    if not frames:
        print("spotfinder find: no frames given", file=sys.stderr)
        return EXIT_USAGE
    progress = None
    if sys.stderr.isatty() and len(frames) > 1:
        from tqdm import tqdm
        progress = tqdm(total=len(frames), unit="frame", file=sys.stderr)
    if not args.json:
        print(" ".join(head % title for (_, head, _), title in zip(TABLE_FIELDS, TABLE_HEADINGS)))
    failed = 0
    retain_freed_memory()
    for path in frames:
        record = analyse(path, params).as_dict()
        failed += record["status"] != "ok"
        print(json.dumps(record) if args.json else _table_row(record), flush=True)
        if progress:
            progress.update()
    if progress:
        progress.close()
    return EXIT_USAGE if failed else EXIT_OK


def distl_thin_client(argv: list[str] | None = None) -> int:
    """``distl.thin_client FRAME|EXIT HOST PORT``: DISTL's client of the old server's POST protocol."""
    from spotfinder_daemon.legacy import thin_client

    return thin_client(sys.argv[1:] if argv is None else argv)


def distl_mp_spotfinder_server_read_file(argv: list[str] | None = None) -> int:
    """``distl.mp_spotfinder_server_read_file distl.port=P distl.processors=N ...``: the service, the old way."""
    from spotfinder_daemon.legacy import mp_spotfinder_server_read_file

    return mp_spotfinder_server_read_file(sys.argv[1:] if argv is None else argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spotfinder", description="DISTL-compatible spot finding service")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("find", help="analyse frames and print one line (or JSON object) per frame")
    p.add_argument("items", nargs="+", metavar="FRAME|distl.param=value")
    p.add_argument("--json", action="store_true", help="one JSON object per frame per line")
    p.set_defaults(func=find)
    try:
        from spotfinder_daemon.commands import add_service_commands
    except ImportError:
        pass
    else:
        add_service_commands(commands)
    return parser


@_quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
