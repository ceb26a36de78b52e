"""cupyx stand-in (see tools/fake_cupy/cupy)."""

import numpy as _np

from cupy import _key, _unwrap


def scatter_add(a, slices, value):
    """CuPy accepts NumPy and list indices here (it converts them), like indexing does."""
    _np.add.at(_unwrap(a), _key(slices), _unwrap(value))


def empty_pinned(shape, dtype=float, order="C"):
    """A host (NumPy) array, as CuPy's is, here in ordinary memory."""
    return _np.empty(shape, dtype, order)
