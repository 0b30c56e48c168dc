"""numba's ``njit`` for our kernels, with their compiled code cached where a reinstall leaves it.

numba caches compiled code beside the source (``__pycache__``) unless ``NUMBA_CACHE_DIR`` says otherwise.
An installed package's folder is replaced by every ``pip install`` of it (the README's test command
reinstalls), so the next start would compile every kernel again: ~13 s of CPU per process on the 2-core
development host, half a minute on slower ones.  Our kernels are cached instead in ``NUMBA_CACHE_DIR`` when
it is set (the systemd units set it under the state folder), else in the user's cache folder
(``$XDG_CACHE_HOME/spotfinder-daemon/numba``, by default ``~/.cache/spotfinder-daemon/numba``), and an entry
is known by a hash of its source file's content (not its time stamp): a reinstall of unchanged code loads
the kernels as before.  numba keeps one entry per CPU model and numba version beside it, so hosts sharing a
home folder do not overwrite each other's.  Where no cache folder can be written, numba's own places apply.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import time
from collections.abc import Iterator

from numba import njit
from numba.core import caching, config

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LOCK_POLL_S = 0.05  # how often a worker waiting for another's compilation looks again

__all__ = ["njit", "cache_dir", "cache_lock"]


def cache_dir() -> str:
    """The folder our compiled kernels are kept in (see the module's docstring)."""
    if config.CACHE_DIR:
        return config.CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spotfinder-daemon", "numba")


@contextlib.contextmanager
def cache_lock(name: str, wait_s: float = 0.0) -> Iterator[bool]:
    """An OS lock on the file ``name`` in the cache folder, held until the block ends (the kernel releases it if
    the process dies), for the workers that warm up at once on a first start to share the compilation; whether
    this process holds it: False when another one held it throughout ``wait_s`` seconds.  True where the folder
    cannot be written (nobody shares it)."""
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        handle = open(os.path.join(cache_dir(), name), "a")
    except OSError:
        yield True
        return
    with handle:
        yield _lock(handle, wait_s)


def _lock(handle, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_S)
        except OSError:  # a file system without locks: as if another process held it, without waiting
            return False


@functools.cache
def _content_hash(path: str, mtime: float, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class KernelCacheLocator(caching._CacheLocator):
    """numba's cache locator for the functions of this package's modules only."""

    def __init__(self, py_func, py_file: str):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(cache_dir(), self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_source_stamp(self) -> str:
        status = os.stat(self._py_file)
        return _content_hash(self._py_file, status.st_mtime, status.st_size)

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file: str):
        if os.path.dirname(os.path.abspath(py_file)) != PACKAGE_DIR:
            return None
        locator = cls(py_func, py_file)
        try:
            locator.ensure_cache_path()
        except OSError:  # not writable: numba's own locators decide
            return None
        return locator


# numba picks the first locator that accepts a function, when the function is decorated: registered here,
# before any kernel module defines its kernels (they import njit from this module).
_impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
if KernelCacheLocator not in _impl._locator_classes:
    _impl._locator_classes.insert(0, KernelCacheLocator)
