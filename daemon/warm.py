"""The one-shot command's warm helper: ``distl.signal_strength`` answered by a process that has the analysis loaded.

A script that runs ``distl.signal_strength FRAME`` for each frame pays Python's, numpy's and numba's start-up
every time: ~0.3 s of the ~0.42 s a call takes on the 2-core EPYC, more than 0.6x of DISTL's whole process
(benchmarks/bench_oneshot.py).  So the first call that analyses a frame starts a helper in the background, as
build tools keep a server between calls (Bazel, Gradle, sccache).  It imports the analysis, loads the compiled
kernels (``analysis.warm_up``) and waits on a Unix socket.  Each later call hands it its arguments, working
folder, environment and its standard streams (the descriptors themselves, over the socket).  The helper forks
a child, which runs the command as the caller would have, writing straight to the caller's streams, and sends
back the exit status.  The text is the same bytes because the same code prints it.

The contract, both sides of it here: the caller connects and sends one byte with its descriptors 0, 1 and 2,
then a 4-byte length and a JSON request (``argv``, ``cwd``, ``env``, ``encoding``); the child answers ``A``
once it has taken the request, and the 4-byte exit status when the command is done.  A helper that closes
the connection without ``A`` (its sources changed, it is leaving) leaves the caller to run the command itself.

The helper lives in the user's runtime folder (``$XDG_RUNTIME_DIR/spotfinder-daemon``, else
``/tmp/spotfinder-daemon-UID``, mode 0700 and the user's own, or no helper at all), one per Python and
installation and numerical environment.  It leaves after ``SPOTFINDER_WARM`` seconds without a call (600
when unset), at once when a source file of ours changes, and on SIGTERM; ``SPOTFINDER_WARM=0`` turns it off.
Only the user who owns it may connect (checked with SO_PEERCRED).  It writes what it does to ``warm-KEY.log``
beside its socket.

This module is imported by every ``distl.signal_strength``: the caller's side imports nothing but the standard
library's lightest modules.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import struct
import sys
import zlib

IDLE_S = 600.0  # how long a helper waits for the next call before it leaves
SETTING = "SPOTFINDER_WARM"
OFF_WORDS = ("0", "off", "no", "false")
LENGTH = struct.Struct("!I")  # the request's length
STATUS = struct.Struct("!i")  # the command's exit status
ACCEPTED = b"A"
SOCKET_PATH_MAX = 108  # bytes in a Unix socket's address (sun_path), its final NUL included
REQUEST_TIMEOUT_S = 10.0  # how long each side waits for the request, and for the helper to take it
# Environment variables that change the code a helper runs (numba's target and cache, numpy's CPU dispatch,
# Python's own switches): callers that differ in them get helpers of their own.
KEYED_PREFIXES = ("NUMBA_", "NPY_", "PYTHON", "OPENBLAS_", "OMP_", "MKL_")


@functools.cache  # read once a process: a setting that cannot be read is named once
def idle_seconds() -> float | None:
    """The helper's idle time from SPOTFINDER_WARM, or None when it is off (or the setting cannot be read)."""
    setting = os.environ.get(SETTING, "").strip().lower()
    if not setting:
        return IDLE_S
    if setting in OFF_WORDS:
        return None
    try:
        seconds = float(setting)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        print("%s=%s: expected the helper's idle time in seconds, or 0 for no helper; running without one"
              % (SETTING, os.environ[SETTING]), file=sys.stderr)
        return None
    return seconds


def _folder() -> str | None:
    """The user's private folder for helpers, made if missing; None unless it is the user's own and 0700."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = os.path.join(runtime, "spotfinder-daemon") if runtime else \
        os.path.join(os.environ.get("TMPDIR") or "/tmp", "spotfinder-daemon-%d" % os.getuid())
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not os.path.isdir(folder):
        return None  # somebody else's folder, or one others can reach into: not a place for our socket
    return folder


def _key() -> str:
    """Which helper serves this caller: one per Python, installation of ours and numerical environment."""
    package = os.path.dirname(os.path.abspath(__file__))
    keyed = sorted((k, v) for k, v in os.environ.items() if k.startswith(KEYED_PREFIXES))
    text = "\0".join([sys.executable, package, repr(keyed)])
    return "%08x" % zlib.crc32(text.encode("utf-8", "surrogateescape"))


def paths() -> dict[str, str] | None:
    """The helper's socket, lock (holding its pid) and log, or None when there is to be no helper."""
    if idle_seconds() is None:
        return None
    folder = _folder()
    if folder is None:
        return None
    stem = os.path.join(folder, "warm-" + _key())
    if len(os.fsencode(stem)) + len(".sock.4194304") >= SOCKET_PATH_MAX:
        return None  # a socket cannot be bound there (its staging name included)
    return {"socket": stem + ".sock", "lock": stem + ".lock", "log": stem + ".log"}


# ----- the caller's side ------------------------------------------------------------------------------------

def run(argv: list[str]) -> int | None:
    """The exit status of ``distl.signal_strength argv`` as a running helper ran it, or None when no helper
    took the call (there is none, it is starting, or it is leaving): the caller then runs the command itself."""
    where = paths()
    if where is None:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(REQUEST_TIMEOUT_S)  # a helper that hangs before taking the call is passed over
    try:
        connection.connect(where["socket"])
        socket.send_fds(connection, [b"R"], [0, 1, 2])
        request = json.dumps({"argv": [sys.argv[0]] + argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "encoding": [_stream_encoding(sys.stdout), _stream_encoding(sys.stderr)]})
        payload = request.encode("utf-8", "surrogateescape")
        connection.sendall(LENGTH.pack(len(payload)) + payload)
        accepted = _read_exact(connection, 1) == ACCEPTED
    except OSError:
        accepted = False
    if not accepted:
        connection.close()  # before running the command here: a child that took it late then gives up
        return None
    connection.settimeout(None)
    try:
        status = _read_exact(connection, STATUS.size)
    except KeyboardInterrupt:
        return 130  # closing the connection ends the child (see _watch_caller)
    except OSError:
        status = b""
    finally:
        connection.close()
    if len(status) < STATUS.size:
        print("distl.signal_strength: the warm helper ended before the command did (see %s)" % where["log"],
              file=sys.stderr)
        return 1
    return STATUS.unpack(status)[0]


def start() -> None:
    """Start a helper for the next call, unless one is running or starting, or there is to be none."""
    where = paths()
    if where is None or _held(where["lock"]):
        return
    import subprocess

    with open(where["log"], "a") as log:  # the helper empties it once it holds the lock
        subprocess.Popen([sys.executable, "-m", "spotfinder_daemon.warm", where["socket"], where["lock"]],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)


def _held(lock_path: str) -> bool:
    """Whether a helper holds the lock (it does from its start to its end)."""
    import fcntl

    try:
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _stream_encoding(stream) -> list[str]:
    return [getattr(stream, "encoding", None) or "utf-8", getattr(stream, "errors", None) or "strict"]


def _read_exact(connection: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer when the other side closed first."""
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ----- the helper's side ------------------------------------------------------------------------------------

def serve(socket_path: str, lock_path: str, idle_s: float) -> int:
    """Load the analysis, then answer calls on ``socket_path`` until ``idle_s`` pass without one."""
    import fcntl
    import gc
    import signal
    import time

    lock = open(lock_path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log("another helper is running or starting; leaving")
        return 0
    lock.truncate(0)
    lock.write("%d\n" % os.getpid())
    lock.flush()
    try:
        os.ftruncate(sys.stdout.fileno(), 0)  # the log (opened to append): what an earlier helper wrote goes
    except OSError:
        pass
    os.chdir("/")  # a helper must not hold the caller's folder (an unmount); each child goes to its caller's
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads: the helper forks, and a 2x2 needs none
    started = time.perf_counter()
    import dectris.compression  # noqa: F401  (what nexus reads EIGER files with, loaded ahead of such a call)
    import h5py  # noqa: F401
    import hdf5plugin  # noqa: F401
    from spotfinder_core.analysis import warm_up

    from . import cli

    warm_up()
    sources = _sources(cli)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = "%s.%d" % (socket_path, os.getpid())
    listener.bind(staging)
    listener.listen(64)
    os.replace(staging, socket_path)  # replaces a dead helper's socket; callers never see a half-made one
    identity = os.stat(socket_path).st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    gc.freeze()  # what is loaded now stays untouched in the children: their pages stay shared
    _log("pid %d ready in %.2f s on %s; leaves after %g s without a call" % (os.getpid(),
         time.perf_counter() - started, socket_path, idle_s))
    listener.settimeout(idle_s)
    served = 0
    try:
        while True:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                _log("no call for %g s: leaving after %d calls" % (idle_s, served))
                return 0
            caller, uid = _peer(connection)
            if uid != os.getuid():
                connection.close()
                continue
            if _sources(cli) != sources:
                connection.close()  # the caller runs the command itself, and starts a helper of the new code
                _log("our source files changed: leaving after %d calls" % served)
                return 0
            served += 1
            _log("call %d from pid %d" % (served, caller))
            if os.fork() == 0:
                listener.close()
                lock.close()  # the lock is the helper's alone: a child still running must not keep it
                _answer(connection)  # never returns
            connection.close()
    finally:
        try:
            if os.stat(socket_path).st_ino == identity:
                os.unlink(socket_path)
        except OSError:
            pass


def _answer(connection: socket.socket) -> None:
    """In a forked child: run the caller's command on the caller's streams, send its status, and end."""
    import signal
    import threading
    import traceback

    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        connection.settimeout(REQUEST_TIMEOUT_S)
        _, fds, _, _ = socket.recv_fds(connection, 1, 3)
        size = _read_exact(connection, LENGTH.size)
        request = json.loads(_read_exact(connection, LENGTH.unpack(size)[0]).decode("utf-8", "surrogateescape"))
        connection.settimeout(None)
        if len(fds) != 3:
            return
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        (out_encoding, out_errors), (err_encoding, err_errors) = request["encoding"]
        sys.stdout = open(1, "w", encoding=out_encoding, errors=out_errors, closefd=False)
        sys.stderr = open(2, "w", encoding=err_encoding, errors=err_errors, closefd=False, buffering=1)
        sys.argv = request["argv"]
        connection.sendall(ACCEPTED)
        threading.Thread(target=_watch_caller, args=(connection,), daemon=True).start()
        from . import cli

        try:
            status = cli.distl_signal_strength(sys.argv[1:])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            status = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        connection.sendall(STATUS.pack(status))
    finally:
        os._exit(0)  # whatever went wrong, the caller sees the connection close (before "A": it runs the call)


def _watch_caller(connection: socket.socket) -> None:
    """End the child when its caller goes away (Ctrl-C, a timeout): nobody is left to read what it prints."""
    try:
        connection.recv(1)
    except OSError:
        pass
    os._exit(130)


def _peer(connection: socket.socket) -> tuple[int, int]:
    """The caller's pid and uid, as the kernel gives them."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", credentials)
    return pid, uid


def _sources(cli) -> list[tuple[str, int, int]]:
    """Our source files as they are now, and the folders our dependencies are installed in (name, mtime,
    size): a change means the helper runs old code (pip adds and removes a package's folders there)."""
    import numba
    import numpy

    import spotfinder_core

    found = []
    for folder in {os.path.dirname(os.path.dirname(module.__file__)) for module in (numpy, numba)}:
        info = os.stat(folder)
        found.append((folder, info.st_mtime_ns, info.st_size))
    for package in (spotfinder_core, sys.modules[cli.__package__]):
        folder = os.path.dirname(package.__file__)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                info = os.stat(os.path.join(folder, name))
                found.append((os.path.join(folder, name), info.st_mtime_ns, info.st_size))
    return found


def _log(message: str) -> None:
    import time

    print("%s %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), message), flush=True)


if __name__ == "__main__":
    idle = idle_seconds()
    sys.exit(serve(sys.argv[1], sys.argv[2], idle if idle is not None else IDLE_S))
