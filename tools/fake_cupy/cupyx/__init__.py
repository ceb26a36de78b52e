"""cupyx stand-in (see tools/fake_cupy/cupy)."""

import numpy as _np

from cupy import _unwrap


def scatter_add(a, slices, value):
    _np.add.at(_unwrap(a), _unwrap(slices), _unwrap(value))
