"""Shared test fixtures.

``each_backend`` runs a test once per backend (numpy, numba, cupy) with that backend
active; a backend that cannot run here is skipped with its reason, and the cupy case
carries the ``gpu`` marker. Use it for every test that should hold on every backend.

``checkout_stays_clean`` fails the session when a test wrote into the checkout (a run
folder under ``runs/``, a file under ``benchmarks/results/``): tests write under
``tmp_path``. The GEMM autotune cache goes to a fresh temporary directory
(``MINIBNN_CACHE_DIR``).
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The GEMM autotune (minibnn.kernels.autotune) caches its choices on disk: never in the
# user's real cache directory from a test run.
os.environ["MINIBNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="minibnn-test-cache-")
atexit.register(shutil.rmtree, os.environ["MINIBNN_CACHE_DIR"], ignore_errors=True)

from minibnn import backend, binary  # noqa: E402

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


ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def load_benchmark(name):
    """The script ``benchmarks/NAME.py`` as a module (its folder on the path while it loads,
    for its ``import common``)."""
    import importlib.util
    import sys
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def load_fake_cupy():
    """tools/fake_cupy's NumPy-backed CuPy, loaded once under a private name (so nothing else
    in this process takes it for CuPy): the host tests of GPU code run their cupy modules on
    it without a GPU, and without it installed as ``cupy``."""
    import importlib.util
    import sys
    name = "_minibnn_fake_cupy"
    if name not in sys.modules:
        folder = ROOT / "tools" / "fake_cupy" / "cupy"
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _checkout_entries():
    """What tests must not add: top-level entries of the checkout (hidden ones and caches
    aside) and everything under runs/ and benchmarks/results/."""
    top = {p.name for p in ROOT.iterdir() if not p.name.startswith((".", "__"))}
    deep = {str(p.relative_to(ROOT)) for d in ("runs", "benchmarks/results")
            if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*") if "__pycache__" not in p.parts}
    return top | deep


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    before = _checkout_entries()
    yield
    added = sorted(_checkout_entries() - before)
    assert not added, f"the test suite wrote into the checkout {ROOT}: {added}"


def planted_thresholds(rng, z, periods):
    """Integer thresholds (int64) for the products ``z`` (M, N): (N,) for ``periods`` 1, else
    a (periods, N) table. Drawn from the products themselves, give or take 3, so that about
    half the bits fire, with the int32 extremes planted (a unit that never fires, one that
    always does)."""
    import numpy as np
    m, n = z.shape
    thr = rng.integers(-3, 4, size=(periods, n)).astype(np.int64)
    if z.size:
        thr += z[rng.integers(0, m, size=(periods, n)), np.arange(n)[None, :]]
    flat = thr.reshape(-1)
    flat[rng.random(flat.size) < 0.05] = np.iinfo(np.int32).max
    flat[rng.random(flat.size) < 0.05] = np.iinfo(np.int32).min
    return thr if periods > 1 else thr[0]
