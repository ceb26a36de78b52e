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
"""

import ctypes
import os

import numpy as np

__all__ = ["available", "matmul"]

_WORKSPACE_BYTES = 32 * 1024 * 1024  # cuBLAS recommends >= 32 MiB on Hopper
_OP_N, _OP_T = 0, 1
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
    lib, handle = _lib(), _handle()
    _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)),
           "cublasSetStream")
    bs, opb, ldb = _operand(b)  # B^T as the left factor of C^T = B^T A^T
    as_, opa, lda = _operand(a)
    scalar = ctypes.c_float if a.dtype == np.float32 else ctypes.c_double
    fn = lib.cublasSgemm_v2 if a.dtype == np.float32 else lib.cublasDgemm_v2
    one, zero = scalar(1.0), scalar(0.0)
    _check(fn(handle, opb, opa, n, m, k, ctypes.byref(one), ctypes.c_void_p(bs.data.ptr), ldb,
              ctypes.c_void_p(as_.data.ptr), lda, ctypes.byref(zero),
              ctypes.c_void_p(out.data.ptr), max(1, n)), "gemm")
    return out


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
