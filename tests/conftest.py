"""Shared test fixtures.

``each_backend`` runs a test once per backend (numpy, numba, cupy) with that backend
active; a backend that cannot run here is skipped with its reason, and the cupy case
carries the ``gpu`` marker. Use it for every test that should hold on every backend.
"""

import os

import pytest

from minibnn import backend, binary

REASONS = backend.available()

# Binary layers pick the XNOR kernel or a float GEMM per shape by timing ("auto"); both give
# the same numbers. The suite runs the XNOR kernel everywhere unless MINIBNN_BINARY_PRODUCT
# says otherwise, so that every binary layer in every test exercises the kernels; tests of
# the choice itself (tests/test_product_path.py) set the path they need.
if "MINIBNN_BINARY_PRODUCT" not in os.environ:
    binary.set_product_path("xnor")


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



@pytest.fixture
def xnor_products():
    """Binary layers on the XNOR kernel for this test, whatever the session's setting."""
    previous = binary.set_product_path("xnor")
    try:
        yield
    finally:
        binary.set_product_path(previous)
