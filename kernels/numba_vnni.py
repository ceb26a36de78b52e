"""uint8 x int8 -> int32 matrix product on AVX512-VNNI (``vpdpbusd``): the first layer on pixels.

A frozen network's first layer multiplies uint8 pixels by +-1 weights (Courbariaux et al.
2016, Section 1.6). Besides the paper's eight bit planes, an exact integer product does it
directly: ``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each group
of four products into one of 16 int32 lanes, 64 multiply-adds per instruction, which no
float32 FMA matches (16 per 512-bit instruction).

Layout. The weights (N, K) of +-1 (any int8 values work) are packed once by
:func:`pack_weights` into groups of 16 output columns: ``wp[g, q, 4 c + t] = w[16 g + c,
4 q + t]``, int8 (ceil(N/64) * 4, ceil(K/4), 64), zero past N and K. Pixels are copied into
a zero-padded buffer (rows to a multiple of 4, K to a multiple of 4). The micro-kernel
keeps a 4 x 4 tile of 4 rows x 4 column groups (64 columns) in 16 zmm accumulators: per 4
values of K it broadcasts each row's 4 pixels (one int32) and loads 4 weight vectors.
Offered where LLVM reports AVX512-VNNI and AVX512BW for the host (:func:`available`).
"""

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from ._numba_common import jit

__all__ = ["available", "pack_weights", "int8_gemm"]

_R, _G = 4, 4  # rows x 16-column groups per register tile
_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V8 = ir.VectorType(_I8, 64)
_V32 = ir.VectorType(_I32, 16)


def available():
    """True when Numba's target and this CPU both have AVX512-VNNI and AVX512BW
    (:func:`kernels.autotune.isa_features`)."""
    from .autotune import has

    return has("avx512_vnni") and has("avx512bw")


def _pixel_quads(builder, x_addr, x_stride, q, rows, lanes):
    """IR: for each of ``rows`` rows of pixels (``x_stride`` bytes apart), its 4 pixels at quad
    ``q`` (one int32) broadcast to ``lanes`` int32 lanes, as a vector of 4 ``lanes`` bytes.
    Shared with :mod:`minibnn.kernels.numba_madd`."""
    c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    v32 = ir.VectorType(_I32, lanes)
    splat = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
    out = []
    for r in range(rows):
        ptr = builder.add(x_addr, builder.add(builder.mul(c64(r), x_stride),
                                              builder.mul(q, c64(4))))
        word = builder.load(builder.inttoptr(ptr, _I32.as_pointer()), align=1)
        vec = builder.insert_element(ir.Constant(v32, ir.Undefined), word, ir.Constant(_I32, 0))
        vec = builder.shuffle_vector(vec, ir.Constant(v32, ir.Undefined), splat)
        out.append(builder.bitcast(vec, ir.VectorType(_I8, 4 * lanes)))
    return out


def _weight_vectors(builder, w_addr, w_gstride, q, groups, lanes):
    """IR: the 4 ``lanes`` weight bytes of each of ``groups`` column groups (``w_gstride``
    bytes apart) at quad ``q``."""
    c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    v8 = ir.VectorType(_I8, 4 * lanes)
    return [builder.load(builder.inttoptr(
        builder.add(w_addr, builder.add(builder.mul(c64(c), w_gstride),
                                        builder.mul(q, c64(4 * lanes)))), v8.as_pointer()),
        align=1) for c in range(groups)]


def _store_tile(builder, acc, rows, groups, out_addr, out_stride, lanes):
    """IR: the int32 accumulators ``acc[(r, c)]`` (allocas of ``lanes`` lanes) to
    ``out_addr + r out_stride + 4 lanes c``."""
    c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
    v32 = ir.VectorType(_I32, lanes)
    for r in range(rows):
        for c in range(groups):
            ptr = builder.add(out_addr, builder.add(builder.mul(c64(r), out_stride),
                                                    c64(4 * lanes * c)))
            builder.store(builder.load(acc[(r, c)]), builder.inttoptr(ptr, v32.as_pointer()),
                          align=4)


@intrinsic
def _mk_vnni(typingctx, x_addr, x_stride, w_addr, w_gstride, n_quads, out_addr, out_stride):
    """out[r, 16 c .. 16 c + 15] = sum over quads q of the 4-byte dot products of row r's
    pixels 4q..4q+3 with group c's weights at quad q (r, c < 4), int32, stored at out_addr."""
    sig = types.void(*([types.intp] * 7))

    def codegen(context, builder, signature, args):
        x_addr, x_stride, w_addr, w_gstride, n_quads, out_addr, out_stride = args
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32, [_V32, _V8, _V8]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        zero = ir.Constant(_V32, None)
        acc = {(r, c): cgutils.alloca_once_value(builder, zero)
               for r in range(_R) for c in range(_G)}
        with cgutils.for_range(builder, n_quads) as loop:
            xs = _pixel_quads(builder, x_addr, x_stride, loop.index, _R, 16)
            ws = _weight_vectors(builder, w_addr, w_gstride, loop.index, _G, 16)
            for r in range(_R):
                for c in range(_G):
                    a = acc[(r, c)]
                    builder.store(builder.call(dp, [builder.load(a), xs[r], ws[c]]), a)
        _store_tile(builder, acc, _R, _G, out_addr, out_stride, 16)
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
                    _mk_vnni(x0 + t * _R * sx, sx, w0 + g * sg, sg, n_quads,
                             o0 + t * _R * so + g * 64, so)


def pack_weights(w):
    """int8 weights (N, K) (+-1 for a binary layer) -> the (ceil(N/64) 4, ceil(K/4), 64)
    layout of the micro-kernel, zero padded."""
    return _pack_groups(w, 16, _G)


def _pack_groups(w, cols, groups):
    """int8 w (N, K) -> (ceil(N / (cols groups)) groups, ceil(K/4), 4 cols), zero padded:
    ``wp[g, q, 4 c + t] = w[cols g + c, 4 q + t]``. Shared with ``numba_madd``."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"w: expected int8 weights of shape (N, K), got {w.dtype} of shape "
                         f"{w.shape}")
    n, k = w.shape
    np_, kp = -(-n // (cols * groups)) * cols * groups, -(-k // 4) * 4
    padded = np.zeros((np_, kp), np.int8)
    padded[:n, :k] = w
    # [g, c, q, t] -> [g, q, c, t]: cols columns x 4 values of K per vector
    return np.ascontiguousarray(padded.reshape(np_ // cols, cols, kp // 4, 4)
                                .transpose(0, 2, 1, 3).reshape(np_ // cols, kp // 4, 4 * cols))


def int8_gemm(x, wp, n, out=None, x_buf=None):
    """s = x . w^T, int32 (M, N), for uint8 ``x`` (M, K) and ``wp`` from :func:`pack_weights`
    of int8 w (N, K), exact while the int32 sums cannot overflow: |s| <= 255 K max|w|, so
    K <= 65792 for any int8 weights and K < 8,421,504 for +-1 ones.

    ``out``: an int32 (ceil(M/4) 4, ceil(N/64) 64) C-contiguous buffer to reuse (the result is a
    view of it); ``x_buf``: a uint8 (ceil(M/4) 4, 4 ceil(K/4)) one for the padded pixels.
    """
    if not available():
        raise RuntimeError("int8_gemm needs a CPU with AVX512-VNNI and AVX512BW")
    return _product(x, wp, n, out, x_buf, _drive, 16, _G, "pack_weights")


def _product(x, wp, n, out, x_buf, drive, cols, groups, packer):
    """The checks, padding and launch of an int8 product whose micro-kernel takes ``_R`` rows
    x ``groups`` groups of ``cols`` columns (``drive``: its parallel driver; ``packer``: the
    function's name for messages). Shared with ``numba_madd``."""
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype != np.uint8:
        raise ValueError(f"x: expected uint8 pixels of shape (M, K), got {x.dtype} of shape "
                         f"{x.shape}")
    m, k = x.shape
    n_groups, quads = wp.shape[:2]
    if wp.dtype != np.int8 or wp.ndim != 3 or wp.shape[2] != 4 * cols or \
            quads != -(-k // 4) or n_groups * cols < n or n_groups % groups:
        raise ValueError(f"wp: expected packed int8 weights for K = {k} and N = {n} from "
                         f"{packer}, got {wp.dtype} of shape {wp.shape}")
    mp, kp = -(-m // _R) * _R, 4 * quads
    xp = np.zeros((mp, kp), np.uint8) if x_buf is None else x_buf
    if xp.shape != (mp, kp) or xp.dtype != np.uint8:
        raise ValueError(f"x_buf: expected uint8 of shape {(mp, kp)}, got {xp.dtype} {xp.shape}")
    xp[:m, :k] = x
    if x_buf is not None:
        xp[m:] = 0
        xp[:m, k:] = 0
    shape = (mp, n_groups * cols)
    if out is None:
        out = np.empty(shape, np.int32)
    elif out.shape != shape or out.dtype != np.int32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous int32 array of shape {shape}, got "
                         f"{out.dtype} of shape {out.shape}")
    if mp and n_groups:
        threads = numba.get_num_threads() if mp * n_groups * quads >= 1 << 14 else 1
        n_chunks = max(1, min(threads, mp // _R))
        nb = max(groups, (256 * 1024) // (4 * cols * max(1, quads)) // groups * groups)
        drive(xp, wp, out, n_chunks, nb)
    return out[:m, :n]
