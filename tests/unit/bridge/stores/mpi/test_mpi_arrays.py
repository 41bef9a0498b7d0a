"""The fast distinct-value helpers agree with np.unique (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bridge.stores.mpi.arrays import distinct, distinct_inverse, runs

# small value ranges make repeats likely; wide ones exercise the int64 range the pair codes use
ints = st.one_of(
    arrays(np.int64, st.integers(0, 300), elements=st.integers(-5, 5)),
    arrays(np.int64, st.integers(0, 300), elements=st.integers(-(2**62), 2**62)),
)


@given(ints)
def test_distinct_is_np_unique(x: np.ndarray) -> None:
    assert np.array_equal(distinct(x), np.unique(x))


@given(ints)
def test_distinct_inverse(x: np.ndarray) -> None:
    values, index, inverse = distinct_inverse(x)
    assert np.array_equal(values, np.unique(x))
    assert np.array_equal(x[index], values)  # one occurrence of each value
    assert np.array_equal(values[inverse], x)
    assert inverse.shape == x.shape


@given(ints)
def test_runs(x: np.ndarray) -> None:
    s = np.sort(x)
    starts, lengths = runs(s)
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    assert np.array_equal(starts, first) and np.array_equal(lengths, counts)
