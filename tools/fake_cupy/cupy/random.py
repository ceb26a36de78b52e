"""cupy.random stand-in: NumPy's generators, results on the fake device."""

import numpy as _np

from . import _wrap


def __getattr__(name):
    attr = getattr(_np.random, name)
    if not callable(attr) or isinstance(attr, type):
        return attr
    return lambda *a, **k: _wrap(attr(*a, **k))
