"""The ``"avx2"`` XNOR-popcount GEMM kernel: a hand-written LLVM IR micro-kernel.

Selected through :func:`kernels.numba_cpu.xnor_gemm` with ``kernel="avx2"`` (offered by
:func:`kernels.numba_cpu.available_kernels` when the host CPU has AVX2); this module only
computes, the checks and dispatch live in :mod:`minibnn.kernels.numba_cpu`.

For 256-bit vectors the popcount of ``a ^ b`` is taken byte-wise from a 16-entry table
applied with ``vpshufb`` to the low and the high nibbles (the nibble-table popcount of
Muła, Kurz and Lemire, "Faster population counts using AVX2 instructions", 2016):

    popcount(a ^ b) = lut[lo(a) ^ lo(b)] + lut[hi(a) ^ hi(b)]

The operands are split into nibble planes once (``_nibble_planes``), so the inner step
costs 2 xor + 2 shuffles + 2 byte adds per 4 words and output pair. Byte counters gain
at most 8 per step; they are widened with ``vpsadbw`` every 31 steps, before they can
overflow. The micro-kernel (``_mk_avx2_3x4``) keeps a 3 x 4 tile of output pairs in
registers; the driver (``_gemm_avx2``) is blocked like the generic kernel: parallel over
blocks of rows of A, over rows of B in cache blocks, and over K in blocks of vectors.
How it compares with the generic kernel depends on the CPU, so it is not the default.
"""

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from ._numba_common import NB_ROWS, jit, pair_counts, store

__all__ = ["host_has_avx2", "xnor_gemm_into"]

_AR, _AC = 3, 4  # register tile of the micro-kernel (rows of A x rows of B)
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


@jit(parallel=True)
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


@jit(parallel=True)
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
        for jb in range(0, n, NB_ROWS):
            je = min(jb + NB_ROWS, n)
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
                                store(cnt, i + r, j + c, np.int32(tmp[r * _AC + c]), k, final)
                    pair_counts(a, b, i, i + _AR, jt_end, je,
                                4 * vb, min(4 * ve, w_count), cnt, k, final)
        if chunk == n_chunks - 1:  # rows below the last full tile
            pair_counts(a, b, tiles * _AR, m, 0, n, 0, w_count, cnt, k, True)


def host_has_avx2():
    """True when numba compiles for this host and its CPU has AVX2 (best effort)."""
    try:
        if numba.config.CPU_NAME not in (None, "host"):
            return False
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except Exception:  # pragma: no cover - feature probing is best effort
        return False


def xnor_gemm_into(a, b, cnt, k):
    """Write k - 2 * popcount(a[i] ^ b[j]) into ``cnt[i, j]``.

    Expects what :func:`kernels.numba_cpu.xnor_gemm` has already checked and prepared:
    C-contiguous uint64 ``a`` (M, W) and ``b`` (N, W) with M, N, W >= 1 and zero padding
    bits, and ``cnt`` an int32 (M, N) array of zeros.
    """
    m, w_count = a.shape
    n = b.shape[0]
    n_chunks = max(1, min(numba.get_num_threads(), m // _AR))
    n_vec = (w_count + 3) // 4
    pa = np.empty((m, n_vec, 8), dtype=np.uint64)
    pb = np.empty((n, n_vec, 8), dtype=np.uint64)
    _nibble_planes(a, pa)
    _nibble_planes(b, pb)
    _gemm_avx2(a, b, pa, pb, cnt, k, n_chunks)
