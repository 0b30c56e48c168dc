"""numba's ``njit`` for our kernels, with their compiled code cached where a reinstall leaves it.

numba caches compiled code beside the source (``__pycache__``) unless ``NUMBA_CACHE_DIR`` says otherwise.
An installed package's folder is replaced by every ``pip install`` of it (the README's test command
reinstalls), so the next start would compile every kernel again: ~10 s of CPU per process on the 2-core
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
from collections.abc import Iterator

from numba import njit
from numba.core import caching, config

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

__all__ = ["njit", "cache_dir", "first_to_compile"]


def cache_dir() -> str:
    """The folder our compiled kernels are kept in (see the module's docstring)."""
    if config.CACHE_DIR:
        return config.CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spotfinder-daemon", "numba")


@contextlib.contextmanager
def first_to_compile() -> Iterator[bool]:
    """Whether this process is the first of those warming up at once on this cache folder (the service's
    workers on a first start), held until the block ends: an OS lock on a file there, released by the kernel
    if the process dies.  True where the folder cannot be written (nobody shares it)."""
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        handle = open(os.path.join(cache_dir(), "warm-up.lock"), "a")
    except OSError:
        yield True
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True


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
