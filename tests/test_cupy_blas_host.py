"""kernels.cupy_blas's calls into cuBLAS, checked on the CPU.

``cupy_blas`` calls cuBLAS through ctypes with column-major conventions: a row-major product
C = A B is computed as C^T = B^T A^T, each operand given with a transpose flag and a leading
dimension that depend on its memory layout. On a GPU the tests compare it with
``cupy.matmul``; here, so that CI checks the argument logic too, tools/fake_cupy stands in
for CuPy (its arrays are NumPy memory, so their ``data.ptr`` are real addresses) and a small
Python object stands in for libcublas: it computes each GEMM call as the cuBLAS
documentation defines it (column-major storage, ``op`` N or T, ``lda``/``ldb``/``ldc``,
alpha and beta), reading and writing the memory at the addresses it is handed. A swapped
operand, a wrong flag or a wrong leading dimension gives a wrong product (or, for a leading
dimension too small, an error)."""

import ctypes
import sys

import numpy as np
import pytest
from numpy.lib.array_utils import byte_bounds

from conftest import load_fake_cupy
from minibnn.kernels import cupy_blas

_OP = {0: "N", 1: "T"}
_TYPES = {2: np.float16, 14: np.uint16}  # CUDA_R_16F, CUDA_R_16BF (bf16 bit patterns)




def _scalar(arg):
    return arg._obj.value  # ctypes.byref(c_float / c_double)


_BUFFERS = []  # (first, past-the-end) byte addresses of every device array the test made


def _register(x):
    """Record the memory of fake device array ``x`` (its whole base) as readable."""
    a = x._a
    while isinstance(a.base, np.ndarray):
        a = a.base
    _BUFFERS.append(byte_bounds(a))
    return x


def _matrix(ptr, dtype, op, rows, cols, ld):
    """op(X) as NumPy, X column-major at ``ptr`` with leading dimension ``ld``; op(X) is
    rows x cols, so X is rows x cols (N) or cols x rows (T). The span must lie inside one
    array the test made: a wrong leading dimension is an AssertionError, not a stray
    access."""
    stored_rows, stored_cols = (rows, cols) if op == "N" else (cols, rows)
    assert ld >= max(1, stored_rows), f"leading dimension {ld} < {stored_rows} rows"
    count = ld * (stored_cols - 1) + stored_rows
    end = ptr + count * np.dtype(dtype).itemsize
    assert any(lo <= ptr and end <= hi for lo, hi in _BUFFERS), \
        f"a {rows} x {cols} operand (ld {ld}) at {ptr:#x} runs past its array"
    ctype = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}
    raw = np.ctypeslib.as_array((ctype[np.dtype(dtype).itemsize] * count).from_address(ptr))
    flat = raw.view(dtype)
    x = np.lib.stride_tricks.as_strided(flat, (stored_rows, stored_cols),
                                        (flat.itemsize, ld * flat.itemsize))
    return x if op == "N" else x.T


def _widen(x):
    if x.dtype == np.uint16:  # bf16 bits -> float32
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


class _Cublas:
    """The four entry points cupy_blas uses, computed on the host."""

    def __init__(self):
        self.calls = []

    def cublasSetStream_v2(self, handle, stream):
        return 0

    def _gemm(self, name, opa, opb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c,
              ctype, ldc):
        self.calls.append((name, _OP[opa], _OP[opb], m, n, k, lda, ldb, ldc))
        a_ = _widen(_matrix(a.value, atype, _OP[opa], m, k, lda))
        b_ = _widen(_matrix(b.value, btype, _OP[opb], k, n, ldb))
        out = _matrix(c.value, ctype, "N", m, n, ldc)
        out[...] = alpha * (a_ @ b_) + (beta * out if beta else 0)
        return 0

    def cublasSgemm_v2(self, h, opa, opb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        return self._gemm("Sgemm", opa, opb, m, n, k, _scalar(alpha), a, np.float32, lda, b,
                          np.float32, ldb, _scalar(beta), c, np.float32, ldc)

    def cublasDgemm_v2(self, h, opa, opb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        return self._gemm("Dgemm", opa, opb, m, n, k, _scalar(alpha), a, np.float64, lda, b,
                          np.float64, ldb, _scalar(beta), c, np.float64, ldc)

    def cublasGemmEx(self, h, opa, opb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c,
                     ctype, ldc, compute, algo):
        assert ctype == 0 and compute == 68 and algo == -1  # 32F out, COMPUTE_32F, DEFAULT
        return self._gemm("GemmEx", opa, opb, m, n, k, _scalar(alpha), a, _TYPES[atype], lda,
                          b, _TYPES[btype], ldb, _scalar(beta), c, np.float32, ldc)


@pytest.fixture
def blas(monkeypatch):
    fake = load_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    _BUFFERS.clear()
    for name in ("empty", "ascontiguousarray"):  # what cupy_blas makes is registered too
        real = getattr(fake, name)
        monkeypatch.setattr(fake, name, lambda *a, real=real, **k: _register(real(*a, **k)))
    lib = _Cublas()
    monkeypatch.setattr(cupy_blas, "_lib", lambda: lib)
    monkeypatch.setattr(cupy_blas, "_handle", lambda: ctypes.c_void_p(1))
    return fake, lib


def _layouts(fake, x):
    """x as C-contiguous, F-contiguous and strided (neither) device arrays."""
    wide = np.zeros((x.shape[0], 2 * x.shape[1]), x.dtype)
    wide[:, ::2] = x
    return {"C": _register(fake.asarray(np.ascontiguousarray(x))),
            "F": _register(fake.asarray(np.asfortranarray(x))),
            "strided": _register(fake.asarray(wide))[:, ::2]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 9, 4), (6, 9, 1), (4, 1, 1)])
def test_matmul_passes_cublas_the_right_operands(blas, dtype, shape):
    """Every layout pair of A and B, odd sizes, M or N or K of 1: the product cuBLAS is
    asked for equals A @ B, and it is one Sgemm / Dgemm call."""
    fake, lib = blas
    m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    want = a.astype(np.float64) @ b
    for la, da in _layouts(fake, a).items():
        for lb, db in _layouts(fake, b).items():
            lib.calls.clear()
            got = cupy_blas.matmul(da, db).get()
            assert got.dtype == dtype and got.flags.c_contiguous
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"A {la}, B {lb}")
            assert len(lib.calls) == 1
            assert lib.calls[0][0] == ("Sgemm" if dtype == np.float32 else "Dgemm")


@pytest.mark.parametrize("dtype", ["float16", "bf16"])
def test_gemm_ex_passes_cublas_the_right_operands(blas, dtype, monkeypatch):
    """gemm_ex (through the stand-in library, the fake CuPy's own shortcut turned off): every
    layout pair, float16 and bf16 bit patterns, a new output and beta = 1 accumulating into
    a given one: the exact integer products."""
    fake, lib = blas
    monkeypatch.setattr(fake, "__fake__", False)
    rng = np.random.default_rng(1)
    a = rng.integers(-8, 9, (5, 7)).astype(np.float32)
    b = rng.integers(-1, 2, (7, 3)).astype(np.float32)
    want = a @ b

    def as16(x):
        if dtype == "float16":
            return x.astype(np.float16)
        return (x.view(np.uint32) >> 16).astype(np.uint16)  # small integers: exact in bf16

    for la, da in _layouts(fake, as16(a)).items():
        for lb, db in _layouts(fake, as16(b)).items():
            lib.calls.clear()
            out = cupy_blas.gemm_ex(da, db)
            np.testing.assert_array_equal(out.get(), want, err_msg=f"A {la}, B {lb}")
            cupy_blas.gemm_ex(da, db, out, beta=1.0)
            np.testing.assert_array_equal(out.get(), 2 * want, err_msg=f"A {la}, B {lb}")
            assert [c[0] for c in lib.calls] == ["GemmEx", "GemmEx"]


def test_a_wrong_leading_dimension_is_caught_by_the_stand_in(blas, monkeypatch):
    """The stand-in is strict enough to matter: with the operands' layouts misread (every
    operand taken as C-contiguous), an F-contiguous A gives a wrong product; with C's
    leading dimension one too large, the write would run past C: an AssertionError."""
    fake, lib = blas
    operand = cupy_blas._operand
    monkeypatch.setattr(cupy_blas, "_operand",
                        lambda x: (x, cupy_blas._OP_N, max(1, x.shape[1])))
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((7, 3))
    got = cupy_blas.matmul(_register(fake.asarray(np.asfortranarray(a))),
                           _register(fake.asarray(b.astype(np.float32))))
    assert not np.allclose(got.get(), a @ b, rtol=1e-4)
    monkeypatch.setattr(cupy_blas, "_operand", operand)  # and C's leading dimension one too
    real = lib._gemm  # large runs past C
    monkeypatch.setattr(lib, "_gemm", lambda *args: real(*args[:-1], args[-1] + 1))
    with pytest.raises(AssertionError, match="runs past its array"):
        cupy_blas.matmul(_register(fake.asarray(a)), _register(fake.asarray(b.astype(np.float32))))
