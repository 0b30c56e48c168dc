"""The running service's claim on its state folder: an exclusive lock on the folder itself, held open.

The lock, not a file's presence, says whether a service runs: the kernel drops it when the process ends,
however it ends.  It is taken on the folder's own descriptor, which nothing can delete from under the
service (a lock on a file inside would be lost with the file, and a second service could lock a new one).
The pid file beside it only tells ``spotfinder stop`` (through :func:`holder`) which pid to signal.
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


def _open_folder(state_dir: str) -> int:
    return os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _written_pid(state_dir: str) -> str:
    try:
        with open(path_in(state_dir)) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return ""


class PidFile:
    """Held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, *, state_dir: str):
        self.state_dir = state_dir
        self._folder: int | None = None

    def acquire(self) -> None:
        """Lock the folder and write our pid; StateFolderInUse, or OSError when the folder is unusable."""
        os.makedirs(self.state_dir, exist_ok=True)
        folder = _open_folder(self.state_dir)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(folder)
            raise StateFolderInUse(self.state_dir, _written_pid(self.state_dir) or "?") from None
        try:
            with open(path_in(self.state_dir), "w") as handle:
                handle.write("%d\n" % os.getpid())
        except OSError:
            os.close(folder)
            raise
        self._folder = folder

    def release(self) -> None:
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None


def holder(state_dir: str) -> int | None:
    """The pid of the service holding the state folder, or None when none runs; ValueError when the lock is
    held but the file does not name a pid."""
    try:
        folder = _open_folder(state_dir)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(folder, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return int(_written_pid(state_dir))
    finally:
        os.close(folder)
    return None
