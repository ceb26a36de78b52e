"""The backend switch: ``numpy`` (readable reference), ``numba`` (fast CPU), ``cupy`` (GPU).

Pick one with the ``MINIBNN_BACKEND`` environment variable, ``set_backend(name)`` or
``with minibnn.backend.use("numba"): ...``. A backend that cannot run says why when it is
asked for; nothing ever falls back silently.

The backend decides two things: the array module that new tensors live in (NumPy for
``numpy`` and ``numba``, CuPy for ``cupy``) and which kernels compute the bit-packed
XNOR-popcount product. Ops never ask the backend for their array module: they use
``get_array_module(x)`` on their inputs, so one body serves NumPy and CuPy.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import numpy as np

NAMES = ("numpy", "numba", "cupy")

_active = None  # resolved lazily from MINIBNN_BACKEND on first use


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for but cannot run here; the message says why."""


def _probe(name):
    """Return None if backend ``name`` can run here, else the reason it cannot."""
    if name == "numpy":
        return None
    if name == "numba":
        try:
            from .kernels import numba_cpu  # noqa: F401  (compiles nothing until first call)
        except Exception as exc:  # ImportError, or numba failing to load LLVM
            return f"numba backend unavailable: {type(exc).__name__}: {exc}"
        return None
    if name == "cupy":
        from .kernels import cupy_gpu  # imports CuPy only inside available()

        ok, why = cupy_gpu.available()
        return None if ok else f"cupy backend unavailable: {why}"
    return f"unknown backend {name!r}; expected one of {', '.join(NAMES)}"


def available():
    """Map every backend name to None (usable) or the reason it cannot be used here."""
    return {name: _probe(name) for name in NAMES}


def _check(name):
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {name!r}")
    reason = _probe(name)
    if reason is not None:
        raise BackendUnavailable(reason)
    return name


def active():
    """Name of the backend in use (``MINIBNN_BACKEND`` if set, else ``numpy``)."""
    global _active
    if _active is None:
        _active = _check(os.environ.get("MINIBNN_BACKEND", "numpy").strip().lower() or "numpy")
    return _active


def set_backend(name):
    """Switch the backend for the whole process; raises ``BackendUnavailable`` with the reason."""
    global _active
    _active = _check(name)


@contextlib.contextmanager
def use(name):
    """Context manager: run the enclosed code on backend ``name``, then restore the previous one."""
    global _active
    previous = active()
    _active = _check(name)
    try:
        yield name
    finally:
        _active = previous


KERNEL_MODULES = {"numpy": "minibnn.kernels.reference", "numba": "minibnn.kernels.numba_cpu",
                  "cupy": "minibnn.kernels.cupy_gpu"}


def kernel_module(name=None):
    """The kernels of backend ``name`` (default: the active one): a module with
    ``pack_rows(x)`` and ``xnor_gemm(a_packed, b_packed, k)``."""
    return importlib.import_module(KERNEL_MODULES[_check(name) if name else active()])


def conv_kernels(name=None):
    """Compiled convolution glue of backend ``name`` (default: the active one), or None.

    The numba backend has :mod:`minibnn.kernels.numba_conv` (col2im, sign-patch
    packing, max pool), the cupy backend :mod:`minibnn.kernels.cupy_conv` (the same and
    im2col, as CUDA kernels): the same values as the NumPy code, bit for bit, each taking
    the arrays its ``accepts(x)`` says. On numpy the array code in ``functional`` and
    ``binary`` runs as written.
    """
    name = _check(name) if name else active()
    if name == "numba":
        from .kernels import numba_conv
        return numba_conv
    if name == "cupy":
        from .kernels import cupy_conv
        return cupy_conv
    return None


def synchronize():
    """Wait until the device has finished the work queued so far (a no-op on the CPU
    backends); for timing a GPU path with a host clock."""
    if active() == "cupy":
        import cupy
        cupy.cuda.get_current_stream().synchronize()


def xp():
    """The array module new tensors are created in: cupy for the cupy backend, else numpy."""
    return array_module()


def array_module(name=None):
    """The array module of backend ``name`` (default: the active one), checked to run here."""
    if (_check(name) if name else active()) == "cupy":
        import cupy
        return cupy
    return np


def is_cupy_array(x):
    """True for a CuPy ndarray (checked without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def get_array_module(*arrays):
    """cupy if any argument is a CuPy array, else numpy (chainer's idiom)."""
    for a in arrays:
        if is_cupy_array(a):
            import cupy
            return cupy
    return np


def asarray(x, dtype=None):
    """``x`` as an array of the active backend's module (moved to the GPU under cupy)."""
    return xp().asarray(x, dtype=dtype)


def to_numpy(x):
    """A NumPy array holding ``x`` (copied from the GPU when it is a CuPy array)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


_direct_blas = [os.environ.get("MINIBNN_CUPY_BLAS", "1").strip() not in ("0", "false", "no")]


def matmul(a, b):
    """``a @ b`` of raw arrays. On the GPU, 2-D float32/float64 products go through
    :mod:`minibnn.kernels.cupy_blas` (cuBLAS called directly, which a CUDA graph can capture,
    unlike ``cupy.matmul``) when it works here, so that eager and captured training steps
    compute the same floats; ``MINIBNN_CUPY_BLAS=0`` keeps ``cupy.matmul``."""
    if (_direct_blas[0] and is_cupy_array(a) and is_cupy_array(b) and a.ndim == 2
            and b.ndim == 2 and a.dtype == b.dtype and a.dtype in (np.float32, np.float64)):
        from .kernels import cupy_blas
        if cupy_blas.available() is None:
            return cupy_blas.matmul(a, b)
    return a @ b


# --- products with one operand exactly +-1 on the bf16 tensor cores (opt-in) ----------------
#
# In a binary layer's backward, g_x = g W_b and g_W = g^T x_b each have one operand that is
# exactly +-1 (or 0: zero padding in the conv patches), which bf16 holds exactly. Split the
# float32 operand in three bf16 parts (kernels.bf16: exact) and the product is one bf16
# GEMM over the parts, accumulated in float32: the float32 product up to the order of
# accumulation, meant for the tensor cores instead of FP32 cuBLAS. Not yet measured on a
# GPU, so off by default.

BF16_BACKWARD_MODES = ("off", "cupy", "all")


def _bf16_mode(value, what):
    v = str(value).strip().lower()
    v = {"0": "off", "false": "off", "no": "off", "": "off", "1": "cupy", "true": "cupy",
         "yes": "cupy"}.get(v, v)
    if v not in BF16_BACKWARD_MODES:
        raise ValueError(f"{what}: expected 0/1 or one of {', '.join(BF16_BACKWARD_MODES)}, "
                         f"got {value!r}")
    return v


_bf16_backward = [None]  # resolved from MINIBNN_CUPY_BF16_BACKWARD on first use


def bf16_backward():
    """Where binary layers' backward products run as split bf16 GEMMs
    (:func:`split_matmul_pm1`): "off" (default), "cupy" (on CuPy arrays, through cuBLAS
    GemmEx; ``MINIBNN_CUPY_BF16_BACKWARD=1``) or "all" (also on NumPy arrays, through the
    NumPy model ``kernels.bf16.split_matmul``: slower, there to test and read the path)."""
    if _bf16_backward[0] is None:
        _bf16_backward[0] = _bf16_mode(os.environ.get("MINIBNN_CUPY_BF16_BACKWARD", "0"),
                                       "MINIBNN_CUPY_BF16_BACKWARD")
    return _bf16_backward[0]


def set_bf16_backward(mode):
    """Set :func:`bf16_backward` ("off", "cupy", "all"; True = "cupy", False = "off");
    returns the previous setting."""
    previous = bf16_backward()
    if isinstance(mode, bool):
        mode = "cupy" if mode else "off"
    _bf16_backward[0] = _bf16_mode(mode, "set_bf16_backward")
    return previous


@contextlib.contextmanager
def using_bf16_backward(mode="cupy"):
    """Run the enclosed code with :func:`set_bf16_backward` ``(mode)``, then restore."""
    previous = set_bf16_backward(mode)
    try:
        yield
    finally:
        _bf16_backward[0] = previous


SPLIT_LAYOUTS = ("reduction", "output")


def split_layout(m, k, n, exact):
    """Where :func:`split_matmul_pm1` puts the three bf16 parts of its float operand for
    a (M, K) @ b (K, N), so that one GEMM does the work: "reduction" (along K, the +-1
    operand written three times in bf16: 6 bytes per +-1 entry) or "output" (along M or N,
    three (M, N) float32 blocks written and summed after: 24 bytes per output entry),
    whichever writes fewer bytes. A conv's g_x (small K, large output) takes "reduction",
    its g_W (K = N*Ho*Wo, small output) "output"."""
    pm1 = m * k if exact == "a" else k * n
    return "reduction" if 6 * pm1 <= 24 * m * n else "output"


def split_matmul_pm1(a, b, exact, layout=None):
    """a (M, K) @ b (K, N), float32, where operand ``exact`` ("a" or "b") holds only values
    that bf16 holds exactly (+-1, 0; nothing checks), or is given as their bf16 bit patterns
    (uint16, e.g. ``cupy_conv.im2col(..., bf16=True)``): the other operand split in three bf16
    parts (``kernels.bf16.split``, exact for 2**-110 <= |x| < 3.39e38) and the three bf16
    products summed in float32. It equals the float32 product up to the order of float32
    accumulation: |result - exact| <= (K + 2) u sum_k |a_ik b_kj| with u = 2**-24 (not
    bit-identical to Sgemm).

    On CuPy arrays, one ``cupy_blas.gemm_ex`` (bf16 inputs, float32 accumulation) with the
    parts laid out by ``layout`` (default :func:`split_layout`): "reduction",
    [f0 | f1 | f2] against the +-1 operand stacked three times, one K' = 3K product; or
    "output", the parts stacked along the free axis, a (3M, N) or (M, 3N) product whose
    three blocks are then summed, (P0 + P1) + P2. The split, the bf16 copies and the sum are
    one fused launch each (``cupy_fused``); all of it can be captured in a CUDA graph. On
    NumPy arrays: the NumPy model ``kernels.bf16.split_matmul``."""
    from .kernels import bf16
    bf16.check_split_operands(a, b, exact)
    if layout is not None and layout not in SPLIT_LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(SPLIT_LAYOUTS)} or None, "
                         f"got {layout!r}")
    if not (is_cupy_array(a) and is_cupy_array(b)):
        return bf16.split_matmul(a, b, exact)
    import cupy
    from .kernels import cupy_blas, cupy_fused
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or k == 0 or n == 0:
        return cupy.zeros((m, n), dtype=np.float32)
    layout = layout or split_layout(m, k, n, exact)
    s = a if exact == "a" else b  # the exact operand, given as float32 or as bf16 bits

    def bits(x3_axis=None):  # s as bf16 bits, written three times along x3_axis if given
        if s.dtype == np.uint16:
            return s if x3_axis is None else cupy.concatenate([s] * 3, axis=x3_axis)
        return cupy_fused.to_bf16(s) if x3_axis is None else cupy_fused.to_bf16_x3(s, x3_axis)

    if layout == "reduction":
        if exact == "a":  # [s | s | s] (M, 3K) @ [f0; f1; f2] (3K, N)
            return cupy_blas.gemm_ex(bits(1), cupy_fused.split_bf16(b).reshape(3 * k, n))
        # [f0 | f1 | f2] (M, 3K), read as the transpose of the parts of a^T, @ [s; s; s]
        return cupy_blas.gemm_ex(cupy_fused.split_bf16(a.T).reshape(3 * k, m).T, bits(0))
    if exact == "b":  # [f0; f1; f2] (3M, K) @ s (K, N) -> three (M, N) blocks of rows
        c = cupy_blas.gemm_ex(cupy_fused.split_bf16(a).reshape(3 * m, k), bits())
        return cupy_fused.sum3(c[:m], c[m:2 * m], c[2 * m:])
    # s (M, K) @ [f0 | f1 | f2] (K, 3N) -> three (M, N) blocks of columns
    c = cupy_blas.gemm_ex(bits(), cupy_fused.split_bf16(b.T).reshape(3 * n, k).T)
    return cupy_fused.sum3(c[:, :n], c[:, n:2 * n], c[:, 2 * n:])


def _bf16_bits_as_float32(a, b, exact):
    """(a, b) with the exact operand, when given as bfloat16 bit patterns (uint16, e.g.
    ``cupy_conv.im2col(..., bf16=True)``), turned into its float32 values (exact); the
    float operand is never changed."""
    from .kernels import bf16
    s = a if exact == "a" else b
    if getattr(s, "dtype", None) != np.uint16:
        return a, b
    f = bf16.to_float32(s)
    return (f, b) if exact == "a" else (a, f)


def matmul_pm1(a, b, exact):
    """``a @ b`` of raw arrays where operand ``exact`` ("a" or "b") is known to hold only
    +-1 and 0 (a binary layer's backward), float32 or given as its bf16 bit patterns
    (uint16): :func:`split_matmul_pm1` when :func:`bf16_backward` covers these arrays (and,
    on CuPy, GemmEx works here), else :func:`matmul` (of the bits' float32 values)."""
    mode = bf16_backward()
    # the exact operand and the float one (None, None for a wrong ``exact``: plain matmul)
    s, f = {"a": (a, b), "b": (b, a)}.get(exact, (None, None))
    if (mode != "off" and s is not None and a.ndim == 2 and b.ndim == 2
            and f.dtype == np.float32 and s.dtype in (np.float32, np.uint16)):
        if is_cupy_array(a) and is_cupy_array(b):
            from .kernels import cupy_blas
            why = ("MINIBNN_CUPY_BLAS=0 turns direct cuBLAS off" if not _direct_blas[0]
                   else cupy_blas.gemm_ex_available())
            if why is not None:
                raise BackendUnavailable(f"bf16 backward (MINIBNN_CUPY_BF16_BACKWARD / "
                                         f"set_bf16_backward) is on but cannot run: {why}")
            return split_matmul_pm1(a, b, exact)
        elif mode == "all" and not is_cupy_array(a) and not is_cupy_array(b):
            return split_matmul_pm1(a, b, exact)
    if s is not None and s.dtype == np.uint16:  # bf16 bits, but no split product here
        a, b = _bf16_bits_as_float32(a, b, exact)
    return matmul(a, b)


def scatter_add(out, index, values):
    """``out[index] += values`` where repeated indices accumulate (``np.add.at``; on the GPU
    ``cupyx.scatter_add``)."""
    if is_cupy_array(out):
        import cupyx
        cupyx.scatter_add(out, index, values)
    else:
        np.add.at(out, index, values)
    return out


# --- what minibnn.distributed needs from CuPy (the only module allowed to import it) ----------

def nccl():
    """``cupy.cuda.nccl``: NCCL through CuPy, for ``minibnn.distributed`` between GPUs.
    Raises ``BackendUnavailable`` saying why when CuPy, a GPU or NCCL is missing."""
    reason = _probe("cupy")
    if reason is not None:
        raise BackendUnavailable(f"NCCL needs the cupy backend: {reason}")
    try:
        from cupy.cuda import nccl as module
    except ImportError as exc:
        raise BackendUnavailable(f"NCCL unavailable in CuPy: {exc}; install the NCCL "
                                 "library (e.g. pip install nvidia-nccl-cu12)") from exc
    if not getattr(module, "available", True):
        raise BackendUnavailable("NCCL unavailable: CuPy was built without NCCL support; "
                                 "install the NCCL library (e.g. pip install nvidia-nccl-cu12)")
    return module


def select_gpu(index):
    """Make GPU ``index % number of GPUs`` CuPy's current device (one rank per GPU);
    returns the device number."""
    import cupy
    device = int(index) % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device


def cuda_stream_ptr():
    """The raw handle of CuPy's current stream (NCCL collectives run on it)."""
    return current_stream().ptr


def pinned_empty(shape, dtype):
    """A NumPy array in page-locked host memory (``cupyx.empty_pinned``): the GPU copies from
    it by DMA, asynchronously to the host (from ordinary, pageable memory a copy is staged
    through page-locked memory first, by the driver or by CuPy)."""
    import cupyx
    return cupyx.empty_pinned(shape, dtype)


def current_stream():
    """CuPy's current stream."""
    import cupy
    return cupy.cuda.get_current_stream()


def stream_waits_for(stream, other):
    """Make the work queued on ``stream`` from now on wait for the work queued on ``other``
    so far (an event recorded on ``other``; the host does not wait)."""
    stream.wait_event(other.record())


# --- what minibnn.graphs needs from CuPy ------------------------------------------------------

def capture_stream():
    """A new CUDA stream for capturing and replaying graphs, blocking (ordered with the
    default stream, so work queued there before or after a replay stays in order)."""
    import cupy
    return cupy.cuda.Stream(non_blocking=False)


def capture_graph(stream, fn):
    """Run ``fn()`` with ``stream`` capturing (relaxed mode, which lets CuPy's memory pool
    allocate) and every allocation from a new memory pool of the graph's own, which nothing
    outside the graph uses. Returns (graph, pool, fn's result, None), or (None, None, None,
    the first error): then nothing ran on the GPU and the capture is closed."""
    import cupy
    pool = cupy.cuda.MemoryPool()
    stream.synchronize()
    relaxed = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", 2)
    graph = result = error = None
    with stream, cupy.cuda.using_allocator(pool.malloc):
        try:
            stream.begin_capture(mode=relaxed)
        except Exception as exc:  # noqa: BLE001  (no capture began: nothing to end)
            return None, None, None, exc
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001  (returned: the caller runs the step eagerly)
            error = exc
        finally:
            try:
                graph = stream.end_capture()
            except Exception as exc:  # noqa: BLE001
                error = error or exc
    if error is not None:
        return None, None, None, error
    return graph, pool, result, None

