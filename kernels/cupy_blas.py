"""Float GEMMs on the GPU through cuBLAS called directly (ctypes), usable inside a CUDA graph.

Why not ``cupy.matmul``: CuPy refuses every cuBLAS call while a stream is being captured
(``NotImplementedError: calling cuBLAS API during stream capture is currently unsupported``,
raised by its ``cublas.setStream``), although cuBLAS itself supports capture when its
workspace is set by the caller (cuBLAS documentation, "CUDA Graphs Support": with
``cublasSetWorkspace`` no memory is allocated inside the captured work). So a training step
with float products could never be captured as one graph through CuPy. This module opens
the cuBLAS library CuPy itself loaded, keeps its own handle with a fixed workspace, and
runs ``cublasSgemm_v2`` / ``cublasDgemm_v2`` on CuPy's current stream, in plain FP32/FP64
(``CUBLAS_DEFAULT_MATH``: no TF32).

``matmul(a, b)`` takes 2-D CuPy arrays of one float dtype (C- or F-contiguous; others are
copied first) and returns a new C-contiguous array. The row-major product C = A B is
computed as the column-major C^T = B^T A^T, each operand passed as stored with the
transpose flag its layout needs. Availability is checked once, by comparing with
``cupy.matmul`` on a small product; ``available()`` says why not when it is not.

``gemm_ex(a, b)`` is the same product on 16-bit inputs through ``cublasGemmEx``: bf16 (as
uint16 bit patterns, see ``kernels.bf16``) or float16, accumulated and returned in float32,
meant for the tensor cores. ``gemm_ex_available()`` says whether it works here (not yet run on a
GPU when this was written: ``tests/test_bf16_backward.py``'s GPU tests check it).
"""

import ctypes
import os

import numpy as np

__all__ = ["available", "matmul", "gemm_ex", "gemm_ex_available"]

_WORKSPACE_BYTES = 32 * 1024 * 1024  # cuBLAS recommends >= 32 MiB on Hopper
_OP_N, _OP_T = 0, 1
# cublasGemmEx's enums (library_types.h and cublas_api.h; the cuBLAS documentation,
# "cudaDataType_t", "cublasComputeType_t", "cublasGemmAlgo_t"): CUDA_R_32F = 0,
# CUDA_R_16F = 2, CUDA_R_16BF = 14, CUBLAS_COMPUTE_32F = 68, CUBLAS_GEMM_DEFAULT = -1
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F, _GEMM_DEFAULT = 68, -1
_EX_TYPES = {np.dtype(np.uint16): _CUDA_R_16BF, np.dtype(np.float16): _CUDA_R_16F}
_state = {}  # device id -> (handle, workspace array) ; "lib" -> CDLL ; "why" -> reason or None


def _loaded_cublas_path():
    """The path of the libcublas that CuPy loaded into this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "libcublas.so" in os.path.basename(path) and "Lt" not in os.path.basename(path):
                    return path
    except OSError:
        return None
    return None


def _lib():
    if "lib" in _state:
        return _state["lib"]
    import cupy
    cupy.cuda.device.get_cublas_handle()  # makes CuPy load libcublas
    path = _loaded_cublas_path()
    if path is None:
        raise OSError("libcublas is not loaded in this process (no /proc/self/maps entry)")
    lib = ctypes.CDLL(path)
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, sz]
    lib.cublasSetMathMode.argtypes = [vp, i]
    for name, scalar in (("cublasSgemm_v2", ctypes.c_float), ("cublasDgemm_v2", ctypes.c_double)):
        fn = getattr(lib, name)
        fn.argtypes = [vp, i, i, i, i, i, ctypes.POINTER(scalar), vp, i, vp, i,
                       ctypes.POINTER(scalar), vp, i]
        fn.restype = i
    # cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
    #     cublasOperation_t transb, int m, int n, int k, const void *alpha, const void *A,
    #     cudaDataType_t Atype, int lda, const void *B, cudaDataType_t Btype, int ldb,
    #     const void *beta, void *C, cudaDataType_t Ctype, int ldc,
    #     cublasComputeType_t computeType, cublasGemmAlgo_t algo)   (cuBLAS documentation)
    lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
    lib.cublasGemmEx.restype = i
    for name in ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2",
                 "cublasSetMathMode"):
        getattr(lib, name).restype = i
    _state["lib"] = lib
    return lib


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


def _handle():
    import cupy
    dev = cupy.cuda.Device().id
    if dev not in _state:
        lib = _lib()
        handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        _check(lib.cublasSetMathMode(handle, 0), "cublasSetMathMode")  # CUBLAS_DEFAULT_MATH
        workspace = cupy.empty(_WORKSPACE_BYTES, dtype=cupy.uint8)
        _check(lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(workspace.data.ptr),
                                         _WORKSPACE_BYTES), "cublasSetWorkspace")
        _state[dev] = (handle, workspace)
    return _state[dev][0]


def _operand(x):
    """(array, transpose flag, leading dimension) of a row-major (r, c) operand as cuBLAS
    sees its storage: C-contiguous storage is X^T column-major (ld c); F-contiguous is X."""
    import cupy
    r, c = x.shape
    if not x.flags.c_contiguous and not x.flags.f_contiguous:
        x = cupy.ascontiguousarray(x)
    if x.flags.c_contiguous:
        return x, _OP_N, max(1, c)
    return x, _OP_T, max(1, r)


def _on_stream(a, b):
    """(library, handle set to CuPy's current stream, B's operand, A's operand) for a
    product a @ b: cuBLAS is column-major, so it computes C^T = B^T A^T, B^T the left
    factor; each operand as :func:`_operand` gives it."""
    import cupy
    lib, handle = _lib(), _handle()
    _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)),
           "cublasSetStream")
    return lib, handle, _operand(b), _operand(a)


def matmul(a, b):
    """a (M, K) @ b (K, N) -> new C-contiguous (M, N), both 2-D CuPy float32 or float64."""
    import cupy
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype \
            or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"cupy_blas.matmul: expected 2-D (M, K) @ (K, N) of one float dtype, "
                         f"got {a.shape} {a.dtype} @ {b.shape} {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    out = cupy.empty((m, n), dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    lib, handle, (bs, opb, ldb), (as_, opa, lda) = _on_stream(a, b)
    scalar = ctypes.c_float if a.dtype == np.float32 else ctypes.c_double
    fn = lib.cublasSgemm_v2 if a.dtype == np.float32 else lib.cublasDgemm_v2
    one, zero = scalar(1.0), scalar(0.0)
    _check(fn(handle, opb, opa, n, m, k, ctypes.byref(one), ctypes.c_void_p(bs.data.ptr), ldb,
              ctypes.c_void_p(as_.data.ptr), lda, ctypes.byref(zero),
              ctypes.c_void_p(out.data.ptr), max(1, n)), "gemm")
    return out


def gemm_ex(a, b, out=None, beta=0.0):
    """a (M, K) @ b (K, N) in float32 from 16-bit inputs, through ``cublasGemmEx``.

    ``a`` and ``b``: 2-D CuPy arrays of one dtype, uint16 (bf16 bit patterns, CUDA_R_16BF)
    or float16 (CUDA_R_16F), C- or F-contiguous (others are copied first). The products are
    accumulated in float32 (CUBLAS_COMPUTE_32F with 16BF or 16F inputs, a 32F output and
    float scalars, one of the type combinations the cuBLAS documentation lists for GemmEx)
    by the default algorithm (CUBLAS_GEMM_DEFAULT) under the handle's default math mode,
    where cuBLAS is expected to pick tensor-core kernels for 16-bit inputs (the GPU
    benchmark rows say whether it pays). Returns ``beta * out + a @ b``
    written into ``out`` (float32 C-contiguous (M, N), given to accumulate into) or into a
    new array (``beta`` must then be 0). The same handle, stream and fixed workspace as
    :func:`matmul`, so a CUDA graph can capture it.

    Each 16-bit product is exact in float32, so the result is the float32 sum of exact
    products; its order (and, on the tensor cores, the rounding of partial sums) is cuBLAS's,
    so it is not bit-identical to ``matmul`` of the same values.
    """
    import cupy
    if (getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2
            or a.shape[1] != b.shape[0] or a.dtype != b.dtype or a.dtype not in _EX_TYPES):
        raise ValueError(f"cupy_blas.gemm_ex: expected 2-D (M, K) @ (K, N) of one dtype, uint16 "
                         f"(bf16 bits) or float16, got {getattr(a, 'shape', type(a).__name__)} "
                         f"{getattr(a, 'dtype', '')} @ {getattr(b, 'shape', type(b).__name__)} "
                         f"{getattr(b, 'dtype', '')}")
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        if beta != 0:
            raise ValueError(f"cupy_blas.gemm_ex: beta = {beta} needs an out array to "
                             "accumulate into")
        out = cupy.empty((m, n), dtype=np.float32)
    elif (out.shape != (m, n) or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"cupy_blas.gemm_ex: out must be C-contiguous float32 of shape "
                         f"{(m, n)}, got {out.shape} {out.dtype}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        if beta == 0:
            out.fill(0)
        else:
            out *= np.float32(beta)
        return out
    if getattr(cupy, "__fake__", False):  # the NumPy-backed stand-in (tools/fake_cupy)
        return cupy.fake_gemm_ex(a, b, out, beta)
    lib, handle, (bs, opb, ldb), (as_, opa, lda) = _on_stream(a, b)
    dtype = _EX_TYPES[a.dtype]
    one, b_ = ctypes.c_float(1.0), ctypes.c_float(beta)
    _check(lib.cublasGemmEx(handle, opb, opa, n, m, k, ctypes.byref(one),
                            ctypes.c_void_p(bs.data.ptr), dtype, ldb,
                            ctypes.c_void_p(as_.data.ptr), dtype, lda, ctypes.byref(b_),
                            ctypes.c_void_p(out.data.ptr), _CUDA_R_32F, max(1, n),
                            _COMPUTE_32F, _GEMM_DEFAULT), "cublasGemmEx")
    return out


def gemm_ex_available():
    """None if :func:`gemm_ex` works here (checked once: bf16 and float16 products of small
    integers, exact in every summation order, against NumPy), else the reason it does not."""
    if "why_ex" not in _state:
        try:
            import cupy
            from . import bf16
            rng = np.random.default_rng(1)
            a = rng.integers(-8, 9, (37, 53)).astype(np.float32)
            b = rng.integers(-1, 2, (53, 29)).astype(np.float32)
            want = a.astype(np.float64) @ b
            for x, y in ((bf16.round_bits(a), bf16.round_bits(b)),
                         (a.astype(np.float16), b.astype(np.float16))):
                for xd, yd in ((cupy.asarray(x), cupy.asarray(y)),
                               (cupy.asfortranarray(cupy.asarray(x)), cupy.asarray(y))):
                    got = gemm_ex(xd, yd).get()
                    if not np.array_equal(got, want):
                        raise RuntimeError(f"cublasGemmEx ({x.dtype}) differs from the exact "
                                           "product of small integers")
            _state["why_ex"] = None
        except Exception as exc:  # a missing symbol, a failed status, a wrong result
            _state["why_ex"] = f"cublasGemmEx unavailable: {type(exc).__name__}: {exc}"
    return _state["why_ex"]


def available():
    """None if :func:`matmul` works here (checked once against ``cupy.matmul`` on small
    products of every operand layout), else the reason it does not."""
    if "why" not in _state:
        try:
            import cupy
            rng = np.random.default_rng(0)
            for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-12)):
                a = cupy.asarray(rng.standard_normal((37, 53)).astype(dtype))
                b = cupy.asarray(rng.standard_normal((53, 29)).astype(dtype))
                for x, y in ((a, b), (cupy.asfortranarray(a), b), (a, cupy.asfortranarray(b)),
                             (a[:, ::2], b[::2]), (a[:1], b), (a, b[:, :1])):
                    want = cupy.matmul(x, y).get()
                    got = matmul(x, y).get()
                    if got.shape != want.shape or not np.allclose(got, want, rtol=tol, atol=tol):
                        raise RuntimeError(f"direct cuBLAS product differs from cupy.matmul "
                                           f"({dtype.__name__}, shapes {x.shape} @ {y.shape})")
            _state["why"] = None
        except Exception as exc:  # a missing symbol, a failed status, a wrong result
            _state["why"] = f"direct cuBLAS unavailable: {type(exc).__name__}: {exc}"
    return _state["why"]
