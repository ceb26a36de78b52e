"""Numba CPU backend: parallel bit packing and the XNOR-popcount GEMM.

Same conventions and results as :mod:`kernels.reference` (bit-exact):
``xnor_gemm(a (M, W), b (N, W), k)[i, j] = k - 2 * popcount(a[i] XOR b[j])``.

Two GEMM kernels, both parallel over blocks of rows of A and blocked over rows
of B (so a block of B stays in L2) and over K (so a register tile's operands stay
in L1):

* ``"avx2"``: a hand-written LLVM IR micro-kernel (numba ``@intrinsic``) for a
  3 x 4 tile of output pairs. The operands are split once into low and high
  nibble planes; then for 256-bit vectors
  ``popcount(a ^ b) = lut[lo(a) ^ lo(b)] + lut[hi(a) ^ hi(b)]`` byte-wise, where
  ``lut`` is the 16-entry popcount table applied with ``vpshufb``: 2 xor + 2
  shuffles + 2 byte adds per 4 words and pair, counts kept in bytes for up to 31
  steps and widened with ``vpsadbw`` (the nibble-table popcount of Muła, Kurz and
  Lemire, "Faster population counts using AVX2 instructions", 2016). Offered when
  the host CPU has AVX2; in this project's measurements (2-core Zen 3) it was no
  faster than the generic kernel, so it is not the default.
* ``"generic"``: plain Numba code on a 4 x 2 register tile with popcount through
  ``llvm.ctpop.i64`` (numba has no popcount of its own); LLVM vectorizes the K
  loop (on AVX2 with the same nibble table, widened every step) or emits
  ``popcnt`` as the target allows. Runs on any CPU; the default.
"""

import numpy as np
import numba
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from .reference import (PLANES, check_bitplane_operands, check_gemm_operands,
                        check_pack_input, check_pixels, n_words, unpack_rows)

__all__ = ["pack_rows", "unpack_rows", "xnor_gemm", "pack_bitplanes", "bitplane_gemm",
           "available_kernels", "default_kernel"]


def _jit(**kw):
    """``njit(cache=True, **kw)``, or without the on-disk cache where numba finds no
    writable cache directory (e.g. a read-only site-packages and no user cache)."""

    def deco(fn):
        try:
            return njit(cache=True, **kw)(fn)
        except RuntimeError:
            return njit(cache=False, **kw)(fn)

    return deco


@intrinsic
def popcount64(typingctx, x):
    """popcount of a uint64 via ``llvm.ctpop.i64`` (one ``popcnt`` on x86-64 with POPCNT)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


# --------------------------------------------------------------------------- packing


@_jit(parallel=True)
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


@_jit(parallel=True)
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


# --------------------------------------------------------------- generic GEMM kernel

_GR, _GC = 4, 2  # register tile of the generic kernel (rows of A x rows of B)
_NB_ROWS = 256  # rows of B per cache block (256 rows x 4096 bits = 128 KiB packed)
_KB_WORDS = 128  # words of K per cache block


@_jit()
def _pair_counts(a, b, i0, i1, j0, j1, w0, w1, cnt, k, final):
    """cnt[i, j] += popcount(a[i, w0:w1] ^ b[j, w0:w1]) one pair at a time (edge tiles);
    with ``final`` (the last K block) the sum becomes the result k - 2 * count."""
    for i in range(i0, i1):
        for j in range(j0, j1):
            s = np.uint64(0)
            for w in range(w0, w1):
                s += popcount64(a[i, w] ^ b[j, w])
            _store(cnt, i, j, np.int32(s), k, final)


@_jit(inline="always")
def _store(cnt, i, j, s, k, final):
    if final:
        cnt[i, j] = k - 2 * (cnt[i, j] + s)
    else:
        cnt[i, j] += s


@_jit(parallel=True)
def _gemm_generic(a, b, cnt, k, n_chunks):
    m, w_count = a.shape
    n = b.shape[0]
    tiles = m // _GR
    for chunk in prange(n_chunks):
        t0 = tiles * chunk // n_chunks
        t1 = tiles * (chunk + 1) // n_chunks
        for jb in range(0, n, _NB_ROWS):
            je = min(jb + _NB_ROWS, n)
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
                        _store(cnt, i, j, np.int32(c00), k, final)
                        _store(cnt, i, j + 1, np.int32(c01), k, final)
                        _store(cnt, i + 1, j, np.int32(c10), k, final)
                        _store(cnt, i + 1, j + 1, np.int32(c11), k, final)
                        _store(cnt, i + 2, j, np.int32(c20), k, final)
                        _store(cnt, i + 2, j + 1, np.int32(c21), k, final)
                        _store(cnt, i + 3, j, np.int32(c30), k, final)
                        _store(cnt, i + 3, j + 1, np.int32(c31), k, final)
                    _pair_counts(a, b, i, i + _GR, jt_end, je, wb, we, cnt, k, final)
        if chunk == n_chunks - 1:  # rows below the last full tile
            _pair_counts(a, b, tiles * _GR, m, 0, n, 0, w_count, cnt, k, True)


# ------------------------------------------------------------------ AVX2 GEMM kernel

_AR, _AC = 3, 4  # register tile of the AVX2 micro-kernel
_FLUSH = 31  # byte counters gain <= 8 per step: 31 * 8 = 248 < 256
_KB_VECS = 32  # 256-bit vectors of K per cache block (8192 bits)

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V32x8 = ir.VectorType(_I8, 32)
_V4x64 = ir.VectorType(_I64, 4)


@intrinsic
def _mk_avx2_3x4(typingctx, a_addr, a_stride, b_addr, b_stride, v0, v1, out_addr):
    """Counts popcount(a_r ^ b_c) over vectors [v0, v1) for 3 rows r of the A planes and
    4 rows c of the B planes (byte addresses and row strides), storing 12 int64 at out_addr.

    A plane row holds, per 256-bit step v, 32 bytes of low nibbles then 32 bytes of high
    nibbles (each byte's nibble in its low 4 bits), see ``_nibble_planes``.
    """
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp,
                     types.intp)

    def codegen(context, builder, signature, args):
        a_addr, a_stride, b_addr, b_stride, v0, v1, out_addr = args
        mod = builder.module
        pshufb = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_V32x8, [_V32x8, _V32x8]), "llvm.x86.avx2.pshuf.b")
        psadbw = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_V4x64, [_V32x8, _V32x8]), "llvm.x86.avx2.psad.bw")
        lut = ir.Constant(_V32x8, [bin(i % 16).count("1") for i in range(32)])
        zero8 = ir.Constant(_V32x8, None)
        zero64 = ir.Constant(_V4x64, None)
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731

        def load(base, stride, row, v, plane):
            off = builder.add(builder.mul(c64(row), stride),
                              builder.add(builder.mul(v, c64(64)), c64(32 * plane)))
            ptr = builder.inttoptr(builder.add(base, off), _V32x8.as_pointer())
            return builder.load(ptr, align=8)

        pairs = [(r, c) for r in range(_AR) for c in range(_AC)]
        sums = {p: cgutils.alloca_once_value(builder, zero64) for p in pairs}
        accs = {p: cgutils.alloca_once_value(builder, zero8) for p in pairs}
        n_blocks = builder.udiv(builder.add(builder.sub(v1, v0), c64(_FLUSH - 1)), c64(_FLUSH))
        with cgutils.for_range(builder, n_blocks) as blk:
            start = builder.add(v0, builder.mul(blk.index, c64(_FLUSH)))
            end = builder.add(start, c64(_FLUSH))
            end = builder.select(builder.icmp_signed("<", end, v1), end, v1)
            for p in pairs:
                builder.store(zero8, accs[p])
            with cgutils.for_range_slice(builder, start, end, c64(1)) as (v, _):
                alo = [load(a_addr, a_stride, r, v, 0) for r in range(_AR)]
                ahi = [load(a_addr, a_stride, r, v, 1) for r in range(_AR)]
                blo = [load(b_addr, b_stride, c, v, 0) for c in range(_AC)]
                bhi = [load(b_addr, b_stride, c, v, 1) for c in range(_AC)]
                for r, c in pairs:
                    lo = builder.call(pshufb, [lut, builder.xor(alo[r], blo[c])])
                    hi = builder.call(pshufb, [lut, builder.xor(ahi[r], bhi[c])])
                    acc = builder.add(builder.load(accs[(r, c)]), builder.add(lo, hi))
                    builder.store(acc, accs[(r, c)])
            for p in pairs:
                wide = builder.call(psadbw, [builder.load(accs[p]), zero8])
                builder.store(builder.add(builder.load(sums[p]), wide), sums[p])
        out = builder.inttoptr(out_addr, _I64.as_pointer())
        for idx, p in enumerate(pairs):
            s = builder.load(sums[p])
            lanes = [builder.extract_element(s, ir.Constant(_I32, q)) for q in range(4)]
            total = builder.add(builder.add(lanes[0], lanes[1]), builder.add(lanes[2], lanes[3]))
            builder.store(total, builder.gep(out, [c64(idx)]))
        return context.get_dummy_value()

    return sig, codegen


@_jit(parallel=True)
def _nibble_planes(x, planes):
    """planes[r, v, 0:4] = x[r, 4v:4v+4] & 0x0F.., planes[r, v, 4:8] = (x[r, 4v:4v+4] >> 4) & 0x0F..
    (words past the end of x are 0)."""
    m, w_count = x.shape
    n_vec = planes.shape[1]
    mask = np.uint64(0x0F0F0F0F0F0F0F0F)
    for r in prange(m):
        for v in range(n_vec):
            for q in range(4):
                w = 4 * v + q
                word = x[r, w] if w < w_count else np.uint64(0)
                planes[r, v, q] = word & mask
                planes[r, v, 4 + q] = (word >> np.uint64(4)) & mask


@_jit(parallel=True)
def _gemm_avx2(a, b, pa, pb, cnt, k, n_chunks):
    m, w_count = a.shape
    n = b.shape[0]
    n_vec = pa.shape[1]
    sa = pa.strides[0]
    sb = pb.strides[0]
    pa0 = pa.ctypes.data
    pb0 = pb.ctypes.data
    tiles = m // _AR
    for chunk in prange(n_chunks):
        tmp = np.zeros(_AR * _AC, dtype=np.int64)
        tmp_addr = tmp.ctypes.data
        t0 = tiles * chunk // n_chunks
        t1 = tiles * (chunk + 1) // n_chunks
        for jb in range(0, n, _NB_ROWS):
            je = min(jb + _NB_ROWS, n)
            jt_end = jb + (je - jb) // _AC * _AC
            for vb in range(0, n_vec, _KB_VECS):
                ve = min(vb + _KB_VECS, n_vec)
                final = ve == n_vec
                for t in range(t0, t1):
                    i = t * _AR
                    for j in range(jb, jt_end, _AC):
                        _mk_avx2_3x4(pa0 + i * sa, sa, pb0 + j * sb, sb, vb, ve, tmp_addr)
                        for r in range(_AR):
                            for c in range(_AC):
                                _store(cnt, i + r, j + c, np.int32(tmp[r * _AC + c]), k, final)
                    _pair_counts(a, b, i, i + _AR, jt_end, je,
                                 4 * vb, min(4 * ve, w_count), cnt, k, final)
        if chunk == n_chunks - 1:
            _pair_counts(a, b, tiles * _AR, m, 0, n, 0, w_count, cnt, k, True)


def _host_has_avx2():
    try:
        if numba.config.CPU_NAME not in (None, "host"):
            return False
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except Exception:  # pragma: no cover - feature probing is best effort
        return False


_HAS_AVX2 = _host_has_avx2()


def available_kernels():
    """Names of the GEMM kernels this CPU can run, the default first."""
    return ("generic", "avx2") if _HAS_AVX2 else ("generic",)


def default_kernel():
    """The kernel :func:`xnor_gemm` uses when none is named."""
    return available_kernels()[0]


def xnor_gemm(a, b, k, kernel=None):
    """Binary GEMM on packed rows: out[i, j] = k - 2 * popcount(a[i] XOR b[j]), int32 (M, N).

    ``a`` (M, W) and ``b`` (N, W) are uint64 words from ``pack_rows`` (B transposed:
    rows are output units), W = ceil(k/64), padding bits 0 (checked). Non-contiguous
    operands are copied to C order first. ``kernel``: ``"avx2"`` or ``"generic"``
    (default ``"generic"``, see :func:`available_kernels`).
    """
    k = check_gemm_operands(a, b, k)
    kernel = default_kernel() if kernel is None else kernel
    if kernel not in available_kernels():
        raise ValueError(f"kernel: expected one of {available_kernels()}, got {kernel!r}")
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    m, w_count = a.shape
    n = b.shape[0]
    cnt = np.zeros((m, n), dtype=np.int32)
    if m == 0 or n == 0:
        return cnt
    if w_count:
        n_tiles = m // (_AR if kernel == "avx2" else _GR)
        n_chunks = max(1, min(numba.get_num_threads(), n_tiles))
        if kernel == "avx2":
            n_vec = (w_count + 3) // 4
            pa = np.empty((m, n_vec, 8), dtype=np.uint64)
            pb = np.empty((n, n_vec, 8), dtype=np.uint64)
            _nibble_planes(a, pa)
            _nibble_planes(b, pb)
            _gemm_avx2(a, b, pa, pb, cnt, k, n_chunks)
        else:
            _gemm_generic(a, b, cnt, k, n_chunks)
    return cnt


# ------------------------------------------------------- 8-bit input by bit planes


@_jit(parallel=True)
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


@_jit(parallel=True)
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


def bitplane_gemm(planes, b, k):
    """z[i, j] = sum_n 2^n (k - 2 popcount(planes[i, n] ^ b[j])) = (2x_i - 255) . w_j, int32.

    One fused pass: the eight planes of an image meet each weight word while it sits in a
    register, and only the combined z is written, not eight (M, N) partial products.
    Same result as :func:`kernels.reference.bitplane_gemm`.
    """
    k = check_bitplane_operands(planes, b, k)
    planes, b = np.ascontiguousarray(planes), np.ascontiguousarray(b)
    z = np.empty((planes.shape[0], b.shape[0]), dtype=np.int32)
    if z.size:
        _bitplane_gemm(planes, b, z, k)
    return z
