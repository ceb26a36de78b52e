"""uint8 x {-1, 0, +1} -> int32 matrix product on AVX2 (``vpmaddubsw``): the first layer on
pixels for CPUs without VNNI.

The frozen first layer multiplies uint8 pixels by +-1 weights (Courbariaux et al. 2016,
Section 1.6). Where the CPU has AVX512-VNNI, :mod:`minibnn.kernels.numba_vnni` does it with
``vpdpbusd``; an AVX2-only CPU (an AMD Zen 3, say) has the older pair of instructions that
int8 GEMM libraries used before VNNI (Intel's "Lower Numerical Precision Deep Learning
Inference and Training", 2018, describes it for AVX-512):

* ``vpmaddubsw`` multiplies 32 unsigned bytes by 32 signed bytes and adds adjacent pairs into
  16 int16 lanes, *saturating*. With weights in {-1, 0, +1} a pair is at most 2 x 255 = 510
  in magnitude, so nothing saturates, and 64 of them (32,640) still fit an int16 lane: the
  kernel adds the pairs in int16 (``vpaddw``) for up to 64 groups of 4 inputs;
* then ``vpmaddwd`` against ones widens adjacent int16 lanes into int32 sums, added into
  int32 accumulators once per 64 groups.

That is two instructions per 32 multiply-adds in the inner loop, where float32 FMAs do 8 per
instruction. Restricted to weights in {-1, 0, +1} (checked by :func:`pack_weights`): larger
ones could saturate ``vpmaddubsw``.

Layout. The weights (N, K) are packed once into groups of 8 output columns: ``wp[g, q, 4 c +
t] = w[8 g + c, 4 q + t]``, int8 (ceil(N/16) * 2, ceil(K/4), 32), zero past N and K. Pixels
are copied into a zero-padded buffer (rows to a multiple of 4, K to a multiple of 4). The
micro-kernel keeps 4 rows x 2 column groups (16 columns) in 8 int16 accumulators (with the
4 broadcast pixel words and 2 weight vectors, 14 of the 16 ymm registers): per 4 values of
K it broadcasts each row's 4 pixels (one int32) and loads 2 weight vectors. Offered where
LLVM reports AVX2 for the host (:func:`available`).
"""

import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from ._numba_common import jit
from .numba_vnni import _R, _pack_groups, _pixel_quads, _product, _store_tile, _weight_vectors

__all__ = ["available", "pack_weights", "int8_gemm"]

_G = 2  # rows (numba_vnni's _R, 4) x 8-column groups per register tile
_COLS = 8  # output columns per 32-byte weight vector (4 values of K each)
_BLOCK = 64  # groups of 4 inputs added in int16 before widening: 64 x 510 < 2^15
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V8 = ir.VectorType(_I8, 32)
_V16 = ir.VectorType(_I16, 16)
_V32 = ir.VectorType(_I32, 8)


def available():
    """True when Numba's target and this CPU both have AVX2
    (:func:`kernels.autotune.isa_features`)."""
    from .autotune import has

    return has("avx2")


@intrinsic
def _mk_madd(typingctx, x_addr, x_stride, w_addr, w_gstride, n_quads, out_addr, out_stride):
    """out[r, 8 c .. 8 c + 7] = sum over quads q of the 4-byte dot products of row r's
    pixels 4q..4q+3 with group c's weights at quad q (r < 4, c < 2), int32, stored at
    out_addr (row stride out_stride bytes)."""
    sig = types.void(*([types.intp] * 7))

    def codegen(context, builder, signature, args):
        x_addr, x_stride, w_addr, w_gstride, n_quads, out_addr, out_stride = args
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        mod = builder.module
        maddubs = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_V16, [_V8, _V8]), "llvm.x86.avx2.pmadd.ub.sw")
        maddwd = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_V32, [_V16, _V16]), "llvm.x86.avx2.pmadd.wd")
        ones = ir.Constant(_V16, [1] * 16)
        tiles = [(r, c) for r in range(_R) for c in range(_G)]
        acc32 = {rc: cgutils.alloca_once_value(builder, ir.Constant(_V32, None)) for rc in tiles}
        acc16 = {rc: cgutils.alloca_once_value(builder, ir.Constant(_V16, None)) for rc in tiles}
        n_blocks = builder.udiv(builder.add(n_quads, c64(_BLOCK - 1)), c64(_BLOCK))
        with cgutils.for_range(builder, n_blocks) as blocks:
            q0 = builder.mul(blocks.index, c64(_BLOCK))
            q1 = builder.add(q0, c64(_BLOCK))
            q1 = builder.select(builder.icmp_signed("<", q1, n_quads), q1, n_quads)
            for rc in tiles:
                builder.store(ir.Constant(_V16, None), acc16[rc])
            with cgutils.for_range_slice(builder, q0, q1, c64(1)) as (q, _):
                xs = _pixel_quads(builder, x_addr, x_stride, q, _R, _COLS)
                ws = _weight_vectors(builder, w_addr, w_gstride, q, _G, _COLS)
                for r, c in tiles:
                    pairs = builder.call(maddubs, [xs[r], ws[c]])  # unsigned x signed
                    builder.store(builder.add(builder.load(acc16[(r, c)]), pairs), acc16[(r, c)])
            for rc in tiles:  # widen: adjacent int16 lanes into one int32 (4 inputs a column)
                wide = builder.call(maddwd, [builder.load(acc16[rc]), ones])
                builder.store(builder.add(builder.load(acc32[rc]), wide), acc32[rc])
        _store_tile(builder, acc32, _R, _G, out_addr, out_stride, _COLS)
        return context.get_dummy_value()

    return sig, codegen


@jit(parallel=True)
def _drive(xp, wp, out, n_chunks, nb):
    mp, kp = xp.shape
    groups, n_quads = wp.shape[0], wp.shape[1]
    sx, sg, so = xp.strides[0], wp.strides[0], out.strides[0]
    x0, w0, o0 = xp.ctypes.data, wp.ctypes.data, out.ctypes.data
    tiles = mp // _R
    for chunk in prange(n_chunks):
        t0, t1 = tiles * chunk // n_chunks, tiles * (chunk + 1) // n_chunks
        for gb in range(0, groups, nb):  # a block of weight groups stays in L2
            ge = min(gb + nb, groups)
            for t in range(t0, t1):
                for g in range(gb, ge, _G):
                    _mk_madd(x0 + t * _R * sx, sx, w0 + g * sg, sg, n_quads,
                             o0 + t * _R * so + g * 4 * _COLS, so)


def pack_weights(w):
    """int8 weights (N, K) in {-1, 0, +1} -> the (ceil(N/16) 2, ceil(K/4), 32) layout of the
    micro-kernel, zero padded."""
    w = np.asarray(w)
    if w.ndim == 2 and w.dtype == np.int8 and w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("w: expected weights in {-1, 0, +1} (larger ones could saturate "
                         f"vpmaddubsw), got values from {w.min()} to {w.max()}")
    return _pack_groups(w, _COLS, _G)


def int8_gemm(x, wp, n, out=None, x_buf=None):
    """s = x . w^T, int32 (M, N), for uint8 ``x`` (M, K) and ``wp`` from :func:`pack_weights`
    of w (N, K) in {-1, 0, +1}: exact (|s| <= 255 K).

    ``out``: an int32 (ceil(M/4) 4, ceil(N/16) 16) C-contiguous buffer to reuse (the result
    is a view of it); ``x_buf``: a uint8 (ceil(M/4) 4, 4 ceil(K/4)) one for the padded pixels.
    """
    if not available():
        raise RuntimeError("numba_madd.int8_gemm needs a CPU with AVX2")
    return _product(x, wp, n, out, x_buf, _drive, _COLS, _G, "numba_madd.pack_weights")
