"""The nibble-table XNOR-popcount GEMM kernels ``"avx2"`` and ``"avx512bw"``: hand-written
LLVM IR micro-kernels with byte counters.

Selected through :func:`kernels.numba_cpu.xnor_gemm` with ``kernel="avx2"`` (offered by
:func:`kernels.numba_cpu.available_kernels` when Numba's target has AVX2) or
``kernel="avx512bw"`` (when it has AVX512BW: the same method on 512-bit vectors); this
module only computes, the checks and dispatch live in :mod:`minibnn.kernels.numba_cpu`.

The popcount of ``a ^ b`` is taken byte-wise from a 16-entry table applied with ``vpshufb``
to the low and the high nibbles (the nibble-table popcount of Muła, Kurz and Lemire,
"Faster population counts using AVX2 instructions", 2016):

    popcount(a ^ b) = lut[lo(a) ^ lo(b)] + lut[hi(a) ^ hi(b)]

The operands are split into nibble planes once (``_nibble_planes``), so the inner step
costs 2 xor + 2 shuffles + 2 byte adds per vector (4 words with AVX2, 8 with AVX512BW)
and output pair, where a popcount done per vector (LLVM's expansion of ``llvm.ctpop`` on a
CPU without VPOPCNTDQ, the ``simd*`` kernels there) also masks and shifts the nibbles out
and widens with ``vpsadbw`` every time. Byte counters gain at most 8 per step; they are
widened with ``vpsadbw`` every 31 steps, before they can overflow. The micro-kernel keeps a
3 x 4 tile of output pairs in registers; the driver (``_drive``) is blocked like the
generic kernel: parallel over blocks of rows of A, over rows of B in cache blocks, and over
K in blocks of vectors. They pay where the CPU has no vector popcount instruction (on an
Intel Cascade Lake, ``"avx2"`` ran 3.45x NumPy float32 at 4096^3 where the generic kernel
ran 0.58x); the autotune measures whether they do.
"""

import threading

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from ._numba_common import NB_ROWS, jit, pair_counts, store

__all__ = ["host_has_avx2", "host_has_avx512bw", "xnor_gemm_into", "WORDS"]

_AR, _AC = 3, 4  # register tile of the micro-kernel (rows of A x rows of B)
_FLUSH = 31  # byte counters gain <= 8 per step: 31 * 8 = 248 < 256
_KB_BITS = 8192  # bits of K per cache block
WORDS = {"avx2": 4, "avx512bw": 8}  # 64-bit words per vector

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _nibble_micro_kernel(words):
    """A Numba intrinsic ``mk(a_addr, a_stride, b_addr, b_stride, v0, v1, out_addr)``: counts
    popcount(a_r ^ b_c) over vectors [v0, v1) for 3 rows r of the A planes and 4 rows c of
    the B planes (byte addresses and row strides), storing 12 int64 at out_addr, on vectors
    of ``words`` 64-bit words (4: AVX2 ``vpshufb ymm``, 8: AVX512BW ``vpshufb zmm``).

    A plane row holds, per step v, 8 ``words`` bytes of low nibbles then as many of high
    nibbles (each byte's nibble in its low 4 bits), see ``_nibble_planes``.
    """
    nbytes = 8 * words
    v8 = ir.VectorType(_I8, nbytes)
    v64 = ir.VectorType(_I64, words)
    shuf, sad = (("llvm.x86.avx2.pshuf.b", "llvm.x86.avx2.psad.bw") if words == 4 else
                 ("llvm.x86.avx512.pshuf.b.512", "llvm.x86.avx512.psad.bw.512"))

    def codegen(context, builder, signature, args):
        if not (host_has_avx512bw() if words == 8 else host_has_avx2()):
            # a target without these instructions cannot select them: compile an empty
            # body (the kernel is never offered there, so never called) and the one
            # driver below still compiles for every target
            return context.get_dummy_value()
        a_addr, a_stride, b_addr, b_stride, v0, v1, out_addr = args
        mod = builder.module
        pshufb = cgutils.get_or_insert_function(mod, ir.FunctionType(v8, [v8, v8]), shuf)
        psadbw = cgutils.get_or_insert_function(mod, ir.FunctionType(v64, [v8, v8]), sad)
        lut = ir.Constant(v8, [bin(i % 16).count("1") for i in range(nbytes)])
        zero8 = ir.Constant(v8, None)
        zero64 = ir.Constant(v64, None)
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731

        def load(base, stride, row, v, plane):
            off = builder.add(builder.mul(c64(row), stride),
                              builder.add(builder.mul(v, c64(2 * nbytes)),
                                          c64(nbytes * plane)))
            ptr = builder.inttoptr(builder.add(base, off), v8.as_pointer())
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
            lanes = [builder.extract_element(s, ir.Constant(_I32, q)) for q in range(words)]
            while len(lanes) > 1:
                lanes = [builder.add(x, y) for x, y in zip(lanes[0::2], lanes[1::2])]
            builder.store(lanes[0], builder.gep(out, [c64(idx)]))
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, a_addr, a_stride, b_addr, b_stride, v0, v1, out_addr):
        return types.void(*([types.intp] * 7)), codegen

    return mk


_mk_avx2_3x4 = _nibble_micro_kernel(4)
_mk_avx512bw_3x4 = _nibble_micro_kernel(8)


@jit(parallel=True)
def _nibble_planes(x, planes):
    """With h = planes.shape[2] // 2 words per vector: planes[r, v, 0:h] =
    x[r, hv:hv+h] & 0x0F.., planes[r, v, h:2h] = (x[r, hv:hv+h] >> 4) & 0x0F.. (words past
    the end of x are 0)."""
    m, w_count = x.shape
    n_vec = planes.shape[1]
    half = planes.shape[2] // 2
    mask = np.uint64(0x0F0F0F0F0F0F0F0F)
    for r in prange(m):
        for v in range(n_vec):
            for q in range(half):
                w = half * v + q
                word = x[r, w] if w < w_count else np.uint64(0)
                planes[r, v, q] = word & mask
                planes[r, v, half + q] = (word >> np.uint64(4)) & mask


@jit(parallel=True)
def _drive(a, b, pa, pb, cnt, k, n_chunks, kb_vecs):
    """The blocked, parallel driver of both micro-kernels (the planes' width picks which:
    8 words per vector is AVX512BW). One module-level function, so that numba caches it on
    disk; each micro-kernel compiles to an empty body on a target without its
    instructions, where it is never offered."""
    m, w_count = a.shape
    n = b.shape[0]
    n_vec = pa.shape[1]
    words = pa.shape[2] // 2
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
            for vb in range(0, n_vec, kb_vecs):
                ve = min(vb + kb_vecs, n_vec)
                final = ve == n_vec
                for t in range(t0, t1):
                    i = t * _AR
                    for j in range(jb, jt_end, _AC):
                        if words == 8:
                            _mk_avx512bw_3x4(pa0 + i * sa, sa, pb0 + j * sb, sb, vb, ve, tmp_addr)
                        else:
                            _mk_avx2_3x4(pa0 + i * sa, sa, pb0 + j * sb, sb, vb, ve, tmp_addr)
                        for r in range(_AR):
                            for c in range(_AC):
                                store(cnt, i + r, j + c, np.int32(tmp[r * _AC + c]), k, final)
                    pair_counts(a, b, i, i + _AR, jt_end, je,
                                words * vb, min(words * ve, w_count), cnt, k, final)
        if chunk == n_chunks - 1:  # rows below the last full tile
            pair_counts(a, b, tiles * _AR, m, 0, n, 0, w_count, cnt, k, True)


def host_has_avx2():
    """True when Numba's target and this CPU both have AVX2
    (:func:`kernels.autotune.isa_features`: NUMBA_CPU_FEATURES can take it away)."""
    from .autotune import isa_features

    return isa_features()["features"]["avx2"]


def host_has_avx512bw():
    """True when Numba's target and this CPU both have AVX512BW."""
    from .autotune import isa_features

    return isa_features()["features"]["avx512bw"]


def nibble_planes(x, name="avx2"):
    """The nibble planes of packed rows ``x`` (R, W) for kernel ``name``: uint64 (R, V, 2h)
    with h = ``WORDS[name]`` words per vector and V = ceil(W / h) vectors, low nibbles in
    ``[..., :h]`` and high nibbles in ``[..., h:]`` (made once for weights that many
    products reuse: ``numba_cpu.prepare_weights``)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    words = WORDS[name]
    out = np.empty((x.shape[0], -(-x.shape[1] // words), 2 * words), dtype=np.uint64)
    if out.size:
        _nibble_planes(x, out)
    return out


# Planes made during a call go into buffers kept per thread and reused (grown when too
# small): a fresh multi-MiB array in every call costs a page fault per 4 KiB, and at
# 100 x 4096 x 4096 as Cascade Lake that was 1.6 of 4.2 ms. Larger ones are not kept.
_KEEP_BYTES = 64 << 20
_scratch = threading.local()


def _planes_buffer(key, shape):
    size = int(np.prod(shape))
    if 8 * size > _KEEP_BYTES:
        return np.empty(shape, dtype=np.uint64)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.size < size:
        buf = bufs[key] = np.empty(size, dtype=np.uint64)
    return buf[:size].reshape(shape)


def xnor_gemm_into(a, b, cnt, k, name="avx2", b_planes=None):
    """Write k - 2 * popcount(a[i] ^ b[j]) into ``cnt[i, j]`` with kernel ``name``
    (``"avx2"`` or ``"avx512bw"``, :data:`WORDS`).

    Expects what :func:`kernels.numba_cpu.xnor_gemm` has already checked and prepared:
    C-contiguous uint64 ``a`` (M, W) and ``b`` (N, W) with M, N, W >= 1 and zero padding
    bits, and ``cnt`` an int32 (M, N) array of zeros. ``b_planes``: B's
    :func:`nibble_planes` for this kernel, if made before (else they are made here).
    """
    m, w_count = a.shape
    n = b.shape[0]
    n_chunks = max(1, min(numba.get_num_threads(), m // _AR))
    words = WORDS[name]
    n_vec = (w_count + words - 1) // words
    pa = _planes_buffer("a", (m, n_vec, 2 * words))
    _nibble_planes(a, pa)
    if b_planes is None:
        pb = _planes_buffer("b", (n, n_vec, 2 * words))
        _nibble_planes(b, pb)
    else:
        if b_planes.shape != (n, n_vec, 2 * words) or b_planes.dtype != np.uint64 or \
                not b_planes.flags.c_contiguous:
            raise ValueError(f"b_planes: expected {name}'s nibble planes of shape "
                             f"{(n, n_vec, 2 * words)} (uint64, C order), got "
                             f"{b_planes.dtype} of shape {b_planes.shape}")
        pb = b_planes
    _drive(a, b, pa, pb, cnt, k, n_chunks, max(1, _KB_BITS // (64 * words)))
