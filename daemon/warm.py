"""The one-shot command's warm helper: ``distl.signal_strength`` answered by a process that has the analysis loaded.

A script that runs ``distl.signal_strength FRAME`` for each frame pays Python's, numpy's and numba's start-up
every time: ~0.3 s of the ~0.41 s a call takes on the 2-core EPYC, more than 0.6x of DISTL's whole process
(benchmarks/bench_oneshot.py).  So the first call that analyses a frame starts a helper in the background, as
build tools keep a server between calls (Bazel, Gradle, sccache).  It imports the analysis, loads the compiled
kernels (``analysis.warm_up``) and waits on a Unix socket.  Each later call hands it its arguments, working
folder, environment and its standard streams (the descriptors themselves, over the socket).  The helper forks
a child, which runs the command as the caller would have, writing straight to the caller's streams, and sends
back the exit status.  The text is the same bytes because the same code prints it.

The contract, both sides of it here: the caller connects and sends one byte with its descriptors 0, 1 and 2,
then a 4-byte length and a JSON request (``argv``, ``cwd``, ``env``, ``encoding``); the child answers ``A``
once it has taken the request, the caller ``G`` to let it go on, and the child the 4-byte exit status when
the command is done.  Until ``G`` nothing is run, so a caller that gives up waiting (or finds the helper
leaving: the connection closes) runs the command itself, and it runs once.

The helper lives in the user's runtime folder (``$XDG_RUNTIME_DIR/spotfinder-daemon``, else
``/tmp/spotfinder-daemon-UID``, mode 0700 and the user's own, or no helper at all).  Callers share one only
when they would run the same code in the same conditions: the same Python and installation, environment
variables that steer the code (``KEYED_PREFIXES``), resource limits, umask, cgroup and mount namespace.  It
leaves after ``SPOTFINDER_WARM`` seconds without a call (600 when unset), at once when a source file of ours
or the set of installed packages changes, and on SIGTERM; ``SPOTFINDER_WARM=0`` turns it off.  Both sides
check that the other is the same user (SO_PEERCRED).  It writes what it does to ``warm-KEY.log`` beside its
socket, and its pid to ``warm-KEY.lock`` while it runs.

A call it answers differs from one run in the caller's process in two ways only: a child killed by a signal
gives exit status 1 and a line naming the log (not the signal's status), and Ctrl-Z stops the caller but not
the child (it runs in the helper's session, in the same cgroup as the caller, since they were keyed alike).

This module is imported by every ``distl.signal_strength``: the caller's side imports nothing but the standard
library's lightest modules.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import socket
import struct
import sys
import zlib

IDLE_S = 600.0  # how long a helper waits for the next call before it leaves, unless SPOTFINDER_WARM says
IDLE_MAX_S = 86400.0  # a day: SPOTFINDER_WARM above it is refused (a socket timeout has bounds too)
SETTING = "SPOTFINDER_WARM"
OFF_WORDS = ("0", "off", "no", "false")
LENGTH = struct.Struct("!I")  # the request's length
STATUS = struct.Struct("!i")  # the command's exit status
ACCEPTED, GO = b"A", b"G"
SOCKET_PATH_MAX = 108  # bytes in a Unix socket's address (sun_path), its final NUL included
REQUEST_TIMEOUT_S = 10.0  # how long each side waits for the other before the handshake is given up
RETRY_AFTER_FAILURE_S = 60.0  # a helper that failed to start is not started again sooner
FAILED = "failed: "  # how the log says that a helper could not start, or stopped on an error
LOGGED_CALLS = 100  # every call is logged up to this many, then every this-many-th
# Environment variables that change the code a helper runs or how it runs (numba's target and cache, numpy's
# CPU dispatch, Python's switches and path, the dynamic loader, BLAS threads, locale and time zone): callers
# that differ in them get helpers of their own.
KEYED_PREFIXES = ("NUMBA_", "NPY_", "PYTHON", "OPENBLAS_", "OMP_", "MKL_", "LD_", "LC_", "LANG", "TZ")


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
    if not 0 < seconds <= IDLE_MAX_S:
        print("%s=%s: expected the helper's idle time in seconds (up to %d), or 0 for no helper; running without "
              "one" % (SETTING, os.environ[SETTING], IDLE_MAX_S), file=sys.stderr)
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
    """Which helper serves this caller: one per Python, installation of ours, steering environment and process
    conditions (resource limits, umask, cgroup, mount namespace), so that a child runs as its caller would."""
    package = os.path.dirname(os.path.abspath(__file__))
    keyed = sorted((k, v) for k, v in os.environ.items() if k.startswith(KEYED_PREFIXES))
    limits = [resource.getrlimit(getattr(resource, name)) for name in sorted(dir(resource))
              if name.startswith("RLIMIT_")]
    umask = os.umask(0)
    os.umask(umask)
    try:
        with open("/proc/self/cgroup") as cgroup:
            where = [cgroup.read(), os.readlink("/proc/self/ns/mnt")]
    except OSError:
        where = []
    text = "\0".join([sys.executable, package, repr(keyed), repr(limits), str(umask), *where])
    data = text.encode("utf-8", "surrogateescape")
    return "%08x%08x" % (zlib.crc32(data), zlib.adler32(data))


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
        if _peer(connection)[1] != os.getuid():
            raise ConnectionRefusedError("not our helper")  # before anything of ours is sent to it
        socket.send_fds(connection, [b"R"], [0, 1, 2])
        request = json.dumps({"argv": [sys.argv[0]] + argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "encoding": [_stream_encoding(sys.stdout), _stream_encoding(sys.stderr)]})
        payload = request.encode("utf-8", "surrogateescape")
        connection.sendall(LENGTH.pack(len(payload)) + payload)
        if _read_exact(connection, 1) != ACCEPTED:
            raise ConnectionAbortedError("the helper did not take the call")
        connection.sendall(GO)  # from here the child runs the command, and this caller must not
    except OSError:
        connection.close()
        return None
    try:
        connection.settimeout(None)
        status = _read_exact(connection, STATUS.size)
    except OSError:
        status = b""
    finally:
        connection.close()  # also on Ctrl-C, which goes on as the caller's own: the child sees it and ends
    if len(status) < STATUS.size:
        print("distl.signal_strength: the warm helper's child ended before the command did (see %s)" % where["log"],
              file=sys.stderr)
        return 1
    return STATUS.unpack(status)[0]


def start() -> None:
    """Start a helper for the next call, unless one is running or starting, one failed to start a moment ago,
    or there is to be none."""
    where = paths()
    if where is None or held(where["lock"]) or _failed_lately(where["log"]):
        return
    # -P: no folder of the caller's on the helper's import path, where a stray module would be imported
    # instead of ours.  posix_spawn, not subprocess: nothing waits for it, and it starts its own session.
    try:
        log = os.open(where["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return  # no helper this time (its log cannot be written, a full disk): the command has run
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-P", "-m", __spec__.name, where["socket"], where["lock"]],
                       os.environ, setsid=True,
                       file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)])
    except OSError:
        pass  # no helper this time: the command has run, and the next call tries again
    finally:
        os.close(log)


def held(lock_path: str) -> bool:
    """Whether a helper holds the lock (it does from its start to its end): only then is the pid in it a
    helper's to signal."""
    import fcntl

    try:
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def helper_pid(lock_path: str) -> int | None:
    """The pid of the helper holding the lock, or None when none does (a pid left in it may be anybody's) or it
    has not written its pid yet."""
    if not held(lock_path):
        return None
    try:
        with open(lock_path) as lock:
            return int(lock.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _failed_lately(log_path: str) -> bool:
    """Whether the last helper failed within RETRY_AFTER_FAILURE_S: a helper that cannot start is not started
    again on every call."""
    import time

    try:
        with open(log_path) as log:
            failed = FAILED in log.read()
        return failed and time.time() - os.stat(log_path).st_mtime < RETRY_AFTER_FAILURE_S
    except OSError:
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


def _peer(connection: socket.socket) -> tuple[int, int]:
    """The other side's pid and uid, as the kernel gives them."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", credentials)
    return pid, uid


# ----- the helper's side ------------------------------------------------------------------------------------

def serve(socket_path: str, lock_path: str, idle_s: float) -> int:
    """Load the analysis, then answer calls on ``socket_path`` until ``idle_s`` pass without one."""
    import fcntl
    import signal

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
        pass  # not a file: run by hand
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = identity = None
    try:
        listener = _prepare(socket_path)
        identity = os.stat(socket_path).st_ino  # the socket is removed at the end only if it is still ours
        _answer_calls(listener, lock, idle_s)
    except Exception as exc:  # a helper that cannot start is logged, and not started again at once
        _log(FAILED + "%s: %s" % (type(exc).__name__, exc))
        return 1
    finally:
        if listener is not None:
            listener.close()
        try:
            if identity is not None and os.stat(socket_path).st_ino == identity:
                os.unlink(socket_path)
        except OSError:
            pass
        lock.truncate(0)  # no pid is left for anyone to signal
        lock.close()
    return 0


def _prepare(socket_path: str) -> socket.socket:
    """Load the analysis and its kernels, then listen on ``socket_path``."""
    import gc
    import signal
    import time

    started = time.perf_counter()
    os.chdir("/")  # a helper must not hold the caller's folder (an unmount); each child goes to its caller's
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS threads alive at a fork (a 2x2 needs none)
    import dectris.compression  # noqa: F401  (what nexus reads EIGER files with, loaded ahead of such a call)
    import h5py  # noqa: F401
    import hdf5plugin  # noqa: F401
    from spotfinder_core.analysis import warm_up

    from . import cli  # noqa: F401  (the command the children run)

    warm_up()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = "%s.%d" % (socket_path, os.getpid())
    listener.bind(staging)
    listener.listen(64)
    os.replace(staging, socket_path)  # replaces a dead helper's socket; callers never see a half-made one
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children are reaped by the kernel
    gc.freeze()  # what is loaded now stays untouched in the children: their pages stay shared
    _log("pid %d ready in %.2f s on %s" % (os.getpid(), time.perf_counter() - started, socket_path))
    return listener


def _answer_calls(listener: socket.socket, lock, idle_s: float) -> None:
    import signal

    from . import cli

    sources = _sources(cli)
    listener.settimeout(idle_s)
    served = 0
    try:
        while True:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                _log("no call for %g s: leaving" % idle_s)
                return
            caller, uid = _peer(connection)
            if uid != os.getuid():
                connection.close()
                continue
            if _sources(cli) != sources:
                connection.close()  # the caller runs the command itself, and starts a helper of the new code
                _log("our source files or installed packages changed: leaving")
                return
            served += 1
            if served <= LOGGED_CALLS or served % LOGGED_CALLS == 0:
                _log("call %d from pid %d" % (served, caller))
            # SIGTERM is held back across the fork: a child must never run the helper's handler
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            if os.fork() == 0:
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                    listener.close()
                    lock.close()  # the lock is the helper's alone: a child still running must not keep it
                    _answer(connection)
                finally:
                    os._exit(0)  # whatever went wrong, the caller sees the connection close
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            connection.close()
    finally:
        _log("answered %d calls" % served)


def _answer(connection: socket.socket) -> None:
    """In a forked child: take the caller's request, run its command on its streams and send the status."""
    import threading
    import traceback

    connection.settimeout(REQUEST_TIMEOUT_S)
    _, fds, _, _ = socket.recv_fds(connection, 1, 3)
    size = _read_exact(connection, LENGTH.size)
    request = json.loads(_read_exact(connection, LENGTH.unpack(size)[0]).decode("utf-8", "surrogateescape"))
    if len(fds) != 3:
        return
    connection.sendall(ACCEPTED)
    if _read_exact(connection, 1) != GO:
        return  # the caller gave up waiting and runs the command itself
    connection.settimeout(None)
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
    threading.Thread(target=_watch_caller, args=(connection,), daemon=True).start()
    from . import cli

    try:
        status = cli.distl_signal_strength(sys.argv[1:])  # with argv: run here, never handed on
    except SystemExit as exc:  # as the interpreter ends on it
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:  # as the interpreter reports an exception nobody caught
        traceback.print_exc()
        status = 1
    try:
        sys.stderr.flush()
    except OSError:
        pass
    connection.sendall(STATUS.pack(status))


def _watch_caller(connection: socket.socket) -> None:
    """End the child when its caller goes away (Ctrl-C, a timeout): nobody is left to read what it prints."""
    try:
        connection.recv(1)
    except OSError:
        pass
    os._exit(130)


def _sources(cli) -> list[tuple[str, int, int]] | None:
    """Our source files as they are now, and the folders our dependencies are installed in (name, mtime,
    size): a change means the helper runs old code (pip adds and removes a package's folders there).  None
    when one cannot be looked at (a reinstall under way), which differs from any list."""
    import numba
    import numpy

    import spotfinder_core

    found = []
    try:
        for folder in sorted({os.path.dirname(os.path.dirname(module.__file__)) for module in (numpy, numba)}):
            info = os.stat(folder)
            found.append((folder, info.st_mtime_ns, info.st_size))
        for package in (spotfinder_core, sys.modules[cli.__package__]):
            folder = os.path.dirname(package.__file__)
            for name in sorted(os.listdir(folder)):
                if name.endswith(".py"):
                    info = os.stat(os.path.join(folder, name))
                    found.append((os.path.join(folder, name), info.st_mtime_ns, info.st_size))
    except OSError:
        return None
    return found


def _log(message: str) -> None:
    import time

    print("%s %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), message), flush=True)


if __name__ == "__main__":
    idle = idle_seconds()
    sys.exit(serve(sys.argv[1], sys.argv[2], idle if idle is not None else IDLE_S))
