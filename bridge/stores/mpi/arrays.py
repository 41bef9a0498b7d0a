"""Distinct values of 1-D integer arrays, faster than ``np.unique``.

``np.unique`` sorts integers with a *stable* sort when asked for indices (and, in numpy 2.3+, takes a
hash-table path when asked for nothing). For the int64 pair and value codes of the index both are
several times slower than numpy's default introsort (measured with numpy 2.4 on 5 000 to 120 000
codes: 3.1 ms against 0.6 ms, 15.8 ms against 0.6 ms). The index needs no stability: any occurrence of
a value represents it equally well.
"""

from __future__ import annotations

import numpy as np


def _starts(s: np.ndarray) -> np.ndarray:
    """Mask of the positions of sorted ``s`` where a new value starts."""
    flag = np.empty(len(s), dtype=bool)
    if len(s):
        flag[0] = True
        np.not_equal(s[1:], s[:-1], out=flag[1:])
    return flag


def distinct(x: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``x`` (what ``np.unique(x)`` returns)."""
    s = np.sort(x)
    out: np.ndarray = s[_starts(s)]
    return out


def distinct_inverse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, index, inverse)``: the sorted distinct values of ``x``, the position in ``x`` of *one*
    occurrence of each (not necessarily the first, unlike ``np.unique``), and for every element of ``x``
    the position of its value in ``values`` (``values[inverse] == x``)."""
    order = np.argsort(x)
    s = x[order]
    flag = _starts(s)
    inverse = np.empty(len(x), dtype=np.intp)
    inverse[order] = np.cumsum(flag) - 1
    return s[flag], order[flag], inverse


def runs(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of the runs of equal values in sorted ``s``."""
    starts = np.flatnonzero(_starts(s))
    return starts, np.diff(np.append(starts, len(s)))
