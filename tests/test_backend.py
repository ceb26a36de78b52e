"""The backend switch, binary_matmul on every backend, and the XNOR path inside BinaryLinear."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from arrays import host

import minibnn
from conftest import REASONS  # the each_backend fixture comes from conftest.py too
from minibnn.kernels import cupy_gpu
from minibnn import backend, losses, models, nn, optim
from minibnn.tensor import Tensor

ROOT = Path(__file__).resolve().parents[1]


def pm1(a):
    return np.where(np.asarray(a) >= 0, 1, -1)


def test_numpy_and_numba_are_available_here():
    assert REASONS["numpy"] is None
    assert REASONS["numba"] is None, REASONS["numba"]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="numpy, numba, cupy"):
        backend.set_backend("tpu")
    with pytest.raises(ValueError, match="numpy, numba, cupy"):
        with backend.use("fortran"):
            pass


@pytest.mark.skipif(REASONS["cupy"] is None, reason="a GPU is present: cupy is available")
def test_unavailable_backend_says_why_and_never_falls_back():
    before = backend.active()
    with pytest.raises(backend.BackendUnavailable, match="cupy backend unavailable"):
        backend.set_backend("cupy")
    assert backend.active() == before


def test_cupy_availability_is_the_kernels_own_check(monkeypatch):
    monkeypatch.setattr(cupy_gpu, "available", lambda: (False, "no GPU in this test"))
    assert backend.available()["cupy"] == "cupy backend unavailable: no GPU in this test"
    with pytest.raises(backend.BackendUnavailable, match="no GPU in this test"):
        backend.set_backend("cupy")
    monkeypatch.setattr(cupy_gpu, "available", lambda: (True, ""))
    assert backend.available()["cupy"] is None


def test_missing_cupy_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    monkeypatch.setattr(cupy_gpu, "_cupy", None)
    reason = backend.available()["cupy"]
    assert reason.startswith("cupy backend unavailable: CuPy could not be imported")
    assert "pip install minibnn[gpu]" in reason
    with pytest.raises(ImportError, match=r"pip install minibnn\[gpu\]"):
        cupy_gpu.pack_rows(np.ones(3))


def test_use_restores_the_previous_backend_even_on_error():
    kernels = {"numpy": "minibnn.kernels.reference", "numba": "minibnn.kernels.numba_cpu",
               "cupy": "minibnn.kernels.cupy_gpu"}
    before = backend.active()  # numpy, or what MINIBNN_BACKEND chose
    other = "numpy" if before == "numba" else "numba"
    with pytest.raises(RuntimeError):
        with backend.use(other):
            assert backend.active() == other
            assert backend.kernel_module().__name__ == kernels[other]
            raise RuntimeError("boom")
    assert backend.active() == before
    assert backend.kernel_module().__name__ == kernels[before]


@pytest.mark.parametrize("value, ok", [("numba", True), ("NumPy", True), ("gpu", False)])
def test_environment_variable_selects_the_backend(value, ok):
    env = dict(os.environ, MINIBNN_BACKEND=value, PYTHONPATH=str(ROOT))
    code = "import minibnn; print(minibnn.backend.active())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == value.lower()
    else:
        assert proc.returncode != 0 and "gpu" in proc.stderr


@pytest.mark.parametrize("preset, expected", [(None, "4"), ("12", "12")])
def test_openblas_threads_are_asked_not_to_spin_unless_the_user_says(preset, expected):
    """Importing minibnn before NumPy sets OPENBLAS_THREAD_TIMEOUT (OpenBLAS's spin before
    its threads sleep) to its shortest, 4, and keeps a value the user set."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = str(ROOT)
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = ("import sys; import minibnn, os; "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 63, 1), (1, 64, 5), (7, 65, 9), (4, 4097, 3),
                                     (0, 10, 3), (5, 130, 0)])
def test_binary_matmul_is_the_exact_sign_product(each_backend, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.integers(-3, 3, (k, n))            # int input, zeros planted: sign(0) = +1
    a[:, ::7] = 0.0
    out = backend.to_numpy(minibnn.binary_matmul(backend.asarray(a), backend.asarray(b)))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, pm1(a) @ pm1(b))


def test_binary_matmul_accepts_tensors_and_rejects_bad_shapes():
    a, b = np.ones((2, 3)), -np.ones((3, 4))
    np.testing.assert_array_equal(host(minibnn.binary_matmul(Tensor(a), Tensor(b))),
                                  np.full((2, 4), -3))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 3\)"):
        minibnn.binary_matmul(a, b.T)
    with pytest.raises(ValueError, match="align"):
        minibnn.binary_matmul(np.ones(3), b)


def test_binary_linear_uses_the_kernel_for_binary_input(each_backend, monkeypatch, xnor_products):
    calls = []
    real = backend.kernel_module

    def spy(name=None):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backend, "kernel_module", spy)
    layer = nn.BinaryLinear(70, 5, binary_input=True, rng=np.random.default_rng(0))
    xb = Tensor(backend.asarray(pm1(np.random.default_rng(1).standard_normal((4, 70)))
                                .astype(np.float32)), requires_grad=True)
    out = layer(xb)
    assert calls, "binary input should go through the XNOR kernel"
    w = backend.to_numpy(layer.weight.data)
    np.testing.assert_array_equal(out.numpy(), backend.to_numpy(xb.data) @ pm1(w).T)
    out.sum().backward()   # gradients as for the float product
    np.testing.assert_allclose(backend.to_numpy(xb.grad), np.tile(pm1(w).sum(0), (4, 1)))
    np.testing.assert_allclose(backend.to_numpy(layer.weight.grad),
                               np.tile(backend.to_numpy(xb.data).sum(0), (5, 1)))
    calls.clear()
    layer.binary_input = False
    layer(Tensor(backend.asarray(np.full((4, 70), 0.5, np.float32))))
    assert not calls, "a layer not marked binary must use the float product"


def _losses_after_training(name, steps=6):
    with backend.use(name):
        rng = np.random.default_rng(11)
        model = models.mnist_mlp(hidden=96, layers=2, in_features=50, dropout_in=0,
                                 dropout_hidden=0, rng=rng)
        opt = optim.Adam(model.parameters(), lr=0.01)
        data_rng = np.random.default_rng(5)
        out = []
        for _ in range(steps):
            x = Tensor(backend.asarray(data_rng.uniform(-1, 1, (32, 50)).astype(np.float32)))
            y = backend.asarray(data_rng.integers(0, 10, 32))
            loss = losses.squared_hinge(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(float(loss.item()))
        return out


@pytest.mark.slow
def test_training_gives_the_same_losses_on_numba_as_on_numpy():
    ref = _losses_after_training("numpy")
    assert ref[-1] < ref[0]
    np.testing.assert_allclose(_losses_after_training("numba"), ref, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(REASONS["cupy"] is not None, reason=str(REASONS["cupy"]))
def test_training_gives_the_same_losses_on_cupy_as_on_numpy():
    np.testing.assert_allclose(_losses_after_training("cupy"), _losses_after_training("numpy"),
                               rtol=1e-4)
