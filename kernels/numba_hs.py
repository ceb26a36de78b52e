"""Harley-Seal XNOR-popcount GEMM kernels ``"hs256"`` and ``"hs512"``, for long K on CPUs
without a vector popcount instruction.

Selected through :func:`kernels.numba_cpu.xnor_gemm` (``kernel="hs256"``, offered with AVX2;
``"hs512"``, offered with AVX512F), or by :mod:`minibnn.kernels.autotune` where they win;
this module only computes, the checks and the dispatch live in
:mod:`minibnn.kernels.numba_cpu`.

Where a CPU has no ``vpopcntq`` (AVX2-only CPUs, or AVX-512 without VPOPCNTDQ such as Intel
Cascade Lake), a vector popcount costs about ten instructions (the nibble-table expansion).
Harley and Seal's method, applied to popcounts by Muła, Kurz and Lemire ("Faster population
counts using AVX2 instructions", Computer Journal 61(1), 2018, section 4), counts fewer of
them: a carry-save adder, CSA(a, b, c) = (majority(a, b, c), a ^ b ^ c), adds three bit
vectors into a "twos" and a "ones" vector without losing a bit, so a tree of CSAs turns 8
vectors into one vector of "eights" plus running "ones", "twos" and "fours" vectors, and
only the eights are counted, one popcount per 8 vectors:

    popcount(all) = 8 sum popcount(eights) + 4 popcount(fours) + 2 popcount(twos) + popcount(ones)

With AVX-512 each CSA half is one ``vpternlogq`` (LLVM forms it from the xor/and/or below).
The running vectors are counted once at the end of the micro-kernel's K range, so the
saving needs many vectors per output pair: the kernels do not block K (the whole row is one
range; a 2 x 2 tile's rows of A stay in L1 while rows of B stream past). For K = 4096 (8
zmm vectors per row) the final count of the running vectors costs about what the CSAs save:
compiled for a Cascade Lake's ISA and run on a Zen 4 (``bench_gemm.py --isa cascadelake``)
``"hs256"`` was within 10% of the nibble-table ``"avx2"`` at 4096^3 and 1.7x it at K =
65536; with ``vpopcntq`` the ``simd*`` kernels are 2-3x faster than either. The autotune's
shape classes (:func:`kernels.autotune.shape_class`) keep a class for K of 256 words and more.

Micro-kernel: a 2 x 2 tile of output pairs, 4 running vectors each (ones, twos, fours and
the eights' count), on vectors of L = 4 (``"hs256"``) or 8 (``"hs512"``) 64-bit lanes;
vectors past the last whole group of 8 are counted with ``llvm.ctpop`` directly, words past
the last whole vector one at a time. It writes the int32 results ``k - 2 count`` itself.
"""

import numba
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from ._numba_common import jit, pair_counts
from .numba_simd import _ctpop_name, _fill, _store_tile, _unsupported_here, split_over_b

__all__ = ["KERNELS", "LANES", "TILE", "xnor_gemm_into"]

LANES = {"hs256": 4, "hs512": 8}
KERNELS = tuple(LANES)
TILE = (2, 2)  # 4 pairs x 4 running vectors + operands fit 32 vector registers
_GROUP = 8  # vectors folded into one "eights" vector

_I64 = ir.IntType(64)


def _hs_micro_kernel(lanes, rows, cols):
    """A Numba intrinsic ``mk(a_addr, a_stride, b_addr, b_stride, w0, w1, out_addr,
    out_stride, k)``: for the ``rows`` rows of A at byte address ``a_addr`` (row stride in
    bytes) and the ``cols`` rows of B at ``b_addr``, write the int32 ``k - 2 sum_{w in [w0,
    w1)} popcount(a[r, w] ^ b[c, w])`` to ``out_addr + r out_stride + 4 c``."""
    vec = ir.VectorType(_I64, lanes)

    def codegen(context, builder, signature, args):
        if _unsupported_here(lanes):
            return context.get_dummy_value()
        a_addr, a_stride, b_addr, b_stride, w0, w1, out_addr, out_stride, k = args
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        ctpop_v = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec]), _ctpop_name(lanes))
        ctpop_s = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I64, [_I64]), _ctpop_name(1))
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I64, [vec]), f"llvm.vector.reduce.add.v{lanes}i64")

        def load(base, stride, row, w, ty):
            off = builder.add(builder.mul(c64(row), stride), builder.mul(w, c64(8)))
            return builder.load(builder.inttoptr(builder.add(base, off), ty.as_pointer()),
                                align=8)

        def operands(w, ty):
            """xor of every pair's operands at word w: {pair: a_r ^ b_c}."""
            av = [load(a_addr, a_stride, r, w, ty) for r in range(rows)]
            bv = [load(b_addr, b_stride, c, w, ty) for c in range(cols)]
            return {(r, c): builder.xor(av[r], bv[c]) for r in range(rows) for c in range(cols)}

        def csa(a, b, c):
            """(carries, sums) of a + b + c bit by bit: (majority, a ^ b ^ c)."""
            u = builder.xor(a, b)
            return builder.or_(builder.and_(a, b), builder.and_(u, c)), builder.xor(u, c)

        pairs = [(r, c) for r in range(rows) for c in range(cols)]
        zero = ir.Constant(vec, None)
        state = {(p, name): cgutils.alloca_once_value(builder, zero)
                 for p in pairs for name in ("ones", "twos", "fours", "eights", "rest")}
        tail = {p: cgutils.alloca_once_value(builder, c64(0)) for p in pairs}
        get = lambda p, name: builder.load(state[(p, name)])  # noqa: E731
        put = lambda p, name, v: builder.store(v, state[(p, name)])  # noqa: E731

        n_vec = builder.udiv(builder.sub(w1, w0), c64(lanes))
        n_grp = builder.udiv(n_vec, c64(_GROUP))
        with cgutils.for_range(builder, n_grp) as loop:
            base = builder.add(w0, builder.mul(loop.index, c64(_GROUP * lanes)))
            at = lambda s: builder.add(base, c64(s * lanes))  # noqa: E731
            twos_a, fours_a = {}, {}
            for s in range(0, _GROUP, 2):  # the tree: 4 CSAs into ones, 2 into twos, 1 into fours
                d0, d1 = operands(at(s), vec), operands(at(s + 1), vec)
                for p in pairs:
                    carry, ones = csa(get(p, "ones"), d0[p], d1[p])
                    put(p, "ones", ones)
                    if s % 4 == 0:
                        twos_a[p] = carry
                        continue
                    carry, twos = csa(get(p, "twos"), twos_a[p], carry)
                    put(p, "twos", twos)
                    if s == 2:
                        fours_a[p] = carry
                        continue
                    eights, fours = csa(get(p, "fours"), fours_a[p], carry)
                    put(p, "fours", fours)
                    put(p, "eights", builder.add(get(p, "eights"), builder.call(ctpop_v, [eights])))
        done = builder.add(w0, builder.mul(builder.mul(n_grp, c64(_GROUP)), c64(lanes)))
        end_vec = builder.add(w0, builder.mul(n_vec, c64(lanes)))
        with cgutils.for_range_slice(builder, done, end_vec, c64(lanes)) as (w, _):
            d = operands(w, vec)
            for p in pairs:
                put(p, "rest", builder.add(get(p, "rest"), builder.call(ctpop_v, [d[p]])))
        with cgutils.for_range_slice(builder, end_vec, w1, c64(1)) as (w, _):
            d = operands(w, _I64)
            for p in pairs:
                builder.store(builder.add(builder.load(tail[p]), builder.call(ctpop_s, [d[p]])),
                              tail[p])
        totals = []
        for p in pairs:
            count = builder.shl(get(p, "eights"), ir.Constant(vec, [3] * lanes))
            for name, shift in (("fours", 2), ("twos", 1), ("ones", 0)):
                part = builder.call(ctpop_v, [get(p, name)])
                count = builder.add(count, builder.shl(part, ir.Constant(vec, [shift] * lanes)))
            count = builder.add(count, get(p, "rest"))
            totals.append(builder.add(builder.call(reduce_add, [count]), builder.load(tail[p])))
        _store_tile(builder, totals, 1, rows, cols, out_addr, out_stride, k, c64(3))
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, a_addr, a_stride, b_addr, b_stride, w0, w1, out_addr, out_stride, k):
        return types.void(*([types.intp] * 9)), codegen

    return mk


_R, _C = TILE


_mk_hs256 = _hs_micro_kernel(4, _R, _C)
_mk_hs512 = _hs_micro_kernel(8, _R, _C)


@jit(parallel=True)
def _drive(a, b, cnt, k, lanes, n_chunks, cols, nb):
    """The parallel driver of both micro-kernels (``lanes`` picks which; one module-level
    function, so that numba caches it on disk): threads take blocks of row tiles of A
    (``cols = False``) or of row tiles of B (``cols = True``, for a few rows of A); B is
    walked in blocks of ``nb`` rows, the whole of K per tile."""
    m, w_count = a.shape
    n = b.shape[0]
    sa, sb, so = a.strides[0], b.strides[0], cnt.strides[0]
    a0, b0, o0 = a.ctypes.data, b.ctypes.data, cnt.ctypes.data
    tiles_i, tiles_j = m // _R, n // _C
    jt_all = tiles_j * _C
    for chunk in prange(n_chunks):
        if cols:
            t0, t1 = 0, tiles_i
            j0 = tiles_j * chunk // n_chunks * _C
            j1 = n if chunk == n_chunks - 1 else tiles_j * (chunk + 1) // n_chunks * _C
        else:
            t0, t1 = tiles_i * chunk // n_chunks, tiles_i * (chunk + 1) // n_chunks
            j0, j1 = 0, n
        jt = min(j1, jt_all)
        for jb in range(j0, jt, nb):
            je = min(jb + nb, jt)
            for t in range(t0, t1):
                i = t * _R
                for j in range(jb, je, _C):
                    if lanes == 8:
                        _mk_hs512(a0 + i * sa, sa, b0 + j * sb, sb, 0, w_count,
                                  o0 + i * so + 4 * j, so, k)
                    else:
                        _mk_hs256(a0 + i * sa, sa, b0 + j * sb, sb, 0, w_count,
                                  o0 + i * so + 4 * j, so, k)
        if j1 > jt_all:  # columns past the last whole column tile
            _fill(cnt, t0 * _R, t1 * _R, max(j0, jt_all), j1)
            pair_counts(a, b, t0 * _R, t1 * _R, max(j0, jt_all), j1, 0, w_count, cnt, k, True)
        if t1 == tiles_i:  # rows past the last whole row tile
            _fill(cnt, tiles_i * _R, m, j0, j1)
            pair_counts(a, b, tiles_i * _R, m, j0, j1, 0, w_count, cnt, k, True)


def xnor_gemm_into(name, a, b, cnt, k, threads=None):
    """Write k - 2 popcount(a[i] ^ b[j]) into ``cnt[i, j]`` with kernel ``name``.

    Expects what :func:`kernels.numba_cpu.xnor_gemm` has checked and prepared: C-contiguous
    uint64 ``a`` (M, W) and ``b`` (N, W), M, N, W >= 1, zero padding bits, ``cnt`` int32
    (M, N) C-contiguous (overwritten). ``threads``: at most this many (default
    ``numba.get_num_threads()``); they split rows of B as ``numba_simd.split_over_b``
    says.
    """
    m, w_count = a.shape
    n = b.shape[0]
    threads = numba.get_num_threads() if threads is None else threads
    cols = split_over_b(m, n, threads)
    n_chunks = max(1, min(threads, (n // _C) if cols else (m // _R)))
    nb = max(_C, (256 * 1024) // (8 * w_count) // _C * _C)  # a block of B fits in L2
    _drive(a, b, cnt, k, LANES[name], n_chunks, cols, nb)
