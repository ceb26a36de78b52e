"""XNOR-popcount GEMM kernels built on LLVM vector popcount: ``"scalar"``, ``"simd256"``,
``"simd512"`` (lanes along K), ``"bcast256"`` and ``"bcast512"`` (lanes across rows of B:
see "broadcast kernels" below).

Selected through :func:`kernels.numba_cpu.xnor_gemm` (``kernel=`` one of these names, or
picked by :mod:`minibnn.kernels.autotune`); this module only computes, the checks and the
dispatch live in :mod:`minibnn.kernels.numba_cpu`.

Each kernel is one micro-kernel, written as LLVM IR through a Numba intrinsic, and one
blocked driver. The micro-kernel keeps an R x C tile of output pairs in registers and, for
a range of words of K, adds ``popcount(a_r ^ b_c)`` with ``llvm.ctpop`` on vectors of L
64-bit lanes:

* ``"simd512"``: L = 8 (``<8 x i64>``). LLVM lowers ``llvm.ctpop.v8i64`` to one
  ``vpopcntq zmm`` where the CPU has AVX512_VPOPCNTDQ, else to a nibble-table expansion
  (``vpshufb`` + ``vpsadbw``, Mula, Kurz and Lemire 2016). Offered when the CPU has AVX512F.
* ``"simd256"``: L = 4 (``<4 x i64>``): ``vpopcntq ymm`` with AVX512_VPOPCNTDQ + AVX512VL,
  else the nibble table on AVX2. Offered when the CPU has AVX2.
* ``"scalar"``: L = 1 (``i64``): one ``popcnt`` per word pair. Offered on every CPU.

The words of K past the last whole vector are counted inside the micro-kernel by one step
each of L/2, L/4, ..., 2 lanes where they remain, then one scalar word (13 words, MNIST's
784 inputs, take 8 + 4 + 1), so K need not be a multiple of 64 L bits. Lane sums are
64-bit and cannot overflow. At the end of its K range the micro-kernel sums the lanes of
all 16 counters at once by a shuffle tree (two counters share each 64-bit lane, so the
tree has 8 vectors to reduce, not 16: at K = 4096 a tile's 8 vector steps leave this
end a large share of its time) and writes its int32 tile itself, one vector store per
row (``k - 2 count`` in the last K block; the output is read only after the first K
block). The driver splits the work over
threads either by blocks of rows of A (``cols = False``) or by blocks of rows of B
(``cols = True``, for a few rows of A, e.g. the paper's training batch of 100), and blocks
over rows of B (a block stays in L2) and over K (a register tile's operands stay in L1);
rows and columns past the last whole tile go through
:func:`kernels._numba_common.pair_counts`. :func:`bitplane_gemm_into` runs the same
micro-kernels on an image's 8 bit planes (the first layer on 8-bit input).
"""

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from ._numba_common import jit, pair_counts, popcount64

__all__ = ["KERNELS", "LANES", "TILE", "BCAST", "xnor_gemm_into", "xnor_gemm_bcast_into",
           "split_over_b", "bitplane_gemm_into"]

TILE = (4, 4)  # R x C register tile: 16 accumulators + 8 operands fit the 32 zmm registers
LANES = {"scalar": 1, "simd256": 4, "simd512": 8}
KERNELS = tuple(LANES)
_KB_WORDS = 256  # words of K per cache block (16384 bits)
_L2_BLOCK = 256 * 1024  # bytes of B per cache block

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _unsupported_here(lanes):
    """True for 8-lane (512-bit) micro-kernels when Numba's target has no AVX512F: they are
    never offered there, and compile to an empty body so that the drivers that hold them
    beside the narrower kernels keep those kernels' code as it is alone (LLVM would split
    every 512-bit value of a 512-bit kernel into two and spill; under the Zen 3 profile the
    Harley-Seal driver holding both widths ran ``"hs256"`` at half its speed)."""
    if lanes != 8:
        return False
    from .autotune import isa_features
    return not isa_features()["features"]["avx512f"]


def _ctpop_name(lanes):
    """LLVM's name of the popcount intrinsic on ``lanes`` 64-bit lanes."""
    return "llvm.ctpop.i64" if lanes == 1 else f"llvm.ctpop.v{lanes}i64"


def _reduce_lanes(builder, vectors, lanes):
    """Horizontal sums of many vectors at once, by a shuffle tree: each step adds the two
    halves of every group of lanes of two neighbouring vectors, so the P vectors of L lanes
    become P / L vectors whose lane l of vector q is the sum of input vector q L + l
    (P L - P adds and shuffles instead of P (L - 1) extracts and adds)."""
    if lanes == 1:
        return vectors
    groups = 1  # groups of lanes per vector; a group holds one input vector's partial sums
    while groups < lanes:
        size = lanes // groups  # lanes per group now
        lo = [q * size + t for q in range(groups) for t in range(size // 2)]
        hi = [q * size + size // 2 + t for q in range(groups) for t in range(size // 2)]
        mask_lo = ir.Constant(ir.VectorType(_I32, lanes), lo + [lanes + i for i in lo])
        mask_hi = ir.Constant(ir.VectorType(_I32, lanes), hi + [lanes + i for i in hi])
        vectors = [builder.add(builder.shuffle_vector(x, y, mask_lo),
                               builder.shuffle_vector(x, y, mask_hi))
                   for x, y in zip(vectors[0::2], vectors[1::2])]
        groups *= 2
    return vectors


def _micro_kernel(lanes, rows, cols, epilogue=False):
    """A Numba intrinsic ``mk(a_addr, a_stride, b_addr, b_stride, w0, w1, out_addr)``:
    for the ``rows`` rows of A at byte address ``a_addr`` (row stride ``a_stride`` bytes)
    and the ``cols`` rows of B at ``b_addr``, store sum over words w in [w0, w1) of
    popcount(a[r, w] ^ b[c, w]) as int64 at ``out_addr[r * cols + c]``.

    With ``epilogue``, ``mk(..., w0, w1, out_addr, out_stride, k, mode)`` writes the int32
    result tile itself: ``v = count`` (plus the int32 already at ``out_addr + r out_stride +
    4 c`` unless ``mode & 1``, the first K block), then ``v = k - 2 v`` when ``mode & 2``
    (the last K block), a row of ``cols`` values per vector store: no zero-filled output,
    no separate pass over the counts."""
    vec = _I64 if lanes == 1 else ir.VectorType(_I64, lanes)

    def codegen(context, builder, signature, args):
        if _unsupported_here(lanes):
            return context.get_dummy_value()
        a_addr, a_stride, b_addr, b_stride, w0, w1, out_addr = args[:7]
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        ctpop_v = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec]), _ctpop_name(lanes))
        ctpop_s = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I64, [_I64]), _ctpop_name(1))

        def load(base, stride, row, w, ty):
            off = builder.add(builder.mul(c64(row), stride), builder.mul(w, c64(8)))
            ptr = builder.inttoptr(builder.add(base, off), ty.as_pointer())
            return builder.load(ptr, align=8)

        pairs = [(r, c) for r in range(rows) for c in range(cols)]
        zero_v = ir.Constant(vec, None)
        acc = {p: cgutils.alloca_once_value(builder, zero_v) for p in pairs}
        tail = {p: cgutils.alloca_once_value(builder, c64(0)) for p in pairs}
        n_vec = builder.udiv(builder.sub(w1, w0), c64(lanes))
        with cgutils.for_range(builder, n_vec) as loop:
            w = builder.add(w0, builder.mul(loop.index, c64(lanes)))
            av = [load(a_addr, a_stride, r, w, vec) for r in range(rows)]
            bv = [load(b_addr, b_stride, c, w, vec) for c in range(cols)]
            for r, c in pairs:
                cnt = builder.call(ctpop_v, [builder.xor(av[r], bv[c])])
                builder.store(builder.add(builder.load(acc[(r, c)]), cnt), acc[(r, c)])
        # the words past the last whole vector: one step each of L/2, L/4, ..., 2 lanes
        # where they remain (added to the L-lane counters, zero-extended), then one word
        cur = cgutils.alloca_once_value(builder, builder.add(w0, builder.mul(n_vec,
                                                                           c64(lanes))))
        width = lanes // 2
        while width >= 2:
            part = ir.VectorType(_I64, width)
            ctpop_p = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(part, [part]), _ctpop_name(width))
            widen = ir.Constant(ir.VectorType(_I32, lanes),
                                list(range(width)) + [width] * (lanes - width))
            w = builder.load(cur)
            with builder.if_then(builder.icmp_signed(">=", builder.sub(w1, w), c64(width))):
                av = [load(a_addr, a_stride, r, w, part) for r in range(rows)]
                bv = [load(b_addr, b_stride, c, w, part) for c in range(cols)]
                for r, c in pairs:
                    cnt = builder.call(ctpop_p, [builder.xor(av[r], bv[c])])
                    cnt = builder.shuffle_vector(cnt, ir.Constant(part, None), widen)
                    builder.store(builder.add(builder.load(acc[(r, c)]), cnt), acc[(r, c)])
                builder.store(builder.add(w, c64(width)), cur)
            width //= 2
        if lanes > 1:
            with cgutils.for_range_slice(builder, builder.load(cur), w1, c64(1)) as (w, _):
                av = [load(a_addr, a_stride, r, w, _I64) for r in range(rows)]
                bv = [load(b_addr, b_stride, c, w, _I64) for c in range(cols)]
                for r, c in pairs:
                    cnt = builder.call(ctpop_s, [builder.xor(av[r], bv[c])])
                    builder.store(builder.add(builder.load(tail[(r, c)]), cnt), tail[(r, c)])
        if lanes > 1:  # an odd last word: its counts join lane 0 of the counters
            has_tail = builder.icmp_signed("<", builder.load(cur), w1)
            with builder.if_then(has_tail, likely=False):
                for p in pairs:
                    v = builder.load(acc[p])
                    x = builder.add(builder.extract_element(v, c64(0)), builder.load(tail[p]))
                    builder.store(builder.insert_element(v, x, c64(0)), acc[p])
        vals = [builder.load(acc[p]) for p in pairs]
        if epilogue and lanes > 1 and len(pairs) % (2 * lanes) == 0:
            # two counters per 64-bit lane before the shuffle tree (pair 2q in the low
            # half, 2q + 1 in the high half; a K block's count is far below 2^32, so the
            # halves never carry into each other): half the vectors to reduce, and the
            # tree ends in int32 counts in pair order, ready to store
            shift = ir.Constant(vec, [32] * lanes)
            packed = [builder.add(vals[2 * q], builder.shl(vals[2 * q + 1], shift))
                      for q in range(len(pairs) // 2)]
            sums = [builder.bitcast(v, ir.VectorType(_I32, 2 * lanes))
                    for v in _reduce_lanes(builder, packed, lanes)]
            _store_tile(builder, sums, 2 * lanes, rows, cols, out_addr, *args[7:],
                        counts32=True)
        else:
            sums = _reduce_lanes(builder, vals, lanes)  # sums[q]: pairs qL ..
            if epilogue:
                _store_tile(builder, sums, lanes, rows, cols, out_addr, *args[7:])
            else:
                out = builder.inttoptr(out_addr, _I64.as_pointer())
                for q, v in enumerate(sums):
                    ptr = builder.bitcast(builder.gep(out, [c64(q * lanes)]), vec.as_pointer())
                    builder.store(v, ptr, align=8)
        return context.get_dummy_value()

    if epilogue:
        @intrinsic
        def mk(typingctx, a_addr, a_stride, b_addr, b_stride, w0, w1, out_addr, out_stride, k,
               mode):
            return types.void(*([types.intp] * 10)), codegen
    else:
        @intrinsic
        def mk(typingctx, a_addr, a_stride, b_addr, b_stride, w0, w1, out_addr):
            return types.void(*([types.intp] * 7)), codegen
    return mk


def _store_tile(builder, sums, lanes, rows, cols, out_addr, out_stride, k, mode,
                counts32=False):
    """The epilogue of an ``epilogue`` micro-kernel: per row of the tile, the ``cols`` int32
    counts as one vector, added to what the output holds unless ``mode & 1``, turned into
    ``k - 2 v`` when ``mode & 2``, and stored (unaligned) into the int32 output."""
    c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    row_t = ir.VectorType(_I32, cols)
    first = builder.icmp_unsigned("!=", builder.and_(mode, c64(1)), c64(0))
    final = builder.icmp_unsigned("!=", builder.and_(mode, c64(2)), c64(0))
    k32 = builder.trunc(k, _I32)
    kv = builder.insert_element(ir.Constant(row_t, ir.Undefined), k32, ir.Constant(_I32, 0))
    kv = builder.shuffle_vector(kv, ir.Constant(row_t, ir.Undefined),
                                ir.Constant(ir.VectorType(_I32, cols), [0] * cols))
    slots, ptrs = [], []
    for r in range(rows):
        if lanes == 1:
            v = ir.Constant(row_t, ir.Undefined)
            for c in range(cols):
                v = builder.insert_element(v, builder.trunc(sums[r * cols + c], _I32),
                                           ir.Constant(_I32, c))
        else:
            q, lane = divmod(r * cols, lanes)  # a row's cols counts lie in one vector
            wide = sums[q] if counts32 else builder.trunc(sums[q], ir.VectorType(_I32, lanes))
            v = builder.shuffle_vector(wide, ir.Constant(ir.VectorType(_I32, lanes), ir.Undefined),
                                       ir.Constant(ir.VectorType(_I32, cols),
                                                   list(range(lane, lane + cols))))
        slots.append(cgutils.alloca_once_value(builder, v))
        ptrs.append(builder.inttoptr(builder.add(out_addr, builder.mul(c64(r), out_stride)),
                                     row_t.as_pointer()))
    # the output is read only after the first K block (a branch, not a select: the first
    # block's store does not wait for a load of memory it overwrites)
    with builder.if_then(builder.not_(first), likely=False):
        for slot, ptr in zip(slots, ptrs):
            builder.store(builder.add(builder.load(slot), builder.load(ptr, align=4)), slot)
    for slot, ptr in zip(slots, ptrs):
        v = builder.load(slot)
        done = builder.sub(kv, builder.shl(v, ir.Constant(row_t, [1] * cols)))
        builder.store(builder.select(final, done, v), ptr, align=4)


_R, _C = TILE
_mk_scalar = _micro_kernel(1, _R, _C)
_mk_simd256 = _micro_kernel(4, _R, _C)
_mk_simd512 = _micro_kernel(8, _R, _C)
_mk_scalar_st = _micro_kernel(1, _R, _C, epilogue=True)
_mk_simd256_st = _micro_kernel(4, _R, _C, epilogue=True)
_mk_simd512_st = _micro_kernel(8, _R, _C, epilogue=True)


@jit(inline="always")
def _split(chunk, n_chunks, m, n, cols):
    """Row tiles [t0, t1) and columns [j0, j1) (j0 at a tile boundary) of one chunk."""
    tiles_i, tiles_j = m // _R, n // _C
    if cols:
        u0 = tiles_j * chunk // n_chunks
        u1 = tiles_j * (chunk + 1) // n_chunks
        return 0, tiles_i, u0 * _C, n if chunk == n_chunks - 1 else u1 * _C
    return tiles_i * chunk // n_chunks, tiles_i * (chunk + 1) // n_chunks, 0, n


@jit(parallel=True)
def _drive(a, b, cnt, k, lanes, n_chunks, cols, kb, nb):
    """The blocked, parallel driver of every micro-kernel (``lanes`` picks which: one
    compiled function for the three, the branch is taken once per tile and K block). The
    micro-kernels write ``cnt`` themselves, so it need not be zeroed."""
    m, w_count = a.shape
    n = b.shape[0]
    sa, sb, so = a.strides[0], b.strides[0], cnt.strides[0]
    a0, b0, o0 = a.ctypes.data, b.ctypes.data, cnt.ctypes.data
    tiles_i, jt_all = m // _R, n // _C * _C
    for chunk in prange(n_chunks):
        t0, t1, j0, j1 = _split(chunk, n_chunks, m, n, cols)
        jt = min(j1, jt_all)  # end of this chunk's whole column tiles
        for jb in range(j0, jt, nb):
            je = min(jb + nb, jt)
            for wb in range(0, w_count, kb):
                we = min(wb + kb, w_count)
                mode = (1 if wb == 0 else 0) | (2 if we == w_count else 0)
                for t in range(t0, t1):
                    i = t * _R
                    for j in range(jb, je, _C):
                        pa, pb, po = a0 + i * sa, b0 + j * sb, o0 + i * so + 4 * j
                        if lanes == 8:
                            _mk_simd512_st(pa, sa, pb, sb, wb, we, po, so, k, mode)
                        elif lanes == 4:
                            _mk_simd256_st(pa, sa, pb, sb, wb, we, po, so, k, mode)
                        else:
                            _mk_scalar_st(pa, sa, pb, sb, wb, we, po, so, k, mode)
        # pairs outside whole tiles: columns past the last whole column tile for this
        # chunk's row tiles; rows past the last whole row tile (chunk holding it) for j0..j1
        if j1 > jt_all:
            _fill(cnt, t0 * _R, t1 * _R, max(j0, jt_all), j1)
            pair_counts(a, b, t0 * _R, t1 * _R, max(j0, jt_all), j1, 0, w_count, cnt, k, True)
        if t1 == tiles_i:
            _fill(cnt, tiles_i * _R, m, j0, j1)
            pair_counts(a, b, tiles_i * _R, m, j0, j1, 0, w_count, cnt, k, True)


@jit(inline="always")
def _fill(cnt, i0, i1, j0, j1):
    """Zero cnt[i0:i1, j0:j1] (``pair_counts`` adds to what is there)."""
    for i in range(i0, i1):
        for j in range(j0, j1):
            cnt[i, j] = 0


def split_over_b(m, n, threads):
    """Whether the drivers split the threads over rows of B (not of A) for an (M, N)
    product: when A has fewer row tiles than threads x 4, or fewer rows than B."""
    return m // _R < 4 * threads or m < n


def xnor_gemm_into(name, a, b, cnt, k, cols=None, threads=None):
    """Write k - 2 popcount(a[i] ^ b[j]) into ``cnt[i, j]`` with kernel ``name``.

    Expects what :func:`kernels.numba_cpu.xnor_gemm` has checked and prepared: C-contiguous
    uint64 ``a`` (M, W) and ``b`` (N, W), M, N, W >= 1, zero padding bits, ``cnt`` int32
    (M, N) C-contiguous (its contents are overwritten, need not be zero). ``cols``: split
    the threads over rows of B (True) or of A (False); None asks ``split_over_b``: rows
    of B when A has fewer row tiles than there are threads x 4 or fewer rows than B. The
    threads then share B (each reads only its part of it), and the split is even where
    A's few row tiles would not divide evenly (the paper's batch of 100 is 25 row tiles:
    13 and 12 on 2 threads, where B's 1024 column tiles split 512 and 512; measured on a
    2-core Zen 4 at 100x4096x4096: 0.85 ms against 0.90).
    ``threads``: at most this many (default ``numba.get_num_threads()``).
    """
    m, w_count = a.shape
    n = b.shape[0]
    threads = numba.get_num_threads() if threads is None else threads
    if cols is None:
        cols = split_over_b(m, n, threads)
    n_chunks = max(1, min(threads, (n // _C) if cols else (m // _R)))
    kb = min(w_count, _KB_WORDS)
    nb = max(_C, _L2_BLOCK // (8 * kb) // _C * _C)
    _drive(a, b, cnt, k, LANES[name], n_chunks, bool(cols), kb, nb)


# ------------------------------------------------------------ broadcast kernels (B in panels)
#
# ``"bcast256"`` and ``"bcast512"`` vectorise across rows of B instead of along K. B is
# repacked, a few panels at a time, into panels of L rows (panel p holds word w of rows
# pL .. pL + L - 1 side by side), and the micro-kernel keeps R rows of A x P panels of
# counters, L lanes each: per word of K it broadcasts the R words of A, loads the P panel
# vectors and adds popcount(a ^ b) lane-wise, so every lane is one output pair. There is
# no sum across lanes at the end and no tail of K to treat apart (one word per step): the
# counters are the outputs. The tile's fixed cost is then its stores alone, which pays
# where K is short, as in a ConvNet's 3x3 patches (9 x 16 channels: 3 words; 9 x 128: 18
# words) where the lane-sum kernels above spend much of each tile summing lanes.

BCAST = {"bcast256": (4, 4, 2), "bcast512": (8, 4, 4)}  # lanes L, rows R, panels P


def _bcast_micro_kernel(lanes, rows, panels):
    """A Numba intrinsic ``mk(a_addr, a_stride, p_addr, p_stride, w_count, out_addr,
    out_stride, k, last)``: for the ``rows`` rows of A at ``a_addr`` (row stride in bytes)
    and the ``panels`` panels of B at ``p_addr`` (``p_stride`` bytes apart, W words of L
    lanes each), write the int32 ``k - 2 sum_w popcount(a[r, w] ^ b[c, w])`` to ``out_addr
    + r out_stride + 4 c`` for the tile's ``panels x L`` columns c, except that in the
    last panel only the first ``last`` columns are written (the rest lie past N)."""
    vec = ir.VectorType(_I64, lanes)
    row_t = ir.VectorType(_I32, lanes)

    def codegen(context, builder, signature, args):
        if _unsupported_here(lanes):
            return context.get_dummy_value()
        a_addr, a_stride, p_addr, p_stride, w_count, out_addr, out_stride, k, last = args
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        ctpop = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec]), _ctpop_name(lanes))
        zero = ir.Constant(vec, None)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(panels)]
               for _ in range(rows)]
        with cgutils.for_range(builder, w_count) as loop:
            w8 = builder.mul(loop.index, c64(8))
            av = []
            for r in range(rows):
                row = builder.add(a_addr, builder.mul(c64(r), a_stride))
                ptr = builder.inttoptr(builder.add(row, w8), _I64.as_pointer())
                word = builder.load(ptr, align=8)
                one = builder.insert_element(ir.Constant(vec, ir.Undefined), word, c64(0))
                av.append(builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                                 ir.Constant(ir.VectorType(_I32, lanes),
                                                             [0] * lanes)))
            for p in range(panels):
                base = builder.add(p_addr, builder.mul(c64(p), p_stride))
                ptr = builder.inttoptr(builder.add(base, builder.mul(w8, c64(lanes))),
                                       vec.as_pointer())
                bv = builder.load(ptr, align=8)
                for r in range(rows):
                    slot = acc[r][p]
                    cnt = builder.call(ctpop, [builder.xor(av[r], bv)])
                    builder.store(builder.add(builder.load(slot), cnt), slot)
        k32 = builder.trunc(k, _I32)
        kv = builder.insert_element(ir.Constant(row_t, ir.Undefined), k32, ir.Constant(_I32, 0))
        kv = builder.shuffle_vector(kv, ir.Constant(row_t, ir.Undefined),
                                    ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))
        whole = builder.icmp_signed(">=", last, c64(lanes))
        for r in range(rows):
            row_addr = builder.add(out_addr, builder.mul(c64(r), out_stride))
            for p in range(panels):
                v = builder.trunc(builder.load(acc[r][p]), row_t)
                v = builder.sub(kv, builder.shl(v, ir.Constant(row_t, [1] * lanes)))
                addr = builder.add(row_addr, c64(4 * lanes * p))
                if p < panels - 1:
                    builder.store(v, builder.inttoptr(addr, row_t.as_pointer()), align=4)
                    continue
                with builder.if_else(whole, likely=True) as (full, part):
                    with full:
                        builder.store(v, builder.inttoptr(addr, row_t.as_pointer()), align=4)
                    with part:  # the columns before N, one at a time
                        for c in range(lanes - 1):
                            with builder.if_then(builder.icmp_signed(">", last, c64(c))):
                                ptr = builder.inttoptr(builder.add(addr, c64(4 * c)),
                                                       _I32.as_pointer())
                                builder.store(builder.extract_element(v, c64(c)), ptr)
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, a_addr, a_stride, p_addr, p_stride, w_count, out_addr, out_stride, k,
           last):
        return types.void(*([types.intp] * 9)), codegen
    return mk


_RP256, _RP512 = BCAST["bcast256"][1:], BCAST["bcast512"][1:]  # (rows, panels) per tile
_mk_b256 = _bcast_micro_kernel(*BCAST["bcast256"])
_mk_b512 = _bcast_micro_kernel(*BCAST["bcast512"])
_mk_b256_1 = _bcast_micro_kernel(4, 1, 1)  # one row x one panel: the edges
_mk_b512_1 = _bcast_micro_kernel(8, 1, 1)


@jit(inline="always")
def _bcast_edge(lanes, pa, sa, pp, sp, w_count, po, so, k, whole, last):
    """One row of A against the ``whole`` panels at ``pp``, one panel at a time."""
    for q in range(whole):
        lq = last if q == whole - 1 else lanes
        if lanes == 8:
            _mk_b512_1(pa, sa, pp + q * sp, sp, w_count, po + 4 * q * lanes, so, k, lq)
        else:
            _mk_b256_1(pa, sa, pp + q * sp, sp, w_count, po + 4 * q * lanes, so, k, lq)


@jit(parallel=True)
def _drive_bcast(a, b, pan, cnt, k, lanes, n_chunks, cols):
    """The parallel driver of the broadcast kernels (``lanes`` 8: ``"bcast512"``, 4:
    ``"bcast256"``): tiles of R rows of A x P panels, the whole of K per tile; threads take
    blocks of panel groups (``cols``) or of row tiles. Unless ``pan`` holds B already in
    panel form (:func:`pack_panels`; an empty ``pan`` means not), a thread packs one group
    of P panels (P L rows of B: in L1 for K up to a few thousand bits) into its own small
    buffer and runs it past all its rows of A before the next group: no panel copy of the
    whole of B, no large allocation per call. A group of fewer panels (the last) and the
    rows past the last whole row tile go one row and one panel at a time."""
    m, w_count = a.shape
    n = cnt.shape[1]
    rows = _RP512[0] if lanes == 8 else _RP256[0]
    panels = _RP512[1] if lanes == 8 else _RP256[1]
    n_pan = (n + lanes - 1) // lanes
    groups = (n_pan + panels - 1) // panels
    sa, so, sp = a.strides[0], cnt.strides[0], 8 * w_count * lanes
    a0, o0 = a.ctypes.data, cnt.ctypes.data
    prepacked = pan.shape[0] > 0
    tiles = m // rows
    for chunk in prange(n_chunks):
        if cols:
            g0, g1 = groups * chunk // n_chunks, groups * (chunk + 1) // n_chunks
            t0, t1 = 0, tiles
        else:
            g0, g1 = 0, groups
            t0, t1 = tiles * chunk // n_chunks, tiles * (chunk + 1) // n_chunks
        buf = np.empty(0 if prepacked else panels * w_count * lanes, np.uint64)
        pp = buf.ctypes.data  # the group's panels
        for g in range(g0, g1):
            first = g * panels
            whole = min(panels, n_pan - first)  # panels in this group
            last = n - (first + whole - 1) * lanes  # columns of its last panel before N
            if prepacked:
                pp = pan.ctypes.data + first * sp
            else:
                _pack_group(b, buf, first, whole, lanes, w_count)
            po = o0 + 4 * first * lanes
            for t in range(t0, t1):
                i = t * rows
                if whole == panels:
                    if lanes == 8:
                        _mk_b512(a0 + i * sa, sa, pp, sp, w_count, po + i * so, so, k, last)
                    else:
                        _mk_b256(a0 + i * sa, sa, pp, sp, w_count, po + i * so, so, k, last)
                else:
                    for r in range(i, i + rows):
                        _bcast_edge(lanes, a0 + r * sa, sa, pp, sp, w_count, po + r * so, so,
                                    k, whole, last)
            if t1 == tiles:  # rows past the last whole row tile
                for r in range(tiles * rows, m):
                    _bcast_edge(lanes, a0 + r * sa, sa, pp, sp, w_count, po + r * so, so, k,
                                whole, last)


def xnor_gemm_bcast_into(name, a, b, cnt, k, cols=None, threads=None):
    """Write k - 2 popcount(a[i] ^ b[j]) into ``cnt[i, j]`` with broadcast kernel ``name``
    (``"bcast256"`` or ``"bcast512"``). Operands as :func:`xnor_gemm_into` takes them
    (``cnt`` may be a row-strided view); ``cols`` and ``threads`` as there. ``b`` may also
    be :func:`pack_panels`'s array for this kernel (B's N rows in panel form, made once for
    weights that many products reuse): then no group of B is packed during the call, and N
    is ``cnt.shape[1]``."""
    lanes, rows, panels = BCAST[name]
    m, n = a.shape[0], cnt.shape[1]
    if b.ndim == 3:
        if b.shape != (-(-n // lanes), a.shape[1], lanes) or b.dtype != np.uint64 or \
                not b.flags.c_contiguous:
            raise ValueError(f"b: expected {name}'s panels of shape "
                             f"{(-(-n // lanes), a.shape[1], lanes)} (uint64, C order) for "
                             f"N={n}, got {b.dtype} of shape {b.shape}")
        pan, b = b, np.empty((0, a.shape[1]), np.uint64)
    else:
        pan = _NO_PANELS
    threads = numba.get_num_threads() if threads is None else threads
    if cols is None:
        cols = split_over_b(m, n, threads)
    groups = -(-n // (lanes * panels))
    n_chunks = max(1, min(threads, groups if cols else m // rows))
    _drive_bcast(a, b, pan, cnt, k, lanes, n_chunks, bool(cols))


_NO_PANELS = np.empty((0, 0, 1), np.uint64)


@jit()
def _pack_group(b, buf, first, whole, lanes, w_count):
    """Panels ``first`` .. ``first + whole - 1`` of B into ``buf``: panel q, word w, lane l
    = b[(first + q) L + l, w]; lanes past N are 0 (counted, never stored)."""
    n = b.shape[0]
    for q in range(whole):
        for lane in range(lanes):
            j = (first + q) * lanes + lane
            base = q * w_count * lanes + lane
            if j < n:
                for w in range(w_count):
                    buf[base + w * lanes] = b[j, w]
            else:
                for w in range(w_count):
                    buf[base + w * lanes] = 0


def pack_panels(name, b):
    """B's rows (N, W) in broadcast kernel ``name``'s panel form, uint64 (ceil(N/L), W, L):
    panel p, word w, lane l holds b[p L + l, w] (0 past N). Made once for a frozen net's
    weights, it spares every product the copy that :func:`xnor_gemm_bcast_into` otherwise
    makes, one group of panels at a time (at 100 x 4096 x 4096 on a Zen 4 that copy took
    5-14% of the product's time in our runs)."""
    lanes = BCAST[name][0]
    b = np.ascontiguousarray(b, dtype=np.uint64)
    n, w_count = b.shape
    n_pan = -(-n // lanes)
    out = np.empty((n_pan, w_count, lanes), np.uint64)
    if n_pan:
        _pack_group(b, out.reshape(-1), 0, n_pan, lanes, w_count)
    return out


# ------------------------------------------------------------ 8-bit input by bit planes


@jit(parallel=True)
def _drive_planes(p, b, z, k, lanes, n_chunks, nb):
    """z[i, j] = 255 k - 2 sum_n 2^n popcount(p[8 i + n] ^ b[j]) with the micro-kernels: the
    4 x 4 tile takes planes 0-3, then 4-7, of one image against 4 rows of B, and the counts
    are weighted by 2^n as they leave the registers (no (8 M, N) partial products)."""
    m8, w_count = p.shape
    m, n = m8 // 8, b.shape[0]
    sp, sb = p.strides[0], b.strides[0]
    p0, b0 = p.ctypes.data, b.ctypes.data
    jt = n // _C * _C
    for chunk in prange(n_chunks):
        tmp = np.zeros(_R * _C, dtype=np.int64)
        tmp_addr = tmp.ctypes.data
        i0, i1 = m * chunk // n_chunks, m * (chunk + 1) // n_chunks
        for jb in range(0, jt, nb):
            je = min(jb + nb, jt)
            for i in range(i0, i1):
                for half in range(2):
                    pa = p0 + (8 * i + 4 * half) * sp
                    for j in range(jb, je, _C):
                        pb = b0 + j * sb
                        if lanes == 8:
                            _mk_simd512(pa, sp, pb, sb, 0, w_count, tmp_addr)
                        elif lanes == 4:
                            _mk_simd256(pa, sp, pb, sb, 0, w_count, tmp_addr)
                        else:
                            _mk_scalar(pa, sp, pb, sb, 0, w_count, tmp_addr)
                        for c in range(_C):
                            s = np.int64(0)
                            for r in range(_R):
                                s += tmp[r * _C + c] << (4 * half + r)
                            z[i, j + c] += np.int32(s)
        for i in range(i0, i1):
            for j in range(jt, n):  # columns past the last whole tile
                s = np.int64(0)
                for plane in range(8):
                    c = np.uint64(0)
                    for w in range(w_count):
                        c += popcount64(p[8 * i + plane, w] ^ b[j, w])
                    s += np.int64(c) << plane
                z[i, j] = np.int32(s)
            for j in range(n):
                z[i, j] = np.int32(255 * k) - 2 * z[i, j]


def bitplane_gemm_into(name, planes, b, z, k, threads=None):
    """Write sum_n 2^n (k - 2 popcount(planes[i, n] ^ b[j])) into ``z[i, j]`` with kernel
    ``name``: C-contiguous uint64 ``planes`` (M, 8, W) and ``b`` (N, W), M, N, W >= 1, zero
    padding bits, ``z`` int32 (M, N) C-contiguous and all zero (checked by the caller)."""
    m, _, w_count = planes.shape
    threads = numba.get_num_threads() if threads is None else threads
    n_chunks = max(1, min(threads, m))
    nb = max(_C, _L2_BLOCK // (8 * w_count) // _C * _C)
    _drive_planes(planes.reshape(8 * m, w_count), b, z, k, LANES[name], n_chunks, nb)
