"""One seed for every random choice: weight init, dropout masks, stochastic binarization, shuffling.

Layers and loaders take an explicit ``numpy.random.Generator``; when none is given they
draw from the process-wide generator here, which ``seed(n)`` resets.
"""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def seed(n):
    """Reset the process-wide generator to ``numpy.random.default_rng(n)`` and return it."""
    global _generator
    _generator = np.random.default_rng(n)
    return _generator


def get_rng(rng=None):
    """``rng`` if given, else the process-wide generator."""
    if rng is None:
        return _generator
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng
