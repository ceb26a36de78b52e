"""Numba CPU backend: parallel bit packing and the XNOR-popcount GEMM.

Same conventions and results as :mod:`minibnn.kernels.reference` (bit-exact):
``xnor_gemm(a (M, W), b (N, W), k)[i, j] = k - 2 * popcount(a[i] XOR b[j])``.

This module holds the packing, the generic GEMM kernel, the dispatch among GEMM
kernels, and the bit-plane product for 8-bit input. The GEMM kernels, all parallel and
blocked over rows of B (so a block of B stays in L2) and over K (so a register tile's
operands stay in L1):

* ``"generic"`` (here): plain Numba code on a 4 x 2 register tile with popcount through
  ``llvm.ctpop.i64`` (numba has no popcount of its own); LLVM vectorizes the K loop or
  emits ``popcnt`` as the target allows. Runs on any CPU.
* ``"scalar"``, ``"simd256"``, ``"simd512"`` (:mod:`minibnn.kernels.numba_simd`): LLVM IR
  micro-kernels on a 4 x 4 tile with ``llvm.ctpop`` on 1, 4 or 8 64-bit lanes (``popcnt``;
  ``vpopcntq`` ymm / zmm with AVX512_VPOPCNTDQ, a nibble-table expansion without).
* ``"avx2"``, ``"avx512bw"`` (:mod:`minibnn.kernels.numba_avx2`): hand-written LLVM IR
  micro-kernels with the nibble-table popcount and byte counters on 256-bit (AVX2) or
  512-bit (AVX512BW) vectors, for CPUs without a vector popcount instruction.
* ``"hs256"``, ``"hs512"`` (:mod:`minibnn.kernels.numba_hs`): Harley-Seal carry-save adders
  that count one vector popcount per 8 vectors of K, for long K on CPUs without
  ``vpopcntq``.
* ``"bcast256"``, ``"bcast512"`` (:mod:`minibnn.kernels.numba_simd`): B repacked into panels
  of 4 or 8 rows, lanes across rows of B, words of A broadcast: every lane is an output,
  no sum across lanes and no tail of K (short K: a ConvNet's 3x3 patches).

Which is fastest depends on the CPU and the shape: unless one is named, :func:`xnor_gemm`
uses the choice :mod:`minibnn.kernels.autotune` measured for the shape class.
"""

import numpy as np
import numba
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import autotune, numba_avx2, numba_hs, numba_simd
from ._numba_common import NB_ROWS, jit, pair_counts, popcount64, store
from .reference import (PLANES, check_bitplane_operands, check_gemm_operands,
                        check_pack_input, check_pixels, check_threshold_operands, n_words,
                        unpack_rows)

__all__ = ["pack_rows", "unpack_rows", "xnor_gemm", "prepare_weights", "PreparedWeights",
           "pack_bitplanes", "bitplane_gemm", "pack_threshold", "conv_patch_words",
           "available_kernels", "default_kernel"]


# --------------------------------------------------------------------------- packing


@jit(parallel=True)
def _pack_numeric(x, out, nan_rows):
    m, k = x.shape
    w_count = out.shape[1]
    for i in prange(m):
        bad = False
        for w in range(w_count):
            base = w * 64
            n = min(64, k - base)
            word = np.uint64(0)
            for j in range(n):
                v = x[i, base + j]
                word |= np.uint64(v >= 0) << np.uint64(j)
                bad |= v != v
            out[i, w] = word
        nan_rows[i] = bad


@jit(parallel=True)
def _pack_bool(x, out):
    m, k = x.shape
    w_count = out.shape[1]
    for i in prange(m):
        for w in range(w_count):
            base = w * 64
            n = min(64, k - base)
            word = np.uint64(0)
            for j in range(n):
                word |= np.uint64(x[i, base + j]) << np.uint64(j)
            out[i, w] = word


def pack_rows(x):
    """Binarize and pack ``x`` (..., K) into uint64 words (..., ceil(K/64)), in parallel.

    Same result as :func:`kernels.reference.pack_rows`: bit = (x >= 0) (sign(0) = +1),
    bool True -> 1, LSB first, zero padding; NaN raises ValueError. Reads bool,
    integer and real float input of any memory layout directly (no conversion copy;
    a non-contiguous input of more than two dimensions is reshaped, which copies).
    """
    x = check_pack_input(np.asarray(x))
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k) if x.ndim != 2 else x
    if x2.dtype.byteorder not in "=|":
        x2 = x2.astype(x2.dtype.newbyteorder("="))
    out = np.empty((x2.shape[0], n_words(k)), dtype=np.uint64)
    if x2.dtype.kind == "b":
        _pack_bool(x2, out)
    else:
        if x2.dtype == np.float16:
            x2 = x2.astype(np.float32)
        nan_rows = np.empty(x2.shape[0], dtype=np.bool_)
        _pack_numeric(x2, out, nan_rows)
        if nan_rows.any():
            row = int(np.argmax(nan_rows))
            raise ValueError(
                f"x: cannot binarize NaN (it has no sign); found one in row {row} of the "
                f"input of shape {tuple(x.shape)} and dtype {x.dtype}"
            )
    return out.reshape(lead + (out.shape[1],))


def _compare_pack(etype, lanes=64):
    """A Numba intrinsic ``cmp(z_addr, t_addr) -> uint64``: bit j = z[j] >= t[j] for the
    ``lanes`` (64, 32 or 16) values of type ``etype`` (int32 or float32, ordered: NaN gives
    0) at each address, the bits above ``lanes`` 0. One vector compare into a mask, read
    as an integer (element j is bit j): on AVX-512 a few ``vpcmpd``/``vcmpps`` into mask
    registers, where the scalar loop below shifts and ors bit by bit."""
    vec = ir.VectorType(etype, lanes)

    def codegen(context, builder, signature, args):
        z_addr, t_addr = args
        z = builder.load(builder.inttoptr(z_addr, vec.as_pointer()), align=4)
        t = builder.load(builder.inttoptr(t_addr, vec.as_pointer()), align=4)
        mask = (builder.fcmp_ordered(">=", z, t) if isinstance(etype, ir.FloatType)
                else builder.icmp_signed(">=", z, t))
        bits = builder.bitcast(mask, ir.IntType(lanes))
        return bits if lanes == 64 else builder.zext(bits, ir.IntType(64))

    @intrinsic
    def cmp(typingctx, z_addr, t_addr):
        return types.uint64(types.intp, types.intp), codegen
    return cmp


_cmp_pack_i32 = _compare_pack(ir.IntType(32))
_cmp_pack_f32 = _compare_pack(ir.FloatType())
# the last word of a row of fewer than 64 outputs (a ConvNet's 16 or 32 channels)
_cmp32_i32, _cmp16_i32 = _compare_pack(ir.IntType(32), 32), _compare_pack(ir.IntType(32), 16)
_cmp32_f32, _cmp16_f32 = _compare_pack(ir.FloatType(), 32), _compare_pack(ir.FloatType(), 16)


@jit(inline="always")
def _pack_threshold_row(z0, sz, t0, st, z, t, out, i, r, n, full, w_count, is_float):
    """Row i of ``_pack_threshold_vec`` against threshold row r."""
    for w in range(full):
        if is_float:
            out[i, w] = _cmp_pack_f32(z0 + i * sz + 256 * w, t0 + r * st + 256 * w)
        else:
            out[i, w] = _cmp_pack_i32(z0 + i * sz + 256 * w, t0 + r * st + 256 * w)
    for w in range(full, w_count):  # the last, partial word: 32, then 16, then 1 at a time
        base = w * 64
        za, ta = z0 + i * sz + 4 * base, t0 + r * st + 4 * base
        word = np.uint64(0)
        j = 0
        if n - base >= 32:
            word = _cmp32_f32(za, ta) if is_float else _cmp32_i32(za, ta)
            j = 32
        if n - base - j >= 16:
            half = (_cmp16_f32(za + 4 * j, ta + 4 * j) if is_float
                    else _cmp16_i32(za + 4 * j, ta + 4 * j))
            word |= half << np.uint64(j)
            j += 16
        for jj in range(j, n - base):
            word |= np.uint64(z[i, base + jj] >= t[r, base + jj]) << np.uint64(jj)
        out[i, w] = word


@jit(parallel=True)
def _pack_threshold_vec(z, t, out, is_float):
    """``_pack_threshold`` for C-contiguous z and t of one dtype, int32 or float32: whole
    words by one vector compare each, the last partial word by a 32- and a 16-lane compare
    where it has that many outputs left, the rest one at a time."""
    m, n = z.shape
    p = t.shape[0]
    z0, t0, sz, st = z.ctypes.data, t.ctypes.data, z.strides[0], t.strides[0]
    for i in prange(m):
        _pack_threshold_row(z0, sz, t0, st, z, t, out, i, i % p, n, n // 64, out.shape[1],
                            is_float)


@jit()
def _pack_threshold_vec_serial(z, t, out, is_float):
    """``_pack_threshold_vec`` on the calling thread: for small z, where waking the other
    threads costs more than the pass (see ``_SERIAL_PACK``)."""
    m, n = z.shape
    p = t.shape[0]
    z0, t0, sz, st = z.ctypes.data, t.ctypes.data, z.strides[0], t.strides[0]
    for i in range(m):
        _pack_threshold_row(z0, sz, t0, st, z, t, out, i, i % p, n, n // 64, out.shape[1],
                            is_float)


@jit(parallel=True)
def _pack_threshold(z, t, out):
    m, n = z.shape
    p = t.shape[0]
    w_count = out.shape[1]
    for i in prange(m):
        r = i % p
        for w in range(w_count):
            base = w * 64
            word = np.uint64(0)
            for j in range(min(64, n - base)):
                word |= np.uint64(z[i, base + j] >= t[r, base + j]) << np.uint64(j)
            out[i, w] = word


# outputs below which one thread thresholds and packs: waking the others costs 30-40 us (Zen 4,
# 2 threads: 100 x 2048 took 44 us in parallel, 15 us on one; 400 x 1000 67 and 33; 1024 x
# 4096 197 and 323; 16384 x 128 135 and 155)
_SERIAL_PACK = 1 << 20


def pack_threshold(z, threshold, out=None):
    """Threshold and pack in one parallel pass: bit (i, j) = z[i, j] >= threshold[j] (or
    ``threshold[i mod P, j]`` for a (P, N) table), uint64 (M, ceil(N/64)), the same as
    :func:`kernels.reference.pack_threshold` without the (M, N) bool array between.
    ``out``: a C-contiguous uint64 (M, ceil(N/64)) array to write into (reused buffers)."""
    z, threshold = np.asarray(z), np.asarray(threshold)
    check_threshold_operands(z, threshold)
    m, n = z.shape
    shape = (m, n_words(n))
    if out is None:
        out = np.empty(shape, dtype=np.uint64)
    elif not isinstance(out, np.ndarray) or out.dtype != np.uint64 or out.shape != shape or \
            not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous uint64 array of shape {shape}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} of shape "
                         f"{getattr(out, 'shape', None)}")
    if out.size:
        t = threshold.reshape(-1, n)
        if z.dtype.byteorder not in "=|" or t.dtype.byteorder not in "=|":
            z, t = z.astype(z.dtype.newbyteorder("=")), t.astype(t.dtype.newbyteorder("="))
        if z.dtype == t.dtype and z.dtype in (np.int32, np.float32) and z.flags.c_contiguous:
            run = _pack_threshold_vec_serial if z.size < _SERIAL_PACK else _pack_threshold_vec
            run(z, np.ascontiguousarray(t), out, z.dtype == np.float32)
        else:
            _pack_threshold(z, t, out)
    return out


# ------------------------------------------------------ packed patches (frozen ConvNets)


@jit(parallel=True)
def _conv_patch_words(h, mask, kh, kw, stride, pad, slot, out):
    n, hh, ww, wc = h.shape
    ho, wo, words = out.shape[1], out.shape[2], out.shape[3]
    for q in prange(n * ho):
        b, y = q // ho, q % ho
        for x in range(wo):
            if slot % 64:
                for u in range(words):
                    out[b, y, x, u] = 0
            for i in range(kh):
                yy = y * stride + i - pad
                for j in range(kw):
                    xx = x * stride + j - pad
                    t = i * kw + j
                    inside = yy >= 0 and yy < hh and xx >= 0 and xx < ww
                    if slot % 64 == 0:
                        for u in range(wc):
                            out[b, y, x, t * wc + u] = h[b, yy, xx, u] if inside else mask[u]
                    else:
                        v = h[b, yy, xx, 0] if inside else mask[0]
                        out[b, y, x, t * slot // 64] |= v << np.uint64(t * slot % 64)


def conv_patch_words(h, mask, kh, kw, stride, padding, slot, ho, wo, words):
    """The packed patches of a frozen binary convolution in one parallel pass: h (B, H, W,
    wc) packed activations -> uint64 (B*Ho*Wo, words), tap t = (i, j) row-major in slot t
    (``slot`` bits: wc whole words when 64 divides it, else bits t*slot .. inside one word),
    padded pixels ``mask`` (every valid channel bit set: +1). The values of
    ``deploy.runtime.conv_patches`` (its NumPy version, one slice copy per tap)."""
    out = np.empty((h.shape[0], ho, wo, words), np.uint64)
    _conv_patch_words(np.ascontiguousarray(h), mask, kh, kw, stride, padding, slot, out)
    return out.reshape(-1, words)


# --------------------------------------------------------------- generic GEMM kernel

_GR, _GC = 4, 2  # register tile of the generic kernel (rows of A x rows of B)
_KB_WORDS = 128  # words of K per cache block


@jit(parallel=True)
def _gemm_generic(a, b, cnt, k, n_chunks):
    m, w_count = a.shape
    n = b.shape[0]
    tiles = m // _GR
    for chunk in prange(n_chunks):
        t0 = tiles * chunk // n_chunks
        t1 = tiles * (chunk + 1) // n_chunks
        for jb in range(0, n, NB_ROWS):
            je = min(jb + NB_ROWS, n)
            jt_end = jb + (je - jb) // _GC * _GC
            for wb in range(0, w_count, _KB_WORDS):
                we = min(wb + _KB_WORDS, w_count)
                final = we == w_count
                for t in range(t0, t1):
                    i = t * _GR
                    for j in range(jb, jt_end, _GC):
                        c00 = c01 = c10 = c11 = np.uint64(0)
                        c20 = c21 = c30 = c31 = np.uint64(0)
                        for w in range(wb, we):
                            b0 = b[j, w]
                            b1 = b[j + 1, w]
                            a0 = a[i, w]
                            a1 = a[i + 1, w]
                            a2 = a[i + 2, w]
                            a3 = a[i + 3, w]
                            c00 += popcount64(a0 ^ b0)
                            c01 += popcount64(a0 ^ b1)
                            c10 += popcount64(a1 ^ b0)
                            c11 += popcount64(a1 ^ b1)
                            c20 += popcount64(a2 ^ b0)
                            c21 += popcount64(a2 ^ b1)
                            c30 += popcount64(a3 ^ b0)
                            c31 += popcount64(a3 ^ b1)
                        store(cnt, i, j, np.int32(c00), k, final)
                        store(cnt, i, j + 1, np.int32(c01), k, final)
                        store(cnt, i + 1, j, np.int32(c10), k, final)
                        store(cnt, i + 1, j + 1, np.int32(c11), k, final)
                        store(cnt, i + 2, j, np.int32(c20), k, final)
                        store(cnt, i + 2, j + 1, np.int32(c21), k, final)
                        store(cnt, i + 3, j, np.int32(c30), k, final)
                        store(cnt, i + 3, j + 1, np.int32(c31), k, final)
                    pair_counts(a, b, i, i + _GR, jt_end, je, wb, we, cnt, k, final)
        if chunk == n_chunks - 1:  # rows below the last full tile
            pair_counts(a, b, tiles * _GR, m, 0, n, 0, w_count, cnt, k, True)


# ------------------------------------------------------------------------ dispatch

_ISA = autotune.isa_features()
_SERIAL_WORK = 1 << 17  # word pairs below which one thread beats waking the others


def available_kernels():
    """Names of the GEMM kernels this CPU can run: ``"generic"`` first, then ``"scalar"``,
    ``"simd256"`` (AVX2), ``"simd512"`` (AVX512F), ``"avx2"`` (AVX2), ``"avx512bw"``
    (AVX512BW), ``"hs256"`` (AVX2), ``"hs512"`` (AVX512F), ``"bcast256"`` (AVX2) and
    ``"bcast512"`` (AVX512F) where Numba's target and this CPU offer them."""
    f = _ISA["features"]
    return ("generic", "scalar") + tuple(name for name, need in _NEEDS if f[need])


_NEEDS = (("simd256", "avx2"), ("simd512", "avx512f"), ("avx2", "avx2"),
          ("avx512bw", "avx512bw"), ("hs256", "avx2"), ("hs512", "avx512f"),
          ("bcast256", "avx2"), ("bcast512", "avx512f"))  # ISA feature


def default_kernel(m=100, n=4096, k=4096):
    """The kernel :func:`xnor_gemm` uses when none is named, for an M x K x N product:
    the :mod:`minibnn.kernels.autotune` choice for its shape class (measured once per class
    and machine, cached on disk; ``MINIBNN_GEMM_KERNEL`` forces one)."""
    return autotune.choose(int(m), int(n), n_words(int(k)), available_kernels(), _run_tuned)


# rows above which the autotune times a candidate on one thread (its class's timed M is 512;
# the classes of 100 and 8 rows are timed on all threads)
_TUNE_ONE_THREAD_ROWS = 256


def _run_tuned(name, a, b, k):
    """One product with kernel ``name``, for the autotune to time.

    A class of many rows is timed on one thread: each thread of a real product gets many
    rows, so a kernel's rate per core ranks the candidates, and a single thread never waits
    for a second core that other work on a busy machine holds. A class of few rows (up to
    :data:`_TUNE_ONE_THREAD_ROWS`, the paper's batch of 100 among them) is timed on all
    threads, as it runs: there how a kernel splits the product over the cores decides its
    speed. (Measured at 100 x 4096 x 4096 under the Zen 3 and Cascade Lake ISA profiles on
    a 2-core Zen 4: the nibble-table kernel ``avx2`` was second of the candidates on one
    thread and behind most of them on two: 6-14% behind ``bcast256`` as Zen 3, 20% behind
    ``hs256`` as Cascade Lake.)"""
    if a.shape[0] <= _TUNE_ONE_THREAD_ROWS:
        return xnor_gemm(a, b, k, kernel=name)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return xnor_gemm(a, b, k, kernel=name)
    finally:
        numba.set_num_threads(threads)


class PreparedWeights:
    """A right operand that many products reuse (a frozen net's weights), kept in the forms
    the kernels read: the packed rows (``rows``, uint64 (N, W), C order) and, made on first
    use and kept, each broadcast kernel's panel form (:func:`numba_simd.pack_panels`) and
    each nibble-table kernel's planes (:func:`numba_avx2.nibble_planes`).
    :func:`xnor_gemm` takes it in place of ``b``; the result is the same, bit for bit. Make
    it with :func:`prepare_weights`; ``rows`` is a read-only copy, so the forms made from
    it stay true to it."""

    def __init__(self, rows):
        rows = np.ascontiguousarray(rows)
        rows.setflags(write=False)
        self.rows = rows
        self._forms = {}  # kernel name -> its form of the rows

    @property
    def shape(self):
        return self.rows.shape

    def panels(self, name):
        """The rows in broadcast kernel ``name``'s panel form (made once)."""
        p = self._forms.get(name)
        if p is None:
            p = self._forms[name] = numba_simd.pack_panels(name, self.rows)
        return p

    def nibble_planes(self, name):
        """The rows' nibble planes for kernel ``name`` (``"avx2"``, ``"avx512bw"``; made once)."""
        p = self._forms.get(name)
        if p is None:
            p = self._forms[name] = numba_avx2.nibble_planes(self.rows, name)
        return p

    def __repr__(self):
        return (f"PreparedWeights({self.rows.shape[0]} rows x {self.rows.shape[1]} words, "
                f"forms made: {sorted(self._forms) or 'none yet'})")


def prepare_weights(b):
    """``b`` (N, W) packed rows as a :class:`PreparedWeights` for repeated :func:`xnor_gemm`
    calls with it as the right operand (a :class:`PreparedWeights` is returned as it is).
    The rows are copied, so later changes to ``b`` do not reach it; their padding bits are
    checked by each product, which knows k."""
    if isinstance(b, PreparedWeights):
        return b
    if not isinstance(b, np.ndarray) or b.ndim != 2 or b.dtype != np.uint64:
        raise ValueError("b: expected a 2-D uint64 NumPy array (N, W) of packed rows, got "
                         f"{getattr(b, 'dtype', type(b).__name__)} of shape "
                         f"{getattr(b, 'shape', None)}")
    return PreparedWeights(np.array(b, dtype=np.uint64, order="C", copy=True))


def xnor_gemm(a, b, k, kernel=None, out=None):
    """Binary GEMM on packed rows: out[i, j] = k - 2 * popcount(a[i] XOR b[j]), int32 (M, N).

    ``a`` (M, W) and ``b`` (N, W) are uint64 words from ``pack_rows`` (B transposed:
    rows are output units), W = ceil(k/64), padding bits 0 (checked). Non-contiguous
    operands are copied to C order first. ``b`` may be a :class:`PreparedWeights` (from
    :func:`prepare_weights`): the broadcast and nibble-table kernels then read its panels or
    planes, made once, instead of making them from B during every call. ``kernel``: a name from
    :func:`available_kernels`, or None / ``"auto"`` for :func:`default_kernel`'s choice for
    this shape. ``out``: an int32 C-contiguous (M, N) array to write into (reused buffers: no
    allocation), returned.
    """
    prepared = b if isinstance(b, PreparedWeights) else None
    if prepared is not None:
        b = prepared.rows
    k = check_gemm_operands(a, b, k)
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    m, w_count = a.shape
    n = b.shape[0]
    if kernel is None or kernel == "auto":
        kernel = default_kernel(m, n, k) if m and n and w_count else "generic"
    if kernel not in available_kernels():
        raise ValueError(f"kernel: expected one of {available_kernels()} or 'auto', "
                         f"got {kernel!r}")
    # these add to cnt; the simd and Harley-Seal kernels overwrite it
    zeroed = kernel in ("generic", "avx2", "avx512bw")
    if out is None:
        cnt = (np.zeros if zeroed or not w_count else np.empty)((m, n), dtype=np.int32)
    else:
        if not isinstance(out, np.ndarray) or out.dtype != np.int32 or out.shape != (m, n) \
                or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous int32 array of shape {(m, n)}, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} of shape "
                             f"{getattr(out, 'shape', None)}")
        cnt = out
        if zeroed or not w_count:
            cnt.fill(0)
    if m == 0 or n == 0 or w_count == 0:  # nothing to count (k = 0: every product is 0)
        return cnt
    threads = 1 if m * n * w_count < _SERIAL_WORK else numba.get_num_threads()
    if kernel in numba_avx2.WORDS:
        numba_avx2.xnor_gemm_into(a, b, cnt, k, kernel, None if prepared is None
                                  else prepared.nibble_planes(kernel))
    elif kernel in numba_hs.LANES:
        numba_hs.xnor_gemm_into(kernel, a, b, cnt, k, threads=threads)
    elif kernel == "generic":
        _gemm_generic(a, b, cnt, k, max(1, min(threads, m // _GR)))
    elif kernel in numba_simd.BCAST:
        numba_simd.xnor_gemm_bcast_into(
            kernel, a, b if prepared is None else prepared.panels(kernel), cnt, k,
            threads=threads)
    else:
        numba_simd.xnor_gemm_into(kernel, a, b, cnt, k, threads=threads)
    return cnt


# ------------------------------------------------------- 8-bit input by bit planes


@jit(parallel=True)
def _pack_bitplanes(x, out):
    m, k = x.shape
    w_count = out.shape[2]
    for i in prange(m):
        for w in range(w_count):
            base = w * 64
            words = np.zeros(8, dtype=np.uint64)
            for j in range(min(64, k - base)):
                v = np.uint64(x[i, base + j])
                for p in range(8):
                    words[p] |= ((v >> np.uint64(p)) & np.uint64(1)) << np.uint64(j)
            for p in range(8):
                out[i, p, w] = words[p]


def pack_bitplanes(x):
    """uint8 pixels (M, K) -> uint64 (M, 8, ceil(K/64)), plane n = bit n of every pixel;
    the same as :func:`kernels.reference.pack_bitplanes`, in one parallel pass."""
    x = np.ascontiguousarray(check_pixels(np.asarray(x)))
    out = np.empty((x.shape[0], PLANES, n_words(x.shape[1])), dtype=np.uint64)
    if out.size:
        _pack_bitplanes(x, out)
    return out


@jit(parallel=True)
def _bitplane_gemm(p, b, z, k):
    m, _, w_count = p.shape
    n = b.shape[0]
    for i in prange(m):
        for j in range(n):
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = np.uint64(0)
            for w in range(w_count):
                y = b[j, w]
                c0 += popcount64(p[i, 0, w] ^ y)
                c1 += popcount64(p[i, 1, w] ^ y)
                c2 += popcount64(p[i, 2, w] ^ y)
                c3 += popcount64(p[i, 3, w] ^ y)
                c4 += popcount64(p[i, 4, w] ^ y)
                c5 += popcount64(p[i, 5, w] ^ y)
                c6 += popcount64(p[i, 6, w] ^ y)
                c7 += popcount64(p[i, 7, w] ^ y)
            s = c0 + 2 * c1 + 4 * c2 + 8 * c3 + 16 * c4 + 32 * c5 + 64 * c6 + 128 * c7
            z[i, j] = np.int32(255 * k) - 2 * np.int32(s)


def bitplane_gemm(planes, b, k, kernel=None):
    """z[i, j] = sum_n 2^n (k - 2 popcount(planes[i, n] ^ b[j])) = (2x_i - 255) . w_j, int32.

    One fused pass: the eight planes of an image meet each weight word while it sits in a
    register, and only the combined z is written, not eight (M, N) partial products.
    ``kernel``: ``"generic"`` (8 scalar counters per pair), or ``"scalar"``, ``"simd256"``,
    ``"simd512"`` (:func:`kernels.numba_simd.bitplane_gemm_into`: a 4 x 4 tile of 4 planes
    x 4 weight rows); default: the autotune's choice for the (8 M, N, W) product where it has
    a bit-plane form, else :func:`kernels.autotune.static_choice` among these.
    Same result as :func:`kernels.reference.bitplane_gemm`.
    """
    k = check_bitplane_operands(planes, b, k)
    planes, b = np.ascontiguousarray(planes), np.ascontiguousarray(b)
    m, n, w_count = planes.shape[0], b.shape[0], planes.shape[2]
    names = ("generic",) + tuple(kn for kn in numba_simd.KERNELS if kn in available_kernels())
    if kernel is None or kernel == "auto":
        kernel = default_kernel(8 * m, n, k) if m and n and w_count else "generic"
        if kernel not in names:  # the GEMM's pick has no bit-plane form (avx2, hs*, ...)
            kernel = autotune.static_choice(names)
    if kernel not in names:
        raise ValueError(f"kernel: expected one of {names} or 'auto', got {kernel!r}")
    z = np.zeros((m, n), dtype=np.int32)
    if not z.size:
        return z
    if w_count == 0:  # k = 0: every product is 0
        return z
    if kernel == "generic":
        _bitplane_gemm(planes, b, z, k)
    else:
        threads = 1 if 8 * m * n * w_count < _SERIAL_WORK else numba.get_num_threads()
        numba_simd.bitplane_gemm_into(kernel, planes, b, z, k, threads=threads)
    return z
