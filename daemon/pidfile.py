"""The running service's claim on its state folder: an exclusive lock on a pid file it keeps open.

The lock, not the file's presence, says whether a service runs: the kernel drops it when the process ends,
however it ends, so a stale file never blocks a start and a deleted one is re-created by the next start.
``spotfinder stop`` asks :func:`holder` which pid to signal.
"""
from __future__ import annotations

import fcntl
import os

PID_FILE = "spotfinder.pid"


class StateFolderInUse(RuntimeError):
    """Another live service holds the lock; ``pid`` is what its pid file says (``"?"`` if unreadable)."""

    def __init__(self, state_dir: str, pid: str):
        super().__init__("state folder %s is in use by another service (pid %s)" % (state_dir, pid))
        self.pid = pid


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, PID_FILE)


class PidFile:
    """Held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, *, state_dir: str):
        self.state_dir = state_dir
        self._handle = None

    def acquire(self) -> None:
        """Take the lock and write our pid; StateFolderInUse, or OSError when the folder is unusable."""
        os.makedirs(self.state_dir, exist_ok=True)
        handle = open(path_in(self.state_dir), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "?"
            handle.close()
            raise StateFolderInUse(self.state_dir, other) from None
        handle.seek(0)
        handle.truncate()
        handle.write("%d\n" % os.getpid())
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def holder(state_dir: str) -> int | None:
    """The pid of the service holding the state folder, or None when none runs; ValueError when the lock is
    held but the file does not name a pid."""
    try:
        with open(path_in(state_dir)) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return int(handle.read().strip())
    except FileNotFoundError:
        return None
    return None
