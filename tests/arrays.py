"""Moving arrays across the test boundary, so that one test body runs on every backend.

The library keeps a tensor's data in the active backend's array module (NumPy, or CuPy on
the GPU) and never converts implicitly. Tests compare with NumPy, so they convert where the
values cross into or out of the library:

    from arrays import host, dev
    np.testing.assert_array_equal(host(layer.weight), expected)   # out of the library
    layer.weight.data[...] = dev(planted)                          # into it
"""

import numpy as np

from minibnn import backend


def host(x):
    """A NumPy array of ``x``: a Tensor (its data), a CuPy or NumPy array, or a scalar."""
    data = getattr(x, "data", x) if hasattr(x, "backward") else x
    return backend.to_numpy(data)


def dev(x, dtype=None):
    """``x`` as an array of the active backend (copied to the GPU under cupy)."""
    return backend.asarray(host(x), dtype=dtype)
