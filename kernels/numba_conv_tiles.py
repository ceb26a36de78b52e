"""Register-tiled micro-kernels for the backward of a binary convolution on the CPU.

:func:`kernels.numba_conv.binary_conv2d_backward` lays a few images out as zero-bordered,
flattened planes, so that every kernel tap is a shift of the flattened stack (see the
comment above ``numba_conv._conv_backward``). Its plain loops make one pass over a whole
plane per tap and per output channel: every product reads its operands from L2 and writes
its partial sum back, so the loops run at the speed of the cache, not of the arithmetic.
The micro-kernels here keep a block of results in vector registers while they run over
everything that adds into it, so each operand they load serves several products:

* ``gx``: an input-gradient block of ``CG`` channels x ``U`` vectors of positions. For each
  tap (i, j) row-major, ``S = 0``, then ``S = S + w[o, c, i, j] * gpad[o](t + off_ij)`` for
  o ascending, then ``acc = acc + S``: the order of the plain loops and of the reference
  (BLAS's sum over O per column entry, then col2im's row-major sum over taps), one rounding
  per product and per sum, no fused multiply-add, so the input gradient is the same bit for
  bit. Per o it loads ``U`` vectors of the gradient and ``CG`` weights (broadcast) and does
  ``CG x U`` multiply-adds.
* ``gw``: a weight-gradient block of ``OG`` output channels x ``TB`` taps of one input
  channel, summed over all positions: per vector of positions it loads ``OG`` vectors of the
  gradient and ``TB`` shifted vectors of the input and does ``OG x TB`` multiply-adds into
  as many vector accumulators; their lanes are added in a fixed order at the end (the plain
  loops' order is free here too: ``fastmath`` reassociation).

Both are LLVM IR through Numba intrinsics (as :mod:`kernels.numba_simd`), on vectors of the
width the CPU has: 64 bytes with AVX-512F (32 registers: ``CG x U = 4 x 1`` and ``OG x TB =
4 x 3``), else 32 bytes (16 registers: ``4 x 1`` and ``2 x 3``); ``SHAPES`` says why these.
Operands are addresses. The driver pads the input-gradient planes so that a whole block
can be read and written past the last input pixel (results there are dropped), sums the
weight gradient's last ``len % lanes`` positions in scalar code, and pads the channels to
multiples of ``CG`` and ``OG`` (zero weights, zero gradient rows). Measured on a 2-core
Zen 4 (CPU time, the MNIST ConvNet's 16-channel 28x28 layer, batch 100, both gradients):
11.4 ms against 24.1 ms for the plain loops.
"""

import threading

import numba
import numpy as np
from numba import prange
from numba.core import cgutils
from numba.extending import intrinsic
from numba import types
from llvmlite import ir

from ._numba_common import jit

__all__ = ["CHUNK", "SHAPES", "TILES", "Tiles", "tiles_for", "to_planes"]

_I64 = ir.IntType(64)


def _splat(builder, value, vec):
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(_I64, 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vec.count),
                                              [0] * vec.count))


def _gx_kernel(ftype, lanes, cg, u):
    """``mk(g_addr, g_row, w_addr, w_o, n_o, n_taps, offs_addr, out_addr, out_row)``.

    ``g_addr``: the gradient plane of channel 0 at the block's first position (rows ``g_row``
    bytes apart, one per output channel); ``w_addr``: the weight of tap 0, output channel 0
    and the block's first input channel, in weights laid out as [tap][o][c] (``w_o`` bytes
    from one o to the next, the block's ``cg`` channels side by side); ``offs_addr``: int64
    element offset of each tap; ``out_addr``: the block's first result (``out_row`` bytes to
    the next channel). Writes ``cg`` rows of ``u * lanes`` results."""
    vec = ir.VectorType(ftype, lanes)
    size = 4 if isinstance(ftype, ir.FloatType) else 8

    def codegen(context, builder, signature, args):
        g_addr, g_row, w_addr, w_o, n_o, n_taps, offs_addr, out_addr, out_row = args
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        zero = ir.Constant(vec, None)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(u)] for _ in range(cg)]
        part = [[cgutils.alloca_once_value(builder, zero) for _ in range(u)] for _ in range(cg)]
        with cgutils.for_range(builder, n_taps) as taps:
            tap = taps.index
            off = builder.load(builder.inttoptr(builder.add(offs_addr, builder.mul(tap, c64(8))),
                                                _I64.as_pointer()))
            base = builder.add(g_addr, builder.mul(off, c64(size)))
            w_tap = builder.add(w_addr, builder.mul(builder.mul(tap, n_o), w_o))
            for row in part:
                for slot in row:
                    builder.store(zero, slot)
            with cgutils.for_range(builder, n_o) as outs:
                o = outs.index
                row_addr = builder.add(base, builder.mul(o, g_row))
                a = [builder.load(builder.inttoptr(builder.add(row_addr, c64(v * lanes * size)),
                                                   vec.as_pointer()), align=size)
                     for v in range(u)]
                w_at = builder.add(w_tap, builder.mul(o, w_o))
                for c in range(cg):
                    w = builder.load(builder.inttoptr(builder.add(w_at, c64(c * size)),
                                                      ftype.as_pointer()))
                    wv = _splat(builder, w, vec)
                    for v in range(u):
                        slot = part[c][v]
                        prod = builder.fmul(wv, a[v])
                        builder.store(builder.fadd(builder.load(slot), prod), slot)
            for c in range(cg):
                for v in range(u):
                    total = builder.fadd(builder.load(acc[c][v]), builder.load(part[c][v]))
                    builder.store(total, acc[c][v])
        for c in range(cg):
            row_addr = builder.add(out_addr, builder.mul(c64(c), out_row))
            for v in range(u):
                ptr = builder.inttoptr(builder.add(row_addr, c64(v * lanes * size)),
                                       vec.as_pointer())
                builder.store(builder.load(acc[c][v]), ptr, align=size)
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, g_addr, g_row, w_addr, w_o, n_o, n_taps, offs_addr, out_addr, out_row):
        return types.void(*([types.intp] * 9)), codegen
    return mk


def _gw_kernel(ftype, lanes, og, tb):
    """``mk(g_addr, g_row, x_addr, offs_addr, n_vec, out_addr)``: for the ``og`` gradient
    rows at ``g_addr`` (``g_row`` bytes apart) and the ``tb`` taps whose int64 element offsets
    are at ``offs_addr``, the lane-wise sums over ``n_vec`` vectors of positions of
    ``g[o](t) * x(t + off)``, stored as ``og x tb`` vectors at ``out_addr`` (o major)."""
    vec = ir.VectorType(ftype, lanes)
    size = 4 if isinstance(ftype, ir.FloatType) else 8

    def codegen(context, builder, signature, args):
        g_addr, g_row, x_addr, offs_addr, n_vec, out_addr = args
        c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        zero = ir.Constant(vec, None)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(tb)] for _ in range(og)]
        x_base = []
        for k in range(tb):
            off = builder.load(builder.inttoptr(builder.add(offs_addr, c64(8 * k)),
                                                _I64.as_pointer()))
            x_base.append(builder.add(x_addr, builder.mul(off, c64(size))))
        with cgutils.for_range(builder, n_vec) as loop:
            t = builder.mul(loop.index, c64(lanes * size))
            g = [builder.load(builder.inttoptr(builder.add(g_addr, builder.add(
                builder.mul(c64(o), g_row), t)), vec.as_pointer()), align=size)
                 for o in range(og)]
            for k in range(tb):
                x = builder.load(builder.inttoptr(builder.add(x_base[k], t), vec.as_pointer()),
                                 align=size)
                for o in range(og):
                    slot = acc[o][k]
                    builder.store(builder.fadd(builder.load(slot), builder.fmul(g[o], x)), slot)
        for o in range(og):
            for k in range(tb):
                ptr = builder.inttoptr(builder.add(out_addr, c64((o * tb + k) * lanes * size)),
                                       vec.as_pointer())
                builder.store(builder.load(acc[o][k]), ptr, align=size)
        return context.get_dummy_value()

    @intrinsic
    def mk(typingctx, g_addr, g_row, x_addr, offs_addr, n_vec, out_addr):
        return types.void(*([types.intp] * 6)), codegen
    return mk


# --------------------------------------------------------------------------- the driver

CHUNK = 4  # images per task, as numba_conv._CHUNK (one partial weight gradient per chunk)


@jit(inline="always")
def to_planes(src, b0, nb, dst, rows, pitch, top, left):
    """Images b0 .. b0 + nb - 1 of ``src`` (N, C, H, W) into ``dst`` (C', L): channel k of
    image r at rows r * ``rows`` + ``top`` .., columns ``left`` .. of planes ``pitch``
    entries wide, one image under the other (what is not written keeps its value: the
    zero borders)."""
    h, w = src.shape[2], src.shape[3]
    for r in range(nb):
        for k in range(src.shape[1]):
            for y in range(h):
                base = (r * rows + y + top) * pitch + left
                for z in range(w):
                    dst[k, base + z] = src[b0 + r, k, y, z]


#: the tile sets by vector width: 64 bytes (AVX-512F, 32 vector registers), 32 bytes (16), as
#: (CG, U, OG, TB). Input gradient: 4 channels x 1 vector. On a 2-core Zen 4 (CPU time of the
#: MNIST ConvNet's 16-channel 28x28 layer at batch 100) it beat 4 x 2, 4 x 3 and 2 x 4
#: vectors by 15-25% and equalled 8 x 1 (each unaligned vector load spans two cache lines
#: here: fewer of them per product pays). Weight gradient: 4 output channels x 3 taps beat
#: 8 x 2, 6 x 3, 8 x 3 and 2 x 9 by 5-15%; 32-byte vectors take 2 x 3 (16 registers).
SHAPES = {64: (4, 1, 4, 3), 32: (4, 1, 2, 3)}
_F32, _F64 = ir.FloatType(), ir.DoubleType()
# one micro-kernel per (float type, width); module-level, so that numba caches the driver
_gx_f32_64, _gx_f64_64 = _gx_kernel(_F32, 16, 4, 1), _gx_kernel(_F64, 8, 4, 1)
_gx_f32_32, _gx_f64_32 = _gx_kernel(_F32, 8, 4, 1), _gx_kernel(_F64, 4, 4, 1)
_gw_f32_64, _gw_f64_64 = _gw_kernel(_F32, 16, 4, 3), _gw_kernel(_F64, 8, 4, 3)
_gw_f32_32, _gw_f64_32 = _gw_kernel(_F32, 8, 2, 3), _gw_kernel(_F64, 4, 2, 3)


@jit(inline="always")
def _gx_call(wide, size, g_addr, g_row, w_addr, w_o, n_o, n_taps, offs_addr, out_addr, out_row):
    args = (g_addr, g_row, w_addr, w_o, n_o, n_taps, offs_addr, out_addr, out_row)
    if wide:
        if size == 4:
            _gx_f32_64(*args)
        else:
            _gx_f64_64(*args)
    elif size == 4:
        _gx_f32_32(*args)
    else:
        _gx_f64_32(*args)


@jit(inline="always")
def _gw_call(wide, size, g_addr, g_row, x_addr, offs_addr, n_vec, out_addr):
    args = (g_addr, g_row, x_addr, offs_addr, n_vec, out_addr)
    if wide:
        if size == 4:
            _gw_f32_64(*args)
        else:
            _gw_f64_64(*args)
    elif size == 4:
        _gw_f32_32(*args)
    else:
        _gw_f64_32(*args)


@jit(parallel=True)
def _drive(wide, x, g, wr, offx, offw, p, kh, kw, need_x, need_w, gx, gwp, ws_g, ws_acc,
       ws_gw, ws_x, ws_tmp):
    # wide: the 64-byte tile set, else the 32-byte one (SHAPES).
    # x (N, C, H, W), g (N, O, Ho, Wo): stride 1, p <= kh - 1, kw - 1. wr (T, O, Cp): the
    # weights as [tap][o][c], Cp a multiple of cg (zeros past C). offx (T,): the
    # input gradient's tap offsets in gpad, taps row-major; offw (Tp,): the weight
    # gradient's in xpad, Tp a multiple of tb (offset 0 past T). gx (N, C, H, W)
    # written when need_x; gwp (chunks, O, C, kh, kw): chunk q's weight gradient.
    # ws_*: each thread's planes (see Tiles.workspace), zero wherever this never writes.
    size = x.itemsize
    lanes = (64 if wide else 32) // size
    cg, u, og, tb = (4, 1, 4, 3) if wide else (4, 1, 2, 3)  # SHAPES
    n, c, h, wd = x.shape
    o, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    cp, taps, tp = wr.shape[2], offx.shape[0], offw.shape[0]
    bx = u * lanes                      # positions per input-gradient block
    op = (o + og - 1) // og * og        # output channels padded for the gw tiles
    bh, bw = kh - 1 - p, kw - 1 - p     # g's border for the input gradient
    gp, hg = wd + kw - 1, h + kh - 1    # its pitch and rows per image
    xp, hx = wd + 2 * p, h + 2 * p      # x's pitch and rows per image (border p)
    # With "same" padding (2p = kh - 1 = kw - 1, the ConvNets' 3x3 padding 1) the two
    # gradients' planes of g have one layout, shifted by the border: the weight
    # gradient then reads the input gradient's plane, and g is laid out once.
    same = gp == xp and hg == hx
    shift = bh * gp + bw
    for q in prange((n + CHUNK - 1) // CHUNK):
        b0 = q * CHUNK
        nb = min(n, b0 + CHUNK) - b0
        me = numba.get_thread_id()
        gpad = ws_g[me]
        if need_x or same:
            to_planes(g, b0, nb, gpad, hg, gp, bh, bw)
        if need_x:
            nx = ((nb - 1) * hg + h - 1) * gp + wd  # entries up to the last input pixel
            nxr = (nx + bx - 1) // bx * bx
            acc = ws_acc[me]
            g0, a0 = gpad.ctypes.data, acc.ctypes.data
            sg, sa, sw = gpad.strides[0], acc.strides[0], wr.strides[1]
            w0, ox = wr.ctypes.data, offx.ctypes.data
            for t0 in range(0, nxr, bx):
                for c0 in range(0, cp, cg):
                    _gx_call(wide, size, g0 + t0 * size, sg, w0 + c0 * size, sw, o, taps,
                             ox, a0 + c0 * sa + t0 * size, sa)
            for r in range(nb):
                for ch in range(c):
                    for y in range(h):
                        for z in range(wd):
                            gx[b0 + r, ch, y, z] = acc[ch, (r * hg + y) * gp + z]
        if need_w:
            nw = ((nb - 1) * hx + ho - 1) * xp + wo  # entries up to the last output pixel
            n_vec = nw // lanes  # whole vectors; the last nw % lanes entries below
            xpad, tmp = ws_x[me], ws_tmp[me]
            if same:
                gsrc, g_off = gpad, shift  # g's plane at entry t: gpad[:, t + shift]
            else:
                gsrc, g_off = ws_gw[me], 0
                to_planes(g, b0, nb, gsrc, hx, xp, 0, 0)
            to_planes(x, b0, nb, xpad, hx, xp, p, p)
            sg, sx = gsrc.strides[0], xpad.strides[0]
            g0 = gsrc.ctypes.data + g_off * size
            x0, t_addr, ow = xpad.ctypes.data, tmp.ctypes.data, offw.ctypes.data
            for o0 in range(0, op, og):
                for ch in range(c):
                    for k0 in range(0, tp, tb):
                        _gw_call(wide, size, g0 + o0 * sg, sg, x0 + ch * sx, ow + 8 * k0,
                                 n_vec, t_addr)
                        for oo in range(min(og, o - o0)):
                            for kk in range(min(tb, taps - k0)):
                                s = 0.0
                                for lane in range(lanes):  # a fixed order
                                    s += tmp[(oo * tb + kk) * lanes + lane]
                                off = offw[k0 + kk]
                                for t in range(n_vec * lanes, nw):
                                    s += gsrc[o0 + oo, t + g_off] * xpad[ch, t + off]
                                tap = k0 + kk
                                gwp[q, o0 + oo, ch, tap // kw, tap % kw] = s


class Tiles:
    """The tile set for vectors of ``width`` bytes (64 or 32): ``cg x u``, the
    input-gradient block (channels x vectors of positions), and ``og x tb``, the
    weight-gradient block (output channels x taps), as ``SHAPES`` says; it keeps each
    thread's planes between calls. Compiled on first use (and cached on disk by numba)."""

    def __init__(self, width):
        self.width = width
        self.cg, self.u, self.og, self.tb = SHAPES[width]
        self._spaces = {}
        self._lock = threading.Lock()

    def __repr__(self):
        return (f"Tiles({self.width}: gx {self.cg} channels x {self.u} vector, "
                f"gw {self.og} channels x {self.tb} taps)")

    def workspace(self, x, g, kh, kw, padding):
        """Each thread's planes for layers of this geometry, made once and kept: fresh
        buffers of this size cost a page fault per 4 KiB on every call (1.3 of the 4 ms
        of the MNIST ConvNet's second layer's input gradient, measured). The positions
        the driver writes are the same on every call, so the zero borders stay zero.
        (threads, ...) arrays: gradient planes, input-gradient results, gradient planes
        for the weight gradient (unless padding is "same"), input planes, lane sums."""
        c, h, w = x.shape[1:]
        o = g.shape[1]
        key = (c, h, w, o, kh, kw, padding, x.dtype.str)
        if key not in self._spaces:
            threads = numba.config.NUMBA_NUM_THREADS
            lanes = self.width // x.itemsize
            bx, cp = self.u * lanes, (c + self.cg - 1) // self.cg * self.cg
            op = (o + self.og - 1) // self.og * self.og
            span_g = CHUNK * (h + kh - 1) * (w + kw - 1)
            span_x = CHUNK * (h + 2 * padding) * (w + 2 * padding)
            self._spaces[key] = (
                np.zeros((threads, op, span_g + bx), x.dtype),
                np.zeros((threads, cp, (span_g + bx - 1) // bx * bx), x.dtype),
                np.zeros((threads, op, span_x) if kh - 1 != 2 * padding or kw - 1 != 2 * padding
                         else (threads, 1, 1), x.dtype),  # not used with "same" padding
                np.zeros((threads, c, span_x), x.dtype),
                np.zeros((threads, self.og * self.tb * lanes), x.dtype))
        return self._spaces[key]

    def backward(self, x, g, wb, padding, need_x, need_w, gx, gwp):
        """Fill ``gx`` (when ``need_x``) and ``gwp`` (chunk-wise weight gradients, when
        ``need_w``) for C-contiguous x, g, wb of one float dtype; the checks are the
        caller's (``numba_conv.binary_conv2d_backward``)."""
        o, c, kh, kw = wb.shape
        cp = (c + self.cg - 1) // self.cg * self.cg
        wr = np.zeros((kh * kw, o, cp), wb.dtype)
        wr[:, :, :c] = wb.transpose(2, 3, 0, 1).reshape(kh * kw, o, c)
        gp = x.shape[3] + kw - 1
        xp = x.shape[3] + 2 * padding
        offx = np.array([(kh - 1 - i) * gp + kw - 1 - j for i in range(kh) for j in range(kw)],
                        np.int64)
        tp = (kh * kw + self.tb - 1) // self.tb * self.tb
        offw = np.zeros(tp, np.int64)
        offw[:kh * kw] = [i * xp + j for i in range(kh) for j in range(kw)]
        with self._lock:  # one call at a time per tile set: the workspaces are shared
            _drive(self.width == 64, x, g, wr, offx, offw, padding, kh, kw, need_x, need_w,
                   gx, gwp, *self.workspace(x, g, kh, kw, padding))


#: the tile sets by vector width
TILES = {width: Tiles(width) for width in SHAPES}


def tiles_for(features=None):
    """The tile set for this CPU: 64-byte vectors where it has AVX-512F, else 32 bytes."""
    if features is None:
        from .autotune import isa_features
        features = isa_features()["features"]
    return TILES[64 if features.get("avx512f") else 32]
