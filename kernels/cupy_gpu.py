"""CuPy backend: bit packing and XNOR GEMM as NVRTC-compiled CUDA kernels.

Same conventions and results as :mod:`minibnn.kernels.reference`. Two GEMM kernels
(sources ``xnor_gemm.cu``, ``xnor_gemm_tc.cu`` and ``xnor_gemm_wgmma.cu`` next to this
module):

* ``"cuda"``: CUDA-core XNOR-popcount, ``k - 2 * popcount(a ^ b)``, 128 x 128 block
  tiles with 8 x 8 outputs per thread; runs on any CUDA GPU.
* ``"tensorcore"``: ``mma.sync.m16n8k256 .b1 .and.popc`` (compute capability >= 8.0,
  chosen automatically there), with ``a . b = k - 2 pa - 2 pb + 4 popcount(a & b)``
  where pa, pb are the row popcounts. It runs in one of three forms, which can also be
  named: ``"tensorcore_tiled"`` (128 x 128 block tiles) takes operands padded to its tiles
  (a zero-padded copy where they are not) and their row popcounts (a launch per operand);
  ``"tensorcore_tiled256"`` is the same with 256 x 128 tiles (fewer loads per product,
  one block per SM); ``"tensorcore_direct"`` (128 x 128) reads the operands as they are
  (loads past the edges are zero-filled) and counts the popcounts itself, so a product is
  one launch. Each has an ``"_ldm"`` twin (``"tensorcore_direct_ldm"``,
  ``"tensorcore_tiled_ldm"``, ``"tensorcore_tiled256_ldm"``) that loads the mma's
  fragments with ``ldmatrix`` in the order the mma takes them, where the others load 64-bit
  words and move their halves into place (83 moves per 32 mma in ptxas's sm_90 code of the
  tiled form, 4 in its twin's: ``tools/sass_mainloop.py``). On compute capability 9.0
  (H100, H200) two more tiled forms use Hopper's warpgroup MMA
  (``wgmma.mma_async.m64nNk256 .b1``, source ``xnor_gemm_wgmma.cu``, compiled for sm_90a):
  ``"tensorcore_wgmma"`` (128 x 256 block tiles) and ``"tensorcore_wgmma128"`` (128 x
  128), whose tensor cores read both operands from shared memory, one instruction per
  64 x N x 256 product. Plain ``"tensorcore"`` runs
  the fastest of them for the product's shape class (six forms where a block may have 144
  KiB of shared memory, as on H100, and the two wgmma forms there; four where it may have 99
  KiB), timed on the GPU at hand by the first product of that class
  (``MINIBNN_TC_FORM`` forces one; ``MINIBNN_GPU_AUTOTUNE=0``, or a product first met
  while a CUDA graph is being captured, takes the direct form up to ``DIRECT_MAX_ROWS``
  rows of A, where the tiled forms' extra launches cost more than the product, and the
  128 x 128 tiled form above). Forms that have not yet run on any GPU
  (:data:`UNPROVEN_FORMS`: the ``_ldm`` twins, the wgmma forms) are listed only when
  ``MINIBNN_TC_EXCLUDE`` is set (empty: every form; see :func:`excluded_forms`).

Each kernel also has a ``_threshold`` form, :func:`gemm_threshold`: a frozen layer's
sign(BN(z)) compared and packed in the GEMM's epilogue, so the int32 products are never
written. :func:`prepare_weights` keeps a right operand that many products share in the
tensor-core kernel's padded form with its row popcounts.

CuPy is imported on first use, so ``import minibnn.kernels.cupy_gpu`` works without it; the
functions then raise ImportError saying why. Operands are validated before any
launch; kernels compile lazily, once per device.
"""

import os
from collections import namedtuple
from types import MappingProxyType

import numpy as np

from .cuda_sources import EXACT_ARCH, SOURCES, module_source
from .reference import (PLANES, check_bitplane_operands, check_gemm_operands, check_pack_input,
                        check_pixels, check_threshold_operands, check_threshold_table, n_words)

__all__ = ["available", "pack_rows", "nan_seen", "xnor_gemm", "gemm_threshold", "pack_bitplanes",
           "bitplane_gemm", "pack_threshold", "default_kernel", "available_kernels",
           "excluded_forms", "UNPROVEN_FORMS", "PreparedWeights", "prepare_weights"]

_THREADS = 256
_TILE = 128  # block tile of both GEMM kernels (rows of A and rows of B)
_TC_BKW = 8  # u64 words of K per tensor-core pipeline stage (TC_BKW in the .cu)
_TC_SMEM_BYTES = 3 * (128 + 128) * 12 * 8  # TC_SMEM_BYTES in xnor_gemm_tc.cu
_TC_DIRECT_SMEM_BYTES = _TC_SMEM_BYTES + (128 + 128) * 4  # TC_DIRECT_SMEM_BYTES there
_TC256_ROWS = 256  # TC256_BM: rows of A per block of xnor_gemm_tc256 (its B tile is 128)
_TC256_SMEM_BYTES = 4 * (256 + 128) * 12 * 8  # TC256_SMEM_BYTES there
_TCL_SMEM_BYTES = 4 * (128 + 128) * 10 * 8  # TCL_SMEM_BYTES there (the ldmatrix forms)
_TCL_DIRECT_SMEM_BYTES = _TCL_SMEM_BYTES + (128 + 128) * 4  # TCL_DIRECT_SMEM_BYTES there
_TCL256_SMEM_BYTES = 4 * (256 + 128) * 10 * 8  # TCL256_SMEM_BYTES there
_WG_SOURCE = "xnor_gemm_wgmma.cu"  # the warpgroup-MMA forms (compute capability 9.0 only)


def _wg_smem_bytes(cols):
    """WG_SMEM_BYTES(BN) of xnor_gemm_wgmma.cu: 6 stages of 4 k-chunks of the 128-row A tile
    and the ``cols``-row B tile, each chunk column 16 bytes a row + 32."""
    return 6 * 4 * ((128 * 16 + 32) + (cols * 16 + 32))


#: Rows of A up to which plain ``"tensorcore"`` runs the direct form when it does not time
#: the forms (see ``_tensorcore_form``). A guess, not yet measured on a GPU:
#: ``benchmarks/bench_gemm.py`` times every form at each shape.
DIRECT_MAX_ROWS = 1024
#: A tensor-core form: its entry name, dynamic shared memory bytes, rows of A and of B per
#: block, whether it is direct (unpadded operands), and its source.
_Form = namedtuple("_Form", "entry smem rows cols direct source",
                   defaults=(_TILE, False, "xnor_gemm_tc.cu"))
#: The tensor-core forms. The "_ldm" ones load fragments with ldmatrix (see xnor_gemm_tc.cu);
#: the "_wgmma" ones (compute capability 9.0 alone) are warpgroup MMAs reading both operands
#: from shared memory (see xnor_gemm_wgmma.cu); the untimed rule of ``_tensorcore_form``
#: uses the first two.
_TC_SPECS = MappingProxyType({  # read-only: a table, not one of the module's caches
    "tensorcore_direct": _Form("xnor_gemm_tc_direct", _TC_DIRECT_SMEM_BYTES, _TILE, direct=True),
    "tensorcore_tiled": _Form("xnor_gemm_tc", _TC_SMEM_BYTES, _TILE),
    "tensorcore_tiled256": _Form("xnor_gemm_tc256", _TC256_SMEM_BYTES, _TC256_ROWS),
    "tensorcore_direct_ldm": _Form("xnor_gemm_tcl_direct", _TCL_DIRECT_SMEM_BYTES, _TILE,
                                   direct=True),
    "tensorcore_tiled_ldm": _Form("xnor_gemm_tcl", _TCL_SMEM_BYTES, _TILE),
    "tensorcore_tiled256_ldm": _Form("xnor_gemm_tcl256", _TCL256_SMEM_BYTES, _TC256_ROWS),
    "tensorcore_wgmma": _Form("xnor_gemm_wg", _wg_smem_bytes(256), _TILE, 256,
                              source=_WG_SOURCE),
    "tensorcore_wgmma128": _Form("xnor_gemm_wg128", _wg_smem_bytes(128), _TILE, 128,
                                 source=_WG_SOURCE),
})
_TC_FORMS = tuple(_TC_SPECS)
_INT32_MAX = 2**31 - 1
_MAX_ROWS = 65535 * _TILE  # rows of A one GEMM launch can cover (grid y-dimension limit)

_cupy = None
_modules = {}  # (device id, source name) -> cupy.RawModule
_kernels = {}  # device id -> available_kernels()
_functions = {}  # (device id, source name, kernel name) -> cupy Function
_unbuilt = {}  # (device id, source name) -> the CompileException NVRTC raised building it
_shared_set = set()  # (device id, kernel name) allowed their dynamic shared memory
_form_choice = {}  # (device id, shape class) -> the tensor-core form "tensorcore" runs
#: (device id, M, N and W bit lengths) -> {tensor-core form: best seconds}, as timed by the
#: first "tensorcore" product of that shape class (see ``_tensorcore_form``)
form_timings = {}
#: (device id, M, N and W bit lengths) -> the tensor-core forms whose product differed from
#: the direct form's when that class was timed, or that could not be compiled (never chosen
#: for it; none should ever be)
form_disagreements = {}


def _cp():
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except Exception as exc:  # ImportError, or a broken CUDA install raising on import
            raise ImportError(
                f"CuPy could not be imported ({type(exc).__name__}: {exc}); install it with "
                "`pip install minibnn[gpu]`"
            ) from exc
        _cupy = cupy
    return _cupy


def available():
    """(True, "") if CuPy imports and sees a CUDA GPU, else (False, the reason).

    The one availability check of the GPU path: ``minibnn.backend`` reports this reason.
    """
    try:
        cp = _cp()
    except ImportError as exc:
        return False, str(exc)
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy found no usable CUDA GPU: {exc}"
    if count < 1:
        return False, "CuPy found no CUDA GPU"
    return True, ""


def _capability():
    return int(_cp().cuda.Device().compute_capability)


def _device():
    """The current device's id (CUDA's cudaGetDevice: cheaper than a Device object, and
    every product asks it a few times)."""
    return _cp().cuda.runtime.getDevice()


def _nvrtc_refused(exc):
    """Whether ``exc`` is NVRTC refusing a module (CuPy's ``CompileException``, matched by
    name: CuPy need not be importable where this is asked): nothing was launched, so the
    CUDA context is intact."""
    return type(exc).__name__ == "CompileException"


def _function(source, name):
    """The kernel ``name`` of ``source`` on the current device, compiled once and kept (a
    product calls this on every launch). A module NVRTC refuses (CuPy's
    ``CompileException``: say, an NVRTC without the wgmma source's sm_90a) is not compiled
    again on that device: later calls raise the same exception at once, where CuPy would
    compile it anew (seconds) for every shape class the autotune meets."""
    cp = _cp()
    device = _device()
    fn = _functions.get((device, source, name))
    if fn is None:
        refused = _unbuilt.get((device, source))
        if refused is not None:
            raise refused
        mod = _modules.get((device, source))
        if mod is None:
            options = ("--std=c++14",)
            if source in EXACT_ARCH:  # (CuPy adds the device's own -arch; NVRTC keeps this one)
                options += (f"-arch=sm_{EXACT_ARCH[source]}",)
            mod = cp.RawModule(code=module_source(source), options=options)
            _modules[(device, source)] = mod
        try:
            fn = mod.get_function(name)  # (CuPy compiles the module on its first function)
        except Exception as exc:
            if _nvrtc_refused(exc):
                _unbuilt[(device, source)] = exc
            raise
        _functions[(device, source, name)] = fn
    return fn


def _max_shared_per_block():
    """Bytes of dynamic shared memory one block may opt in to on the current GPU (CUDA's
    cudaDevAttrMaxSharedMemoryPerBlockOptin, 97: 227 KiB on H100, 163 KiB on A100, 99 KiB
    on compute capability 8.6 / 8.9)."""
    cp = _cp()
    rt = cp.cuda.runtime
    return int(rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97),
                                     _device()))


#: The tensor-core forms not yet run on any GPU (written and checked on the CPU emulator and
#: by NVRTC and ptxas only: the ldmatrix twins and the wgmma forms). They are left out of
#: :func:`available_kernels` while ``MINIBNN_TC_EXCLUDE`` is unset, so a kernel new to the
#: hardware cannot end a user's run; ``MINIBNN_TC_EXCLUDE=`` (set, empty) takes every form,
#: as ``benchmarks/check_forms.py`` and the ``gemm`` phase of ``gpu_check.sh`` do. A form
#: leaves this set once a GPU run has checked it.
UNPROVEN_FORMS = frozenset({"tensorcore_direct_ldm", "tensorcore_tiled_ldm",
                            "tensorcore_tiled256_ldm", "tensorcore_wgmma",
                            "tensorcore_wgmma128"})


def excluded_forms():
    """The tensor-core forms that ``MINIBNN_TC_EXCLUDE`` (comma-separated names) leaves out
    of :func:`available_kernels`, so that neither a caller nor plain ``"tensorcore"``'s
    autotune runs them; :data:`UNPROVEN_FORMS` while it is unset (an empty value excludes
    none). The autotune already drops a form whose product differs from the direct form's;
    this is for one that fails outright on a GPU new to it (a launch error spoils the whole
    CUDA context, so the process cannot try the next form). ``benchmarks/check_forms.py``
    finds such forms, each in a process of its own."""
    value = os.environ.get("MINIBNN_TC_EXCLUDE")
    if value is None:
        return UNPROVEN_FORMS
    names = {s.strip() for s in value.split(",")}
    names.discard("")
    unknown = names - set(_TC_FORMS)
    if unknown:
        raise ValueError(f"MINIBNN_TC_EXCLUDE: {sorted(unknown)} are not tensor-core forms; "
                         f"expected names from {_TC_FORMS}")
    return frozenset(names)


def available_kernels():
    """GEMM kernels the current GPU can run, the default first: ``("tensorcore",
    "tensorcore_direct", "tensorcore_tiled", "tensorcore_tiled256", "tensorcore_direct_ldm",
    "tensorcore_tiled_ldm", "tensorcore_tiled256_ldm", "cuda")`` on compute capability >=
    8.0, with ``"tensorcore_wgmma", "tensorcore_wgmma128"`` before ``"cuda"`` on 9.0 (H100,
    H200) (the first runs the fastest of the next ones for the product's shape class, timed
    on first use; each form only where a block may have its shared memory: the 256-row ones
    need 144 and 120 KiB, the wgmma ones 146 and 98 KiB; none that :func:`excluded_forms`
    names), else ``("cuda",)``."""
    device = _device()
    names = _kernels.get(device)
    if names is None:  # asked once per device: every product checks its kernel name
        forms = ()
        cc = _capability()
        if cc >= 80:
            room, excluded = _max_shared_per_block(), excluded_forms()
            forms = tuple(f for f in _TC_FORMS if _TC_SPECS[f].smem <= room
                          and f not in excluded
                          and (_TC_SPECS[f].source not in EXACT_ARCH
                               or cc == SOURCES[_TC_SPECS[f].source]))
        names = (("tensorcore",) + forms if forms else ()) + ("cuda",)
        _kernels[device] = names
    return names


def default_kernel():
    """The kernel :func:`xnor_gemm` uses when none is named."""
    return available_kernels()[0]


def _blocks(n_threads):
    return (int((n_threads + _THREADS - 1) // _THREADS),)


def pack_rows(x, check_nan=True):
    """Binarize and pack ``x`` (..., K) on the GPU into uint64 words (..., ceil(K/64)).

    bit = (x >= 0) (sign(0) = +1), bool True -> 1, LSB first, padding 0; returns a
    CuPy array. float32/float64/bool are read in place with their strides (slices,
    transposes); other integer and float dtypes go through ``x >= 0`` first. With
    ``check_nan=True`` a NaN raises ValueError (this reads one flag back from the device,
    which waits for the GPU); with ``check_nan="defer"`` a NaN only sets a flag on the device
    that :func:`nan_seen` reads later, so a training step needs no host synchronisation.
    """
    cp = _cp()
    x = check_pack_input(cp.asarray(x))
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k) if x.ndim != 2 else x
    rows, words = x2.shape[0], n_words(k)
    out = cp.empty((rows, words), dtype=cp.uint64)
    if rows and words:
        if x2.dtype == cp.float32:
            fn = "pack_rows_f32"
        elif x2.dtype == cp.float64:
            fn = "pack_rows_f64"
        else:
            fn = "pack_rows_bool"
            if x2.dtype != cp.bool_:
                if x2.dtype.kind == "f":
                    x2 = x2.astype(cp.float32)
                    fn = "pack_rows_f32"
                else:
                    x2 = x2 >= 0
        item = x2.dtype.itemsize
        flag = _deferred_flag() if check_nan == "defer" else cp.zeros(1, dtype=cp.int32)
        _function("xnor_gemm.cu", fn)(
            _blocks(rows * words * 32), (_THREADS,),
            (x2, np.int64(rows), np.int64(k), np.int64(x2.strides[0] // item),
             np.int64(x2.strides[1] // item), out, np.int64(words), flag))
        if check_nan is True and fn != "pack_rows_bool" and int(flag[0]):
            raise ValueError(
                f"x: cannot binarize NaN (it has no sign); input has shape {tuple(x.shape)} "
                f"and dtype {x.dtype}")
    return out.reshape(lead + (words,))


_deferred_flags = {}  # device id -> int32 flag set by pack_rows(check_nan="defer")


def _deferred_flag():
    cp = _cp()
    key = _device()
    if key not in _deferred_flags:
        _deferred_flags[key] = cp.zeros(1, dtype=cp.int32)
    return _deferred_flags[key]


def nan_seen(reset=True):
    """True if a ``pack_rows(..., check_nan="defer")`` on this device met a NaN since the
    flag was last reset (reads one int back from the device); ``reset`` clears the flag."""
    flag = _deferred_flag()
    seen = bool(int(flag[0]))
    if reset and seen:
        flag.fill(0)
    return seen


def _padded(x, rows, words):
    """x as a C-contiguous, 16-byte aligned (rows, words) array, zero padded if needed."""
    cp = _cp()
    if x.shape == (rows, words) and x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    out = cp.zeros((rows, words), dtype=cp.uint64)
    out[: x.shape[0], : x.shape[1]] = x
    return out


class PreparedWeights:
    """A right operand that many products reuse (a frozen net's weights), kept on the GPU:
    the packed rows ``rows`` (CuPy uint64 (N, W), a copy made once, which the direct
    tensor-core form and the CUDA-core kernel read as they are) and, made on first use by
    the tiled tensor-core form and kept, that form's operand (rows and words zero-padded to
    its tiles, and the row popcounts of the AND identity), which :func:`xnor_gemm` would
    otherwise make from B in every call. :func:`xnor_gemm` and :func:`gemm_threshold` take it
    in place of ``b``; results are the same, bit for bit. Make it with
    :func:`prepare_weights`."""

    def __init__(self, rows):
        self.rows = rows
        self._tc = None

    @property
    def shape(self):
        return self.rows.shape

    def tensorcore_form(self):
        """(padded rows, int32 row popcounts) as the tiled ``xnor_gemm_tc*`` entries read
        them (made once; both tiles take B in 128-row blocks)."""
        if self._tc is None:
            if _capturing():
                # made inside a CUDA graph capture, the operand would be written only when
                # the graph replays and would live in the graph's memory pool: made for
                # this product alone (inside the graph), and kept by a later eager product
                return _tc_operand(self.rows)
            self._tc = _tc_operand(self.rows)
        return self._tc

    def __repr__(self):
        return (f"PreparedWeights({self.rows.shape[0]} rows x {self.rows.shape[1]} words on "
                f"the GPU, tensor-core form {'made' if self._tc is not None else 'not made yet'})")


def prepare_weights(b):
    """``b`` (N, W) packed rows (NumPy or CuPy) as a :class:`PreparedWeights` on the current
    GPU, for repeated products with it as the right operand (one is returned as it is).
    The rows are copied, so later changes to ``b`` do not reach it."""
    if isinstance(b, PreparedWeights):
        return b
    if not hasattr(b, "dtype") or b.ndim != 2 or b.dtype != np.uint64:
        raise ValueError("b: expected a 2-D uint64 array (N, W) of packed rows, got "
                         f"{getattr(b, 'dtype', type(b).__name__)} of shape "
                         f"{getattr(b, 'shape', None)}")
    cp = _cp()
    return PreparedWeights(cp.array(b, dtype=cp.uint64, order="C", copy=True))


def _tc_operand(x, tile=_TILE):
    """Packed rows (R, W) as the tiled tensor-core entries read them: rows padded to a
    multiple of the ``tile``, words to a multiple of 8, zeros in the pads, and int32 row
    popcounts."""
    cp = _cp()
    r, w = x.shape
    wp = (w + _TC_BKW - 1) // _TC_BKW * _TC_BKW
    xp = _padded(x, (r + tile - 1) // tile * tile, wp)
    pop = cp.empty(r, dtype=cp.int32)
    if r:
        _function("xnor_gemm.cu", "row_popcount")(
            _blocks(r * 32), (_THREADS,), (xp, np.int32(r), np.int32(wp), pop))
    return xp, pop


def _gemm_operands(a, b, k, kernel):
    """Checked operands of a GEMM launch: (a, b rows, the PreparedWeights or None, k, kernel)."""
    prepared = b if isinstance(b, PreparedWeights) else None
    rows = b.rows if prepared is not None else b
    k = check_gemm_operands(a, rows, k, check_padding=False)
    m, w = a.shape
    n = rows.shape[0]
    if max(m, n, w, k) > _INT32_MAX:
        raise ValueError(f"a, b: sizes M={m}, N={n}, W={w}, k={k} exceed the int32 kernel limits")
    if m > _MAX_ROWS:
        raise ValueError(f"a: M={m} rows exceed the launch grid limit of {_MAX_ROWS}")
    kernels = available_kernels()
    kernel = kernels[0] if kernel is None else kernel
    if kernel not in kernels:
        raise ValueError(f"kernel: expected one of {kernels} on this GPU, got {kernel!r}")
    return a, rows, prepared, k, kernel


def _launch(a, rows, prepared, k, kernel, tail, threshold_args=None):
    """Launch the ``kernel`` GEMM of packed ``a`` and ``rows`` (M, N, W all > 0); ``tail`` is
    the output argument(s) of the plain kernel, or of the ``_threshold`` kernel when
    ``threshold_args`` (thr, periods) is given."""
    cp = _cp()
    m, w = a.shape
    n = rows.shape[0]
    if kernel == "tensorcore":
        kernel, done = _tensorcore_form(m, n, w, lambda form: _launch(
            a, rows, prepared, k, form, tail, threshold_args), tail[0])
        if done:  # timed: the forms' launches already wrote the (same) result
            return
    form = _TC_SPECS.get(kernel, _Form(None, 0, _TILE))
    entry, smem, row_tile, direct = form.entry, form.smem, form.rows, form.direct
    grid = ((n + form.cols - 1) // form.cols, (m + row_tile - 1) // row_tile)
    sizes = (np.int32(m), np.int32(n))
    suffix = "" if threshold_args is None else "_threshold"
    lead = () if threshold_args is None else threshold_args
    if kernel == "cuda":
        _function("xnor_gemm.cu", "xnor_gemm_cuda_core" + suffix)(
            grid, (_THREADS,), (cp.ascontiguousarray(a), cp.ascontiguousarray(rows), *lead,
                                *tail, *sizes, np.int32(w), np.int32(k)))
        return
    if direct:
        a, rows = cp.ascontiguousarray(a), cp.ascontiguousarray(rows)
        # 16-byte copies where every row starts on a 16-byte boundary, else 8-byte ones
        wide = w % 2 == 0 and a.data.ptr % 16 == 0 and rows.data.ptr % 16 == 0
        fn = _tc_function(entry + suffix, smem)
        fn(grid, (_THREADS,), (a, rows, *lead, *tail, *sizes, np.int32(w), np.int32(wide),
                               np.int32(k)), shared_mem=smem)
        return
    ap, pop_a = _tc_operand(cp.asarray(a), row_tile)
    bp, pop_b = prepared.tensorcore_form() if prepared is not None else _tc_operand(rows)
    fn = _tc_function(entry + suffix, smem, form.source)
    # the wgmma entries also take B's padded rows (a multiple of 128, zero-filled past it up
    # to their 256-row tiles)
    rows_b = (np.int32(bp.shape[0]),) if form.source == _WG_SOURCE else ()
    fn(grid, (_THREADS,),
       (ap, bp, pop_a, pop_b, *lead, *tail, *sizes, np.int32(ap.shape[1]), *rows_b, np.int32(k)),
       shared_mem=smem)


def _shape_class(m, n, w):
    """The autotune's shape class of a product: the bit lengths of M, N and W (each class
    spans a factor of 2 in each)."""
    return int(m).bit_length(), int(n).bit_length(), int(w).bit_length()


def _capturing():
    """Whether the current stream is being captured into a CUDA graph (True when CUDA cannot
    say: the legacy stream is not to be queried while another stream captures)."""
    try:
        return bool(_cp().cuda.get_current_stream().is_capturing())
    except Exception:  # noqa: BLE001  (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, an old CuPy)
        return True


def _tc_forms():
    """The tensor-core forms :func:`available_kernels` lists on this GPU, in _TC_FORMS order."""
    return [f for f in _TC_FORMS if f in available_kernels()]


def _tensorcore_form(m, n, w, launch, out):
    """(the tensor-core form plain ``"tensorcore"`` runs for an M x W . N x W product,
    whether ``launch`` has already written the result). The form is the fastest of
    :func:`available_kernels`'s tensor-core forms for the product's shape class on this
    device, measured on first use: ``launch(form)`` runs the caller's own product into
    ``out``, once per form to warm up, and a form whose ``out`` differs from the first
    form's (the direct one, in use since the forms began, unless excluded) is left out,
    with a warning and its name in ``form_disagreements``: a kernel new to this GPU is
    checked on the product in hand before it can be chosen. Then 3 times per form, taking
    turns, timed with CUDA events (the forms left all write the same result, so the output
    is right whichever ran last); the times are kept in ``form_timings``.
    ``MINIBNN_TC_FORM`` names a form instead; with ``MINIBNN_GPU_AUTOTUNE=0``, or while the
    stream is being captured into a CUDA graph (nothing can be timed then; the class stays
    untimed for a later eager call), the direct form runs up to ``DIRECT_MAX_ROWS`` rows of
    A and the tiled one above (the first form left where ``MINIBNN_TC_EXCLUDE`` names
    these)."""
    forced = os.environ.get("MINIBNN_TC_FORM", "").strip()
    if forced:
        forms = _tc_forms()
        if forced not in forms:
            raise ValueError(f"MINIBNN_TC_FORM: expected one of {forms}, got {forced!r}")
        return forced, False
    key = (_device(),) + _shape_class(m, n, w)
    form = _form_choice.get(key)
    if form is not None:  # the usual case: the class was timed
        return form, False
    forms = _tc_forms()
    cp = _cp()
    if os.environ.get("MINIBNN_GPU_AUTOTUNE", "1").strip() == "0" or _capturing():
        want = "tensorcore_direct" if m <= DIRECT_MAX_ROWS else "tensorcore_tiled"
        return (want if want in forms else forms[0]), False
    first, wrong, unbuilt = None, [], []
    for f in forms:
        try:
            launch(f)  # compiles the entry on first use, pads and prepares what it reads
        except Exception as exc:  # noqa: BLE001
            # NVRTC could not build a later form's module here (say, an NVRTC without the
            # wgmma forms' sm_90a): nothing was launched, so the others still can be
            if first is None or not _nvrtc_refused(exc):
                raise
            unbuilt.append(f)
            continue
        if first is None:
            first = out.copy()
        elif not bool(cp.array_equal(out, first)):
            wrong.append(f)
    if wrong or unbuilt:
        import warnings
        form_disagreements[key] = wrong + unbuilt
        why = [f"{wrong} gave a product different from {forms[0]}'s"] if wrong else []
        why += [f"{unbuilt} could not be compiled"] if unbuilt else []
        warnings.warn(f"tensor-core forms {' and '.join(why)} for a {m} x {n} x {w}-word "
                      f"product on this GPU; they are not used for its shape class "
                      f"(cupy_gpu.form_disagreements)", RuntimeWarning, stacklevel=2)
        forms = [f for f in forms if f not in wrong and f not in unbuilt]
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = {f: float("inf") for f in forms}
    for _ in range(3):
        for f in forms:
            start.record()
            launch(f)
            stop.record()
            stop.synchronize()
            times[f] = min(times[f], cp.cuda.get_elapsed_time(start, stop) / 1e3)
    form_timings[key] = times
    form = _form_choice[key] = min(forms, key=times.get)
    return form, True


def _tc_function(name, smem_bytes, source="xnor_gemm_tc.cu"):
    """A tensor-core entry of ``source``, allowed ``smem_bytes`` of dynamic shared memory
    (over 48 KiB; set once per device)."""
    fn = _function(source, name)
    key = (_device(), name)
    if key not in _shared_set:
        if fn.max_dynamic_shared_size_bytes < smem_bytes:
            fn.max_dynamic_shared_size_bytes = smem_bytes
        _shared_set.add(key)
    return fn


def xnor_gemm(a, b, k, kernel=None):
    """Binary GEMM on the GPU: out[i, j] = k - 2 * popcount(a[i] XOR b[j]), int32 CuPy (M, N).

    ``a`` (M, W) and ``b`` (N, W) are packed uint64 rows (CuPy or NumPy, B transposed),
    W = ceil(k/64), padding bits 0 (not checked here: that would synchronize). ``b`` may be
    a :class:`PreparedWeights`. ``kernel``: one of :func:`available_kernels`
    (the ``"tensorcore..."`` ones need compute capability >= 8.0; ``"cuda"`` runs
    anywhere); default the first of them.
    """
    a, rows, prepared, k, kernel = _gemm_operands(a, b, k, kernel)
    cp = _cp()
    m, w = a.shape
    n = rows.shape[0]
    out = cp.empty((m, n), dtype=cp.int32)
    if m == 0 or n == 0:
        return out
    if w == 0:
        out.fill(0)
        return out
    _launch(cp.asarray(a), cp.asarray(rows), prepared, k, kernel, (out,))
    return out


def gemm_threshold(a, b, k, threshold, kernel=None):
    """``pack_threshold(xnor_gemm(a, b, k), threshold)`` in one kernel: the GEMM's epilogue
    compares each product with its threshold and packs the bits (no int32 (M, N) matrix, no
    second pass). Returns uint64 CuPy (M, ceil(N/64)):

        bit (i, j) = a_i . b_j >= threshold[j]             (threshold (N,)), or
        bit (i, j) = a_i . b_j >= threshold[i mod P, j]    (threshold (P, N), P dividing M)

    packed as ``pack_rows`` packs (bit 1 = +1, padding bits 0): a frozen hidden layer's
    sign(BN(z)). ``threshold`` must be integer (exact in int64: not uint64); operands and
    ``kernel`` as in :func:`xnor_gemm`.
    """
    a, rows, prepared, k, kernel = _gemm_operands(a, b, k, kernel)
    cp = _cp()
    threshold = cp.asarray(threshold)
    kind = getattr(threshold.dtype, "kind", None)
    if not (kind == "i" or (kind == "u" and threshold.dtype.itemsize <= 4)):
        raise ValueError(f"threshold: expected integers exact in int64 (a frozen layer's "
                         f"thresholds), got dtype {threshold.dtype}")
    m, w = a.shape
    n = rows.shape[0]
    p = check_threshold_table(threshold, m, n)
    words = n_words(n)
    if m == 0 or n == 0:
        return cp.empty((m, words), dtype=cp.uint64)
    if w == 0:  # k = 0: every product is 0
        return pack_threshold(cp.zeros((m, n), dtype=cp.int32), threshold)
    out = cp.empty((m, words), dtype=cp.uint64)
    thr = cp.ascontiguousarray(threshold.astype(cp.int64, copy=False)).reshape(-1)
    _launch(cp.asarray(a), cp.asarray(rows), prepared, k, kernel, (out, np.int64(words)),
            (thr, np.int64(p)))
    return out


def pack_bitplanes(x):
    """uint8 pixels (M, K) -> uint64 (M, 8, ceil(K/64)) on the GPU (plane n = bit n)."""
    cp = _cp()
    x = check_pixels(cp.asarray(x))
    shifts = cp.arange(PLANES, dtype=cp.uint8)[:, None]
    planes = ((x[:, None, :] >> shifts) & 1).astype(cp.bool_)
    # the word count is given, not inferred: with no images (M = 0) a -1 cannot be inferred
    return pack_rows(planes.reshape(-1, x.shape[1]), check_nan=False).reshape(
        x.shape[0], PLANES, n_words(x.shape[1]))


def bitplane_gemm(planes, b, k):
    """z = sum_n 2^n (planes[:, n] . b) = (2x - 255) . w, int32 (M, N): one XNOR GEMM over
    the 8M plane rows, combined by shift-add (Horner's rule).

    M is limited as in :func:`xnor_gemm` (not 8M): more than ``_MAX_ROWS / 8`` rows go in
    slices of that many, each one GEMM."""
    cp = _cp()
    k = check_bitplane_operands(planes, b, k)
    m = planes.shape[0]
    if m == 0:  # no images: reshape(PLANES, 0, -1) below could not infer the -1
        return cp.zeros((0, b.shape[0]), dtype=cp.int32)
    step = _MAX_ROWS // PLANES
    if m > step:
        return cp.concatenate([bitplane_gemm(planes[i:i + step], b, k)
                               for i in range(0, m, step)])
    g = xnor_gemm(cp.ascontiguousarray(planes.transpose(1, 0, 2)).reshape(PLANES * m, -1),
                  b, k).reshape(PLANES, m, -1)
    z = g[PLANES - 1].copy()
    for n in range(PLANES - 2, -1, -1):
        z <<= 1
        z += g[n]
    return z


def pack_threshold(z, threshold):
    """bit (i, j) = z[i, j] >= threshold[j] (or ``threshold[i mod P, j]`` for a (P, N)
    table), packed on the GPU: uint64 (M, ceil(N/64)), as :func:`kernels.reference.pack_threshold`.
    int32 ``z`` against integer thresholds (the frozen layers' case) is one fused pass
    (``pack_threshold_i32``: no bool matrix); other dtypes compare, then pack the bool array.
    :func:`gemm_threshold` does this in the GEMM's epilogue, saving the pass over ``z``."""
    cp = _cp()
    z, threshold = cp.asarray(z), cp.asarray(threshold)
    p = check_threshold_operands(z, threshold)
    m, n = z.shape
    exact_in_int64 = threshold.dtype.kind == "i" or (threshold.dtype.kind == "u"
                                                     and threshold.dtype.itemsize <= 4)
    if z.dtype == cp.int32 and exact_in_int64:  # the frozen layers' case: one fused pass
        words = n_words(n)
        out = cp.empty((m, words), dtype=cp.uint64)
        if m and words:
            _function("xnor_gemm.cu", "pack_threshold_i32")(
                _blocks(m * words * 32), (_THREADS,),
                (cp.ascontiguousarray(z), np.int64(m), np.int64(n),
                 cp.ascontiguousarray(threshold.astype(cp.int64, copy=False)).reshape(-1),
                 np.int64(p),
                 out, np.int64(words)))
        return out
    fire = z.reshape(-1, p, n) >= threshold.reshape(1, -1, n)
    return pack_rows(fire.reshape(m, n), check_nan=False)
