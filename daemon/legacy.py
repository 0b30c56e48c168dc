"""The DISTL commands as drop-ins: ``distl.signal_strength``, ``distl.mp_spotfinder_server_read_file`` and
``distl.thin_client``, each reading its command line the way DISTL's does (``key=value`` words, not options).

``distl.signal_strength FRAME [distl.param=value ...]`` prints the same text as cctbx's command.

``distl.mp_spotfinder_server_read_file distl.port=P distl.processors=N [distl.x=y ...] [--data-root DIR]
[--config FILE]`` runs ``spotfinder serve`` the old way: P is the HTTP port (on 127.0.0.1 unless the
config's ``http`` names another host), N the number of workers, the other words the start-up parameters
every query overrides.  It watches no folder, so queries may name frames under the current working
folder unless ``--data-root`` (or the config's ``data_root``) says otherwise.  Its state folder and
ZeroMQ sockets (ipc) are private to the port, so it can run beside a ``spotfinder serve``.

``distl.thin_client FRAME HOST PORT`` POSTs the frame's absolute path in thin_client's multipart form and
prints the short reply; ``distl.thin_client EXIT HOST PORT`` stops the server and waits until its port is
closed (one EXIT stops every worker, where the old server needed one per process).
"""
from __future__ import annotations

import atexit
import gc
import os
import socket
import sys
import time

from spotfinder_core import ParameterError, Params, parse_words
from spotfinder_core.params import listing

from . import config
from .commands import serve_settings, split_words
from .config import ConfigError

BOUNDARY = "----------ThIs_Is_tHe_bouNdaRY_$"  # what thin_client sends; any boundary works here
POST_TIMEOUT_S = 150.0
EXIT_WAIT_S = 60.0
MP_USAGE = """usage: distl.mp_spotfinder_server_read_file distl.port=PORT distl.processors=N [distl.param=value ...]
                                           [--data-root DIR ...] [--config FILE]
example: distl.mp_spotfinder_server_read_file distl.port=8125 distl.processors=8 distl.res.outer=2.0
Serves GET /spotfinder/distl.signal_strength?distl.image=FRAME&... and thin_client POSTs on 127.0.0.1:PORT
for frames under DIR (default: the current folder); stop it with: distl.thin_client EXIT localhost PORT"""
SIGNAL_STRENGTH_HELP_WORDS = ("h", "-h", "--help", "help", "-help", "H", "-H")
THIN_USAGE = """usage: distl.thin_client FRAME|EXIT HOST PORT
  FRAME: path of the frame to analyse (made absolute here); EXIT stops the server
  HOST:  usually localhost
  PORT:  the server's HTTP port"""


def signal_strength(argv: list[str]) -> int:
    if not argv or argv[0] in SIGNAL_STRENGTH_HELP_WORDS:
        print("usage:   distl.signal_strength image_filename [parameter=value ...]")
        print("example: distl.signal_strength lysozyme_001.img distl.res.outer=2.0 distl.res.inner=6.0 "
              "distl.minimum_spot_area=8")
        print(listing(Params()), end="")
        return 0
    frames, words = split_words(argv)
    try:
        params = parse_words(words)
    except ParameterError as exc:
        print("Sorry: %s" % exc, file=sys.stderr)
        return 2
    if len(frames) > 1:
        unknown = [f for f in frames if not os.path.isfile(f)]
        message = "Unknown file or keyword: %s" % unknown[0] if unknown else "Too many file names."
        print("Sorry: %s" % message, file=sys.stderr)
        return 2
    image = frames[0] if frames else params["distl.image"]
    if image is None:
        print("Sorry: Missing file name: add distl.image=FRAME to the command line.", file=sys.stderr)
        return 2
    # the process ends after this frame: with what it made frozen, its exit does not collect and free numba's
    # compiler state object by object (~0.25 s, a quarter of the whole process: benchmarks/bench_oneshot.py)
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    from spotfinder_core import nexus  # numpy, numba, h5py: loaded once there is a frame to analyse
    from spotfinder_core.analysis import analyse
    from spotfinder_core.report import BANNER

    params = params.replace(distl__image=image)
    indices = _range_indices(params["distl.range"])
    if indices is not None and not nexus.read_as_hdf5(image):
        # DISTL's dxtbx fails here with a TypeError (a CBF's reader takes no frame index)
        print("Sorry: distl.range names frames of an HDF5 (EIGER) file; %s is a single frame" % image, file=sys.stderr)
        return 2
    if indices is not None and not indices:
        print("Sorry: distl.range=%d,%d names no frame (the end is excluded)" % params["distl.range"], file=sys.stderr)
        return 2
    clipped = False
    if indices is not None:
        kept = _within_series(image, indices)
        clipped, indices = len(kept) < len(indices), kept
        if not indices:
            return 2
    results = [analyse(image, params, index=index) for index in (indices or [None])]
    for result in results:
        if result.status != "ok":
            where = "" if result.frame_index is None else " frame %d" % result.frame_index
            print("Sorry: %s%s: %s" % (image, where, result.error), file=sys.stderr)
    done = [nexus.distl_numbered(result, ranged=indices is not None) for result in results if result.status == "ok"]
    if not done:
        return 2
    print(BANNER)
    print("#Parameters used:")
    print("#phil __ON__")
    print()
    print(listing(params), end="")
    print()
    print("#phil __OFF__")
    print()
    sys.stdout.write(frames_body(done))
    return 0 if len(done) == len(results) and not clipped else 2


def _range_indices(value) -> range | None:
    """The frame indices of ``distl.range``: i for one value, range(a, b) for two (DISTL's Python range)."""
    if value is None:
        return None
    return range(value[0], value[0] + 1 if len(value) == 1 else value[1])


def _within_series(image: str, indices: range) -> range:
    """The part of ``indices`` the series holds; the rest is one "Sorry" line, and so is a series that cannot
    be opened (a range far beyond the series costs no time)."""
    from spotfinder_core import nexus

    try:
        count = nexus.open_series(image).count
    except nexus.FrameError as exc:
        print("Sorry: %s: %s" % (image, exc), file=sys.stderr)
        return range(0)
    if indices.stop > count:
        beyond = range(max(indices.start, count), indices.stop)
        held = "frames 0 to %d" % (count - 1) if count else "no frames"
        what = "frame %d is" % beyond.start if len(beyond) == 1 else "frames %d to %d are" % (beyond.start,
                                                                                            beyond.stop - 1)
        print("Sorry: %s %s out of range: it holds %s" % (image, what, held), file=sys.stderr)
    return range(indices.start, min(indices.stop, count))


def frames_body(results) -> str:
    """DISTL's text for the frames of one ``distl.range`` run (distl-spec §4.1 step 9, as the stock command
    prints it): the file name's echo once, every frame's bin tables (the legend before the first only), then
    every frame's stats block with its "Bin population cutoff" line, then every frame's "Number of focus spots"
    lines.  One frame: format_body."""
    from spotfinder_core.report import LEGEND, format_body

    legend = LEGEND.rstrip("\n").split("\n")
    heads, stats, focus = [], [], []
    for k, result in enumerate(results):
        lines = format_body(result).rstrip("\n").split("\n")
        start = lines.index("%25s : %s" % ("File", result.file))
        cutoff = next(i for i in range(start, len(lines)) if lines[i].startswith("Bin population cutoff"))
        head = lines[:start - 1]
        if k and result.details.echo_template:
            head = head[1:]
        if legend[0] in head and legend[0] in heads:  # the legend once, and the empty line after it
            at = head.index(legend[0])
            del head[at:at + len(legend) + 1]
        heads += head
        stats += [""] + lines[start:cutoff + 1]
        focus += [""] + lines[cutoff + 2:]
    return "\n".join(heads + stats + focus) + "\n"


def encode_form(fields: list[tuple[str, str]]) -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data POST with plain fields, as thin_client builds it."""
    lines = []
    for name, value in fields:
        lines += ["--" + BOUNDARY, 'Content-Disposition: form-data; name="%s"' % name, "", value]
    lines += ["--" + BOUNDARY + "--", ""]
    return "multipart/form-data; boundary=%s" % BOUNDARY, "\r\n".join(lines).encode()


def post_filename(host: str, port: int, filename: str, timeout: float = POST_TIMEOUT_S) -> tuple[int, str]:
    """POST ``filename`` to ``/spotfinder``; (status, body text).  OSError when the server cannot be reached."""
    import http.client  # here, not at the top: distl.signal_strength starts without it (and ssl, email)

    content_type, body = encode_form([("filename", filename), ("bin", "1")])
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", "/spotfinder", body, {"Content-Type": content_type})
        reply = connection.getresponse()
        return reply.status, reply.read().decode("utf-8", "replace")
    finally:
        connection.close()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def thin_client(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print(THIN_USAGE, file=sys.stderr)
        return 2
    target, host, port = argv[0], argv[1], int(argv[2])
    filename = "EXIT" if target == "EXIT" else os.path.abspath(target)
    try:
        status, text = post_filename(host, port, filename)
    except OSError as exc:
        print("distl.thin_client: cannot reach %s:%d: %s" % (host, port, exc.strerror or exc), file=sys.stderr)
        return 1
    if filename != "EXIT":
        sys.stdout.write(text)
        return 0 if status == 200 else 1
    if status != 200:
        print("distl.thin_client: EXIT refused (%d): %s" % (status, text.strip()), file=sys.stderr)
        return 1
    deadline = time.monotonic() + EXIT_WAIT_S
    while _port_open(host, port):
        if time.monotonic() > deadline:
            print("distl.thin_client: %s:%d still open %.0f s after EXIT" % (host, port, EXIT_WAIT_S), file=sys.stderr)
            return 1
        time.sleep(0.1)
    return 0


def _mp_settings(argv: list[str]) -> config.Settings:
    """Settings for the old way of starting: config file, then DISTL words and --data-root."""
    config_file, roots, words = None, [], []
    args = iter(argv)
    for arg in args:
        if arg in ("--config", "--data-root"):
            value = next(args, None)
            if value is None:
                raise ConfigError("%s needs a value" % arg)
            if arg == "--config":
                config_file = value
            else:
                roots.append(value)
        elif "=" in arg:
            words.append(arg)
        else:
            raise ConfigError("Unknown file or keyword: %s" % arg)
    try:
        params = parse_words(words)
    except ParameterError as exc:
        raise ConfigError(str(exc)) from None
    raw = config.read_file(config_file) if config_file else {}
    configured_host, _, configured_port = raw.get("http", "127.0.0.1:8125").rpartition(":")
    port = params["distl.port"] if "distl.port" in params.explicit() else int(configured_port)
    host = configured_host or "127.0.0.1"
    state_dir = raw.get("state_dir") or os.path.join(config.default_state_dir(), "distl-%d" % port)
    base = raw.get("parameters") or []
    if isinstance(base, dict):
        base = ["%s=%s" % item for item in base.items()]
    raw.update(http="%s:%d" % (host, port), state_dir=state_dir, parameters=list(base) + words)
    if roots or "data_root" not in raw:
        raw["data_root"] = roots or [os.getcwd()]
    if "distl.processors" in params.explicit() or "workers" not in raw:
        raw["workers"] = params["distl.processors"]
    for key in ("pub", "work_endpoint", "results_endpoint"):
        raw.setdefault(key, "ipc://%s" % os.path.join(os.path.abspath(state_dir), key.split("_")[0]))
    return config.validate(raw)


def mp_spotfinder_server_read_file(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(MP_USAGE)
        return 0
    try:
        settings = _mp_settings(argv)
    except ConfigError as exc:
        print("Sorry: %s" % exc, file=sys.stderr)
        return 2
    print("Serving %d-process HTTP on %s port %d ..." % ((settings.worker_count,) + settings.http_address))
    print("To exit: distl.thin_client EXIT localhost %d" % settings.http_address[1], flush=True)
    return serve_settings(settings)
