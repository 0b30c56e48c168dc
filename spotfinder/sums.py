"""Floating-point sums, means and standard deviations added in the order DISTL adds them.

A float sum's last bits depend on the order of its additions, and a printed digit now and then on those
bits.  DISTL adds left to right everywhere: its Python ``+=`` loops, ``reduce`` (libtbx's Spreadsheet
totals), scitbx's ``flex.sum`` and ``flex.mean``, and its C++ loops.  numpy's ``sum``, ``mean`` and ``std``
add pairwise, and Python's builtin ``sum()`` of floats is compensated (Neumaier) since Python 3.12: neither
gives DISTL's bits, and the builtin's would depend on the Python version.  The analysis's float reductions
go through here, except the per-spot sums (``Spots.per_spot_sum``: a numba kernel adding in the same order,
all spots at once); integer sums, exact in any order, need not, and the few numpy ones left say why.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def _floats(values) -> list[float]:
    """The values as Python floats (a numpy array's ``tolist`` is the fast way there)."""
    if isinstance(values, np.ndarray):
        return np.asarray(values, dtype=np.float64).tolist()
    return [float(v) for v in values]


def sequential_sum(values: Iterable, start: float = 0.0) -> float:
    """``start`` plus the values, added one at a time from the left, as ``flex.sum`` (from 0.0) and a
    ``total += value`` loop do."""
    total = start
    for value in _floats(values):
        total += value
    return total


def spreadsheet_total(values: list) -> float:
    """libtbx's Spreadsheet column total: ``reduce(x + y)`` from the first value on (the first value is not
    added to 0.0, so a lone -0.0 stays -0.0)."""
    return sequential_sum(values[1:], float(values[0]))


def flex_mean(values) -> float:
    """scitbx's ``flex.mean``: the values added from the first one on, times ``1. / n`` (not divided by n,
    which differs in the last bit about one time in four)."""
    floats = _floats(values)
    if not floats:
        raise ValueError("mean() argument is an empty array")
    return sequential_sum(floats[1:], floats[0]) * (1.0 / len(floats))


def running_mean_sd(values) -> tuple[float, float]:
    """scitbx's ``basic_statistics`` mean and bias-corrected standard deviation (what DISTL's filter chain
    takes as ``scitbx_stats``): Welford's running update, ``mean += delta / n`` and ``m2 += delta * (x -
    mean)``, then ``sqrt((m2 / n) / (1 - 1. / n))``.  -1 as the deviation of a single value, as there."""
    floats = _floats(values)
    if not floats:
        return -1.0, -1.0
    mean, m2 = floats[0], 0.0
    for n, x in enumerate(floats[1:], start=2):
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
    n = len(floats)
    if n == 1:
        return mean, -1.0
    return mean, math.sqrt((m2 / n) / (1.0 - 1.0 / n))
