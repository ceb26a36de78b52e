"""Shared test fixtures.

``each_backend`` runs a test once per backend (numpy, numba, cupy) with that backend
active; a backend that cannot run here is skipped with its reason, and the cupy case
carries the ``gpu`` marker. Use it for every test that should hold on every backend.
The GEMM autotune cache goes to a fresh temporary directory (``MINIBNN_CACHE_DIR``).
"""

import atexit
import os
import shutil
import tempfile

import pytest

# The GEMM autotune (minibnn.kernels.autotune) caches its choices on disk: never in the
# user's real cache directory from a test run.
os.environ["MINIBNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="minibnn-test-cache-")
atexit.register(shutil.rmtree, os.environ["MINIBNN_CACHE_DIR"], ignore_errors=True)

from minibnn import backend  # noqa: E402

REASONS = backend.available()


def backend_params(names=backend.NAMES):
    """``pytest.param`` per backend name, marked ``gpu`` for cupy and skipped where it
    cannot run (the reason is the backend's own)."""
    params = []
    for name in names:
        marks = [pytest.mark.gpu] if name == "cupy" else []
        if REASONS[name] is not None:
            marks.append(pytest.mark.skip(reason=REASONS[name]))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def each_backend(request):
    """The name of the active backend, one test run per backend."""
    with backend.use(request.param):
        yield request.param
