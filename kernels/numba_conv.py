"""Numba CPU versions of the convolution glue and of the training step's elementwise ops:
col2im, sign-patch packing, max pool, the binary convolution's backward, sign, batch norm.

The NumPy code in ``minibnn.functional`` and ``minibnn.binary`` is the reference; each
function here returns the same values, bit for bit, except where a sum must be taken in
another order (the binary convolution's weight gradient, batch norm's backward sums: there
within rounding, tested against the float64 result), and the numba backend calls these
instead (``backend.conv_kernels()``). Why they exist: in a small ConvNet the GEMMs are
cheap and the glue is not. The NumPy ``col2im`` of a 16-channel 28x28 layer at batch 100
reads a 45 MB patch matrix with one strided slice-add per kernel offset, and the NumPy
max pool makes a temporary per offset; here every image is one task of a ``prange`` loop
that touches its data once. Measured on a 2-core Zen 4 at batch 100 (best of 10, other
jobs running): col2im 5.6 ms against 11-12 ms, max pool 0.7-1.0 ms against 8.9 ms (the 2x2
pool written out for its four elements: 0.28 ms against 2.1 ms for the general loop, side by
side, 100x16x28x28, other jobs running). A numba
im2col did not beat NumPy's per-offset slice copies (both write the same patch matrix), so
there is none; the binary convolution's backward needs neither im2col nor col2im here.

Layouts (as the NumPy versions):

* ``col2im(cols, x_shape, kh, kw, stride, padding)``: the adjoint of im2col, zero padding. Every
  input element sums its entries in the order of the kernel offsets (i, j) row-major,
  starting from zero, exactly the order of the NumPy slice-adds, so the floats agree.
* ``pack_sign_patches(x, kh, kw, stride, padding)`` -> uint64 (N*Ho*Wo, words): the
  patches of sign(x) in the (i, j, c) order of ``binary.conv_sign_patches``, padding taps
  +1 (bit 1), packed LSB first 64 to a word with the pad bits of the last word 0, i.e.
  ``pack_rows(conv_sign_patches(x, ...))`` without the bool matrix: each pixel's C sign
  bits are packed once into a +1-bordered per-image buffer, and a patch row joins its
  taps' groups of C bits, one image per task. Where C divides 64 the groups never straddle
  a word and a row of patches is built for all its positions at once (vectorised): the
  ConvNet's three layers at batch 100 take 1.8 ms against 4.8 ms with the general loop
  (side by side on the 2-core Zen 4, other jobs running).
* ``conv_output(prod, corr, n, ho, wo, dtype)``: the XNOR GEMM's (O, N*Ho*Wo) product minus
  the padding correction, as NCHW in ``dtype`` (``binary.xnor_conv2d``'s last lines);
  ``swap_planes(a)``: (A, B, H, W) -> (B, A, H, W) C-contiguous (the float convolution's
  NCHW output and channel-major gradient).
* ``max_pool2d(x, k, stride)`` -> (best, arg) and ``max_pool2d_backward(g, arg, x_shape,
  k, stride)``: floor mode, no padding; the tie rule of ``functional.MaxPool2d`` (the
  first maximal element in row-major window order wins, strict ``>``); ``arg`` is the
  window offset t = i*k + j as uint8 (k*k < 256) or int32.
* ``binary_conv2d_backward(g, x, wb, stride, padding)`` -> (g_x, g_w) for stride 1 and
  padding within the kernel's reach (``direct_backward_fits``): see its section below.
* ``sign(x)``, ``sign_ste(x)`` -> sign(x) and (sign(x), |x| <= 1) in one pass;
  ``sign_ste_backward(g, keep)`` -> g * keep.
* ``adam_update(w, g, m, v, ...)``: ``optim.Adam``'s step and clip, in place, one pass.
* ``bn_forward``, ``bn_backward``: ``functional.BatchNormTrain`` on C-contiguous NCHW;
  ``bn_train_forward``: its forward with the batch's statistics computed in the same kernel,
  and ``bn_backward_x`` the backward from x (xhat recomputed, never stored).
"""

import numpy as np
from numba import prange

from . import numba_conv_tiles
from ._numba_common import jit

__all__ = ["accepts", "col2im", "pack_sign_patches", "conv_output", "swap_planes", "max_pool2d",
           "max_pool2d_backward", "direct_backward_fits", "binary_conv2d_backward", "sign",
           "sign_ste", "sign_ste_backward", "adam_update", "bn_train_forward", "bn_forward",
           "bn_backward", "bn_backward_x"]


def accepts(x):
    """True when these kernels take ``x``: a NumPy array (a CuPy array runs the array code)."""
    return isinstance(x, np.ndarray)


def _out_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


# --------------------------------------------------------------------------- col2im


@jit(parallel=True)
def _col2im(cols, kh, kw, stride, padding, out):
    # cols (C, kh, kw, N, Ho, Wo); out (N, C, H, W) zeroed by the caller
    c, n, h, w = cols.shape[0], out.shape[0], out.shape[2], out.shape[3]
    ho, wo = cols.shape[4], cols.shape[5]
    for b in prange(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    z0 = min(wo, max(0, (padding - j + stride - 1) // stride))
                    z1 = max(z0, min(wo, (w - 1 + padding - j) // stride + 1))
                    for y in range(ho):
                        yy = y * stride + i - padding
                        if yy < 0 or yy >= h:
                            continue
                        src = cols[ch, i, j, b, y]
                        dst = out[b, ch, yy]
                        for z in range(z0, z1):
                            dst[z * stride + j - padding] += src[z]


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """The adjoint of ``im2col`` with zero padding: cols (N*Ho*Wo, C*kh*kw) -> (N, C, H, W).
    Shapes are checked by the caller (``functional.col2im``)."""
    n, c, h, w = (int(s) for s in x_shape)
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    cols_t = np.ascontiguousarray(cols.T).reshape(c, kh, kw, n, ho, wo)
    out = np.zeros((n, c, h, w), dtype=cols.dtype)
    if cols_t.size:
        _col2im(cols_t, kh, kw, stride, padding, out)
    return out


# --------------------------------------------------------------------------- sign patches


@jit(parallel=True)
def _pack_sign_patches(x, kh, kw, stride, padding, ho, wo, out):
    # x (N, C, H, W); out (N*Ho*Wo, words) uint64. One task per image: its pixels' sign bits
    # are gathered first into a small bordered buffer bits (H + 2p, W + 2p, cw), bit c % 64
    # of word c // 64 set when x[n, c, y, z] >= 0 and every valid bit set in the border
    # (a padding tap is +1); then a row is its taps' C-bit groups one after another, (i, j)
    # row-major: bit t = (i*kw + j)*C + c, as in conv_sign_patches. Each group is appended
    # to the word being built (up to 64 bits at a time, carried over a word boundary),
    # which is stored when full; the last word's unused high bits stay 0.
    n, c, h, w = x.shape
    cw = (c + 63) // 64
    hp, wp = h + 2 * padding, w + 2 * padding
    words = out.shape[1]
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    last = c - 64 * (cw - 1)  # bits in a pixel's last word
    last_ones = ones if last == 64 else (np.uint64(1) << np.uint64(last)) - np.uint64(1)
    for b in prange(n):
        bits = np.empty((hp, wp, cw), np.uint64)
        for y in range(hp):
            inner_row = padding <= y < padding + h
            for z in range(wp):
                border = not (inner_row and padding <= z < padding + w)
                for k in range(cw - 1):
                    bits[y, z, k] = ones if border else np.uint64(0)
                bits[y, z, cw - 1] = last_ones if border else np.uint64(0)
        for ch in range(c):
            k, r = ch // 64, np.uint64(ch % 64)
            for y in range(h):
                for z in range(w):
                    bits[y + padding, z + padding, k] |= np.uint64(x[b, ch, y, z] >= 0) << r
        for y in range(ho):
            for z in range(wo):
                row = (b * ho + y) * wo + z
                cur = np.uint64(0)
                r = 0  # bits of cur in use
                q = 0  # next word of the row to store
                for i in range(kh):
                    yy = y * stride + i
                    for j in range(kw):
                        xx = z * stride + j
                        for k in range(cw):
                            nb = 64 if k < cw - 1 else last
                            v = bits[yy, xx, k]
                            cur |= v << np.uint64(r)
                            if r + nb >= 64:
                                out[row, q] = cur
                                q += 1
                                cur = v >> np.uint64(64 - r) if r > 0 else np.uint64(0)
                                r = r + nb - 64
                            else:
                                r += nb
                if q < words:
                    out[row, q] = cur


@jit(parallel=True)
def _pack_sign_patches_narrow(x, kh, kw, stride, padding, ho, wo, out):
    # C divides 64 (1, 2, 4, ..., 64): a pixel's bits are one word, and a tap's group never
    # straddles a word: tap t = i*kw + j sits in word t // (64 / C) at bit (t % (64 / C))*C.
    # Per image: the pixel words in a +1-bordered buffer (as _pack_sign_patches), then per
    # output row y the row's words for all wo positions at once, tap by tap (a shifted
    # slice of a buffer row OR-ed into a (words, wo) block, a loop that vectorises), then
    # stored as the block's transpose.
    n, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    words = out.shape[1]
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    pad = ones if c == 64 else (np.uint64(1) << np.uint64(c)) - np.uint64(1)  # a +1 pixel
    per = 64 // c
    for b in prange(n):
        bits = np.empty((hp, wp), np.uint64)
        for y in range(hp):
            for z in range(wp):
                bits[y, z] = pad
        for y in range(h):
            row = bits[y + padding, padding:padding + w]
            for z in range(w):
                row[z] = 0
            for ch in range(c):
                src, sh = x[b, ch, y], np.uint64(ch)
                for z in range(w):
                    row[z] |= np.uint64(src[z] >= 0) << sh
        block = np.empty((words, wo), np.uint64)
        for y in range(ho):
            block[:] = 0
            for t in range(kh * kw):
                i, j = t // kw, t % kw
                sh = np.uint64((t % per) * c)
                src, dst = bits[y * stride + i], block[t // per]
                if stride == 1:
                    shifted = src[j:j + wo]
                    for z in range(wo):
                        dst[z] |= shifted[z] << sh
                else:
                    for z in range(wo):
                        dst[z] |= src[z * stride + j] << sh
            rows = out[(b * ho + y) * wo:(b * ho + y + 1) * wo]
            for z in range(wo):
                for q in range(words):
                    rows[z, q] = block[q, z]


def pack_sign_patches(x, kh, kw, stride=1, padding=0):
    """``pack_rows(conv_sign_patches(x, kh, kw, stride, padding))`` without the bool patch
    matrix: uint64 (N*Ho*Wo, ceil(kh*kw*C / 64)); see the module docstring. One pass per
    image: its pixels' C sign bits are packed once into a +1-bordered buffer that stays in
    cache, then every patch row is its taps' bit groups joined."""
    n, c, h, w = x.shape
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    words = (kh * kw * c + 63) // 64
    out = np.empty((n * ho * wo, words), dtype=np.uint64)
    if out.size and 64 % c == 0:  # the ConvNets' 16, 32, 64 channels
        _pack_sign_patches_narrow(np.ascontiguousarray(x), kh, kw, stride, padding, ho, wo, out)
    elif out.size:
        _pack_sign_patches(np.ascontiguousarray(x), kh, kw, stride, padding, ho, wo, out)
    return out


@jit(parallel=True)
def _conv_output(prod, corr, out):
    # prod (O, N, P), corr (O, P) int32 or (0, 0): out[n, o, p] = prod[o, n, p] - corr[o, p]
    o, n, p = prod.shape
    subtract = corr.shape[0] > 0
    for b in prange(n):
        for k in range(o):
            src, dst = prod[k, b], out[b, k]
            if subtract:
                cr = corr[k]
                for t in range(p):
                    dst[t] = src[t] - cr[t]
            else:
                for t in range(p):
                    dst[t] = src[t]


def swap_planes(a):
    """``np.ascontiguousarray(a.transpose(1, 0, 2, 3))`` for a 4-D NumPy array (A, B, H, W):
    the (B, A, H, W) copy, whole H*W planes moved, one image or channel per task."""
    p, q, h, w = a.shape
    out = np.empty((q, p, h, w), a.dtype)
    if out.size:
        _conv_output(np.ascontiguousarray(a).reshape(p, q, h * w), np.zeros((0, 0), np.int32),
                     out.reshape(q, p, h * w))
    return out


def conv_output(prod, corr, n, ho, wo, dtype):
    """The XNOR convolution's result in NCHW: ``prod`` (O, N*Ho*Wo) int32, the GEMM of the
    weight rows by the patches, minus ``corr`` (O, Ho, Wo) int32, the padding correction, or
    None, as an (N, O, Ho, Wo) C-contiguous array of ``dtype``: in one pass what
    ``binary.xnor_conv2d``'s array code does in three (subtract, transpose, convert);
    integers throughout, so the same values."""
    o = prod.shape[0]
    out = np.empty((n, o, ho, wo), dtype)
    cr = np.zeros((0, 0), np.int32) if corr is None else corr.reshape(o, ho * wo)
    if out.size:
        _conv_output(prod.reshape(o, n, ho * wo), cr, out.reshape(n, o, ho * wo))
    return out


# --------------------------------------------------------------------------- max pool


@jit(parallel=True)
def _max_pool(x, k, stride, best, arg):
    n, c, ho, wo = best.shape
    for b in prange(n):
        for ch in range(c):
            for y in range(ho):
                for z in range(wo):
                    m = x[b, ch, y * stride, z * stride]
                    a = 0
                    for i in range(k):
                        for j in range(k):
                            v = x[b, ch, y * stride + i, z * stride + j]
                            if v > m:  # strict: an equal later element never takes over
                                m = v
                                a = i * k + j
                    best[b, ch, y, z] = m
                    arg[b, ch, y, z] = a


@jit(parallel=True)
def _max_pool_2x2(x, best, arg):
    # k = stride = 2, the ConvNets' pool: _max_pool's comparisons in its order, written out
    # for the four elements of a window, a row of windows at a time (two input rows)
    n, c, ho, wo = best.shape
    for b in prange(n):
        for ch in range(c):
            for y in range(ho):
                r0, r1 = x[b, ch, 2 * y], x[b, ch, 2 * y + 1]
                bo, ao = best[b, ch, y], arg[b, ch, y]
                for z in range(wo):
                    m, a = r0[2 * z], 0
                    if r0[2 * z + 1] > m:
                        m, a = r0[2 * z + 1], 1
                    if r1[2 * z] > m:
                        m, a = r1[2 * z], 2
                    if r1[2 * z + 1] > m:
                        m, a = r1[2 * z + 1], 3
                    bo[z] = m
                    ao[z] = a


def max_pool2d(x, k, stride):
    """(best, arg) of a k x k max pool with ``stride`` (floor mode); see the module docstring."""
    n, c, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    best = np.empty((n, c, ho, wo), dtype=x.dtype)
    arg = np.empty((n, c, ho, wo), dtype=np.uint8 if k * k < 256 else np.int32)
    if best.size:
        if k == stride == 2:
            _max_pool_2x2(np.ascontiguousarray(x), best, arg)
        else:
            _max_pool(np.ascontiguousarray(x), k, stride, best, arg)
    return best, arg


@jit(parallel=True)
def _max_pool_backward(g, arg, k, stride, out):
    n, c, ho, wo = g.shape
    for b in prange(n):
        for ch in range(c):
            # offset-major, as the NumPy slice-adds: with overlapping windows (stride < k)
            # an element sums its windows' gradients in the same order
            for t in range(k * k):
                i, j = t // k, t % k
                for y in range(ho):
                    for z in range(wo):
                        if arg[b, ch, y, z] == t:
                            out[b, ch, y * stride + i, z * stride + j] += g[b, ch, y, z]


@jit(parallel=True)
def _max_pool_backward_tiled(g, arg, k, out):
    # stride == k: the windows tile the input without overlap, so every element gets at
    # most one gradient: the image's planes are zeroed, then each window's g is stored at
    # its arg as 0 + g (0 + -0.0 is 0.0, as the slice-adds give)
    n, c, ho, wo = g.shape
    zero = out.dtype.type(0)
    for b in prange(n):
        plane = out[b].reshape(-1)
        for t in range(plane.size):
            plane[t] = zero
        for ch in range(c):
            for y in range(ho):
                for z in range(wo):
                    a = arg[b, ch, y, z]
                    out[b, ch, y * k + a // k, z * k + a % k] = g[b, ch, y, z] + zero


def max_pool2d_backward(g, arg, x_shape, k, stride):
    """The gradient of ``max_pool2d`` with respect to x: each window's g to its arg."""
    shape = tuple(int(s) for s in x_shape)
    if stride == k:
        out = np.empty(shape, dtype=g.dtype)
        if out.size:
            _max_pool_backward_tiled(np.ascontiguousarray(g), arg, k, out)
        return out
    out = np.zeros(shape, dtype=g.dtype)
    if g.size:
        _max_pool_backward(np.ascontiguousarray(g), arg, k, stride, out)
    return out


# --------------------------------------------------------------------------- sign


_SERIAL = 1 << 15  # elements below which an elementwise kernel runs on the calling thread
_PARALLEL_MIN = 1 << 19  # the same for a kernel that only streams memory (one product a value)


@jit()
def _sign_range(x, q, t0, t1):
    one = q.dtype.type(1)
    xs, qs = x[t0:t1], q[t0:t1]  # indexed from 0: the loop vectorises
    for t in range(xs.size):
        qs[t] = one if xs[t] >= 0 else -one


@jit(parallel=True)
def _sign(x, q):
    for c in prange((x.size + _SERIAL - 1) // _SERIAL):
        _sign_range(x, q, c * _SERIAL, min(x.size, (c + 1) * _SERIAL))


@jit(parallel=True)
def _sign_ste(x, q, keep):
    one = q.dtype.type(1)
    for t in prange(x.size):
        v = x[t]
        q[t] = one if v >= 0 else -one
        keep[t] = abs(v) <= 1


def sign(x):
    """``binary.sign(x)`` for a float NumPy array: where(x >= 0, 1, -1) in x's dtype (NaN
    gives -1, as the comparison is False), one pass."""
    flat = np.ascontiguousarray(x).reshape(-1)
    q = np.empty(flat.size, x.dtype)
    if flat.size > _SERIAL:
        _sign(flat, q)
    else:  # a weight, say: not worth waking the worker threads
        _sign_range(flat, q, 0, flat.size)
    return q.reshape(x.shape)


def sign_ste(x):
    """(sign(x), |x| <= 1) for a float NumPy array in one pass: ``binary.SignSTE``'s
    forward value and the mask its backward multiplies by, the same values as its array
    code (NaN: -1 and False)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    q, keep = np.empty(flat.size, x.dtype), np.empty(flat.size, np.bool_)
    _sign_ste(flat, q, keep)
    return q.reshape(x.shape), keep.reshape(x.shape)


@jit()
def _mask_grad_range(g, keep, out, t0, t1):
    one, zero = out.dtype.type(1), out.dtype.type(0)
    gs, ks, os_ = g[t0:t1], keep[t0:t1], out[t0:t1]  # indexed from 0: the loop vectorises
    for t in range(gs.size):
        os_[t] = gs[t] * (one if ks[t] else zero)


@jit(parallel=True)
def _mask_grad(g, keep, out):
    for c in prange((g.size + _PARALLEL_MIN - 1) // _PARALLEL_MIN):
        _mask_grad_range(g, keep, out, c * _PARALLEL_MIN, min(g.size, (c + 1) * _PARALLEL_MIN))


def sign_ste_backward(g, keep):
    """``g * keep`` for a float NumPy array g and the bool mask of ``sign_ste``: SignSTE's
    backward, the array code's floats (g times 1.0 or 0.0 in g's dtype, so -g * 0 is -0.0
    and NaN stays NaN), one pass."""
    flat, mask = np.ascontiguousarray(g).reshape(-1), np.ascontiguousarray(keep).reshape(-1)
    out = np.empty(flat.size, g.dtype)
    if flat.size > _PARALLEL_MIN:
        _mask_grad(flat, mask, out)
    else:  # one memory-bound pass over a few MB: waking the worker threads costs more
        _mask_grad_range(flat, mask, out, 0, flat.size)
    return out.reshape(g.shape)


# --------------------------------------------------------------------------- Adam


@jit(error_model="numpy")
def _adam_range(w, g, m, v, b1, c1, b2, c2, eps, alpha, lo, hi, clip, t0, t1):
    # elements t0:t1, as views indexed from 0 (so that the loops vectorise); the moments
    # first, then the step from them, each loop touching fewer arrays; a zero divisor gives
    # inf or NaN as in NumPy (error_model="numpy"), not an exception
    ww, gg, mm, vv = w[t0:t1], g[t0:t1], m[t0:t1], v[t0:t1]
    for t in range(ww.size):
        gt = gg[t]
        mm[t] = mm[t] * b1 + gt * c1
        vv[t] = vv[t] * b2 + (gt * gt) * c2
    for t in range(ww.size):
        u = ww[t] - ww.dtype.type(np.float64(mm[t] / (np.sqrt(vv[t]) + eps)) * alpha)
        if clip:
            u = lo if u < lo else (hi if u > hi else u)
        ww[t] = u


@jit(parallel=True, error_model="numpy")
def _adam_chunks(w, g, m, v, b1, c1, b2, c2, eps, alpha, lo, hi, clip):
    for q in prange((w.size + _SERIAL - 1) // _SERIAL):
        _adam_range(w, g, m, v, b1, c1, b2, c2, eps, alpha, lo, hi, clip, q * _SERIAL,
                    min(w.size, (q + 1) * _SERIAL))


def adam_update(w, g, m, v, beta1, beta2, eps, alpha_t, clip=None):
    """One step of ``optim.Adam`` in place on flat C-contiguous float arrays of one dtype (the
    weight w, its gradient g, the moments m and v), in one kernel (two loops over each
    cache-sized chunk) where the array code makes about twelve passes: with beta1, beta2, eps and clip Python floats, rounded to w's dtype as NumPy
    rounds them, and alpha_t a float64,

        m = m * beta1 + g * (1 - beta1);  v = v * beta2 + g * g * (1 - beta2)
        w = w - round(float64(m / (sqrt(v) + eps)) * alpha_t);  w = clip(w, -clip, clip)

    each operation rounded to w's dtype in the array code's order, so the same floats."""
    dt = w.dtype.type
    lim = 0.0 if clip is None else clip
    args = (w, g, m, v, dt(beta1), dt(1 - beta1), dt(beta2), dt(1 - beta2), dt(eps),
            np.float64(alpha_t), dt(-lim), dt(lim), clip is not None)
    if w.size > _SERIAL:
        _adam_chunks(*args)
    else:  # a parallel launch (waking the worker threads) costs more than a small update
        _adam_range(*args, 0, w.size)


# --------------------------------------------------------------------------- binary conv backward
#
# The backward of a binary convolution as functional.conv2d_backward computes it writes two
# patch-sized matrices per layer (N*Ho*Wo x C*kh*kw: 45 MB for 16 channels, 28x28, batch
# 100): the columns g2 @ W2 that col2im folds back, and im2col(x) for g2^T @ patches. Their
# arithmetic is small (16 products per column entry); the time goes to writing and reading
# them. Here a few images (``_CHUNK``) at a time are done where their data sit in cache:
# their planes are copied once into zero-bordered planes, stacked one image under the
# other, and every kernel tap becomes a shift of the flattened stack, so both gradients
# are long, vectorisable loops over whole planes.
#
# Planes of pitch P hold an image row per P entries; entry t = row*P + col. With the
# gradient g bordered by (kh-1-p, kw-1-p) zeros (pitch P = W + kw - 1), the input gradient
# of channel c at t is, for stride 1,
#
#     gx[c](t) = sum over taps (i, j) row-major of S_ij(t),
#     S_ij(t)  = sum over o ascending of w[o, c, i, j] * gpad[o](t + (kh-1-i)*P + (kw-1-j))
#
# (a tap whose output position lies outside the image reads the zero border). This is
# the reference's order: BLAS forms each column entry S_ij as a dot product over O, and
# col2im adds the taps row-major starting from zero. With +-1 weights every product is
# exact, so the only roundings are those of these sums, in that order: where BLAS adds the
# O products of an entry one after another (as OpenBLAS's sgemm/dgemm kernels do), the
# result is the same bit for bit (tests/test_conv_backward.py pins the order exactly
# against a NumPy transcription, and the BLAS path within a tolerance).
#
# The weight gradient gw[o, c, i, j] = sum over (n, y, x) of g[n, o, y, x] * x[n, c, y + i - p,
# x + j - p] is a dot product of g's plane with a shifted, zero-bordered plane of x (pitch
# W + 2p). BLAS sums these N*Ho*Wo terms in blocks of its own choosing; no loop can
# promise its order, so this one is vectorised freely (``fastmath`` reassociation, within
# one chunk of ``_CHUNK`` images) and added over the chunks in a fixed order: each
# chunk's partial sum in its own slot, the slots added in order. The
# result does not depend on the thread count. Its difference from the BLAS result is
# rounding only: tested against the float64 sum within 1e-5 of the sum of the terms'
# magnitudes (float32), as the BLAS result is.
#
# These loops are the readable version: one pass over a whole plane per tap and output
# channel, each product's partial sum written back, so they run at the speed of L2. The
# default (``tiles=True``) runs the same sums, in the same order for the input gradient,
# through register-tiled micro-kernels (kernels/numba_conv_tiles.py): about half the time.

_CHUNK = numba_conv_tiles.CHUNK  # images per partial weight gradient (fixed: the sum is the
# same on any thread count), 4


def direct_backward_fits(x, g, wb, stride, padding):
    """True when ``binary_conv2d_backward`` takes this layer: stride 1, padding at most
    the kernel's reach (p <= kh - 1 and p <= kw - 1), x, g and wb NumPy arrays of one
    float dtype. Other layers run ``functional.conv2d_backward``."""
    kh, kw = wb.shape[2], wb.shape[3]
    return (stride == 1 and padding <= kh - 1 and padding <= kw - 1
            and all(isinstance(a, np.ndarray) for a in (x, g, wb))
            and x.dtype == g.dtype == wb.dtype and g.dtype.kind == "f")


@jit(fastmath={"reassoc", "nsz"})
def _dot(a, b, n):
    # sum of a[t] * b[t], t < n, in any order (reassociated so that it vectorises)
    s = a.dtype.type(0)
    for t in range(n):
        s += a[t] * b[t]
    return s


@jit()
def _tap_sum(s, gpad, w, c, i, j, off, n):
    # s[:n] = sum over o ascending of w[o, c, i, j] * gpad[o, off:off + n]; one rounding per
    # added product, in that order (four products per pass over s, the order kept)
    o = gpad.shape[0]
    s[:n] = 0
    k = 0
    while k + 4 <= o:
        a0, a1 = gpad[k, off:off + n], gpad[k + 1, off:off + n]
        a2, a3 = gpad[k + 2, off:off + n], gpad[k + 3, off:off + n]
        w0, w1, w2, w3 = w[k, c, i, j], w[k + 1, c, i, j], w[k + 2, c, i, j], w[k + 3, c, i, j]
        for t in range(n):
            s[t] = (((s[t] + w0 * a0[t]) + w1 * a1[t]) + w2 * a2[t]) + w3 * a3[t]
        k += 4
    while k < o:
        a0, w0 = gpad[k, off:off + n], w[k, c, i, j]
        for t in range(n):
            s[t] += w0 * a0[t]
        k += 1


@jit(parallel=True)
def _conv_backward(x, g, w, p, need_x, need_w, gx, gwp):
    # x (N, C, H, W), g (N, O, Ho, Wo), w (O, C, kh, kw); stride 1, p <= kh-1, kw-1.
    # gx (N, C, H, W) written when need_x; gwp (ceil(N / _CHUNK), O, C, kh, kw) zeroed,
    # one partial weight gradient per chunk of _CHUNK images, added to when need_w.
    # A chunk's images are stacked into one tall plane per channel, each image in its own
    # block of rows with its own zero border, so that a tap's shift never reaches into
    # the next image and every loop runs over the whole chunk at once.
    n, c, h, wd = x.shape
    o, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    ho, wo = g.shape[2], g.shape[3]
    bh, bw = kh - 1 - p, kw - 1 - p     # g's border for the input gradient
    gp, hg = wd + kw - 1, h + kh - 1    # its pitch and rows per image (= wo + 2bw, ho + 2bh)
    xp, hx = wd + 2 * p, h + 2 * p      # x's pitch and rows per image (border p)
    for q in prange((n + _CHUNK - 1) // _CHUNK):
        b0 = q * _CHUNK
        nb = min(n, b0 + _CHUNK) - b0
        nx = ((nb - 1) * hg + h - 1) * gp + wd   # entries up to the last input pixel
        nw = ((nb - 1) * hx + ho - 1) * xp + wo  # entries up to the last output pixel
        if need_x:
            gpad = np.zeros((o, nb * hg * gp), g.dtype)
            s = np.empty(nx, g.dtype)
            acc = np.empty(nx, g.dtype)
            numba_conv_tiles.to_planes(g, b0, nb, gpad, hg, gp, bh, bw)
            for ch in range(c):
                acc[:] = 0
                for i in range(kh):
                    for j in range(kw):
                        _tap_sum(s, gpad, w, ch, i, j, (kh - 1 - i) * gp + kw - 1 - j, nx)
                        for t in range(nx):
                            acc[t] += s[t]
                for r in range(nb):
                    for y in range(h):
                        for z in range(wd):
                            gx[b0 + r, ch, y, z] = acc[(r * hg + y) * gp + z]
        if need_w:
            gwide = np.zeros((o, nb * hx * xp), g.dtype)
            xpad = np.zeros((c, nb * hx * xp), g.dtype)
            numba_conv_tiles.to_planes(g, b0, nb, gwide, hx, xp, 0, 0)
            numba_conv_tiles.to_planes(x, b0, nb, xpad, hx, xp, p, p)
            for k in range(o):
                for ch in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            off = i * xp + j
                            gwp[q, k, ch, i, j] += _dot(gwide[k], xpad[ch, off:off + nw], nw)


@jit()
def _sum_slots(parts, out):
    # out = parts[0] + parts[1] + ..., in that order, element by element
    flat, m = out.reshape(-1), out.size
    for t in range(m):
        flat[t] = 0
    for q in range(parts.shape[0]):
        part = parts[q].reshape(-1)
        for t in range(m):
            flat[t] += part[t]


def binary_conv2d_backward(g, x, wb, stride, padding, need_x=True, need_w=True, tiles=True):
    """(g_x, g_w) of out = conv2d(x, wb, stride, padding), zero padding, from g = dL/dout,
    without patch matrices (see the comment above): the values of
    ``functional.conv2d_backward(g, x.shape, wb, stride, padding, im2col(x))``, g_x bit for
    bit where BLAS sums each column entry over O in order and wb holds +-1, g_w within
    rounding. Each is None when not asked for. Only for layers ``direct_backward_fits``
    takes.

    ``tiles``: True runs the register-tiled micro-kernels of
    :mod:`kernels.numba_conv_tiles` for this CPU (the default: the same g_x bit for bit,
    g_w summed in another order, about twice as fast), a ``numba_conv_tiles.Tiles`` runs
    that set, False the plain loops of ``_conv_backward`` (the readable version; the
    tests compare them all)."""
    if not direct_backward_fits(x, g, wb, stride, padding):
        raise ValueError(f"binary_conv2d_backward: stride {stride}, padding {padding}, kernel "
                         f"{tuple(wb.shape[2:])}, dtypes {x.dtype}/{g.dtype}/{wb.dtype} not taken; "
                         "expected stride 1, padding <= kernel size - 1, one float dtype")
    n, c, h, w = x.shape
    o, _, kh, kw = wb.shape
    want = (n, o, h + 2 * padding - kh + 1, w + 2 * padding - kw + 1)
    if tuple(g.shape) != want or wb.shape[1] != c:
        raise ValueError(f"binary_conv2d_backward: gradient of shape {tuple(g.shape)} does not "
                         f"fit input {tuple(x.shape)} and weight {tuple(wb.shape)}; expected "
                         f"{want}")
    gx = np.empty(x.shape, x.dtype) if need_x else np.empty((1, 1, 1, 1), x.dtype)
    chunks = (n + _CHUNK - 1) // _CHUNK
    gwp = np.zeros((chunks,) + wb.shape if need_w else (1, 1, 1, 1, 1), g.dtype)
    if n and (need_x or need_w):
        args = (np.ascontiguousarray(x), np.ascontiguousarray(g), np.ascontiguousarray(wb))
        if tiles is True:
            tiles = numba_conv_tiles.tiles_for()
        if tiles:
            tiles.backward(*args, padding, need_x, need_w, gx, gwp)
        else:
            _conv_backward(*args, padding, need_x, need_w, gx, gwp)
    gw = None
    if need_w:
        gw = np.empty(wb.shape, g.dtype)
        _sum_slots(gwp, gw)
    return (gx if need_x else None), gw


# --------------------------------------------------------------------------- batch norm (NCHW)
#
# functional.BatchNormTrain on a (N, C, H, W) batch, statistics over (N, H, W). The array
# code makes a temporary per line (x - mean, its product, g * xhat, g * gamma, ...), about
# ten passes over the batch each way. Forward here: one pass, the same floats (the same
# operations in the same order, no contraction). Backward: one kernel, per channel one
# pass for the two sums and one for the input gradient (the channel's planes still in
# cache, and one launch: 100x16x28x28, 0.8-0.9 ms against 0.9-1.0 ms as two kernels, side
# by side, other jobs running). The sums are taken per channel in float64 and
# rounded once, where NumPy adds float32 pairwise: a different order, so the gradients
# agree within rounding, not bit for bit (the sums are closer to exact than NumPy's). The
# array code's two means are gamma times these sums over the count:
#     mean(g * gamma) = gamma * sum(g) / m,   mean(g * gamma * xhat) = gamma * sum(g * xhat) / m.


@jit(parallel=True)
def _bn_forward(x, mean, invstd, gamma, beta, xhat, y):
    n, c = x.shape[0], x.shape[1]
    for ch in prange(c):
        m, s, gm, bt = mean[ch], invstd[ch], gamma[ch], beta[ch]
        for b in range(n):
            src, xh, out = x[b, ch].reshape(-1), xhat[b, ch].reshape(-1), y[b, ch].reshape(-1)
            for t in range(src.size):
                v = (src[t] - m) * s
                xh[t] = v
                out[t] = gm * v + bt


# The training forward computes the batch's statistics too. They are NumPy's: ``x.mean(axis=
# (0, 2, 3))`` and ``x.var(axis=(0, 2, 3))`` of a C-contiguous array add each (n, c) plane of
# H*W values by pairwise summation (NumPy's ``pairwise_sum``: runs under 8 added in turn, up to
# 128 in eight interleaved partial sums, longer runs split in two at a multiple of 8) and add
# the planes' sums in n order; with C == 1 the whole batch is one run. The variance is the
# mean of (x - mean)^2 taken the same way; each sum becomes a mean in float64 and is rounded
# once to x's dtype (NumPy divides by an intp count). ``_pairwise`` and the plane loop below
# are that order, so mean and var come out bit for bit as NumPy 2.x computes them
# (tests/test_numba_train_glue.py checks it on many shapes); one pass per channel reads the
# data for the sum, one for the squared deviations, one for y (xhat is not stored), all
# while the channel's planes sit in cache, where the array code makes about eight passes
# over memory.


@jit()
def _run_sum(a, lo, n):
    # a leaf of NumPy's pairwise sum, n <= 128 values from a[lo]
    a = a[lo:lo + n]  # indexed from 0 (no negative-index checks)
    if n < 8:
        r = a.dtype.type(0)
        for t in range(n):
            r += a[t]
        return r
    r0, r1, r2, r3 = a[0], a[1], a[2], a[3]
    r4, r5, r6, r7 = a[4], a[5], a[6], a[7]
    t, m = 8, n - n % 8
    while t < m:
        r0 += a[t]
        r1 += a[t + 1]
        r2 += a[t + 2]
        r3 += a[t + 3]
        r4 += a[t + 4]
        r5 += a[t + 5]
        r6 += a[t + 6]
        r7 += a[t + 7]
        t += 8
    r = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while t < n:
        r += a[t]
        t += 1
    return r


@jit()
def _pairwise(a, lo, n, frames, parts):
    # sum of a[lo:lo + n] in NumPy's pairwise order (see above): a run over 128 is the sum of
    # its halves (split at a multiple of 8), left + right. Written as a loop over an explicit
    # stack (numba's on-disk cache does not reload recursive functions): frames[d] = (lo, n,
    # 1 when its right half is being summed), parts[d] the left half's sum of frame d.
    if n <= 128:
        return _run_sum(a, lo, n)
    d = 0
    frames[0, 0], frames[0, 1], frames[0, 2] = lo, n, 0
    while True:
        while frames[d, 1] > 128:  # down the left halves
            half = frames[d, 1] // 2
            half -= half % 8
            frames[d + 1, 0], frames[d + 1, 1], frames[d + 1, 2] = frames[d, 0], half, 0
            d += 1
        r = _run_sum(a, frames[d, 0], frames[d, 1])
        while True:  # up: a left half starts its sibling, a right half joins its left
            if d == 0:
                return r
            if frames[d, 2] == 0:
                parts[d - 1] = r
                frames[d, 0] += frames[d, 1]
                frames[d, 1] = frames[d - 1, 1] - frames[d, 1]
                frames[d, 2] = 1
                break
            r = parts[d - 1] + r
            d -= 1


@jit(parallel=True)
def _bn_train_forward(x, gamma, beta, eps, mean, var, invstd, y):
    # x, y (planes, C, size): (N, C, H*W), or (1, 1, N*H*W) when C == 1
    planes, c, size = x.shape
    count = planes * size
    one = x.dtype.type(1)
    for ch in prange(c):
        dev = np.empty(size, x.dtype)
        frames, parts = np.empty((64, 3), np.int64), np.empty(64, x.dtype)
        s = x.dtype.type(0)
        for b in range(planes):
            s = s + _pairwise(x[b, ch], 0, size, frames, parts)
        m = x.dtype.type(np.float64(s) / count)
        s = x.dtype.type(0)
        for b in range(planes):
            src = x[b, ch]
            for t in range(size):
                d = src[t] - m
                dev[t] = d * d
            s = s + _pairwise(dev, 0, size, frames, parts)
        v = x.dtype.type(np.float64(s) / count)
        inv = one / np.sqrt(v + eps)
        mean[ch], var[ch], invstd[ch] = m, v, inv
        gm, bt = gamma[ch], beta[ch]
        for b in range(planes):
            src, out = x[b, ch], y[b, ch]
            for t in range(size):
                out[t] = gm * ((src[t] - m) * inv) + bt


def bn_train_forward(x, gamma, beta, eps):
    """(mean, var, invstd, y) of a training batch norm on C-contiguous x (N, C, H, W) with
    per-channel gamma and beta of x's dtype, in one kernel: mean and var the batch's
    statistics over (N, H, W) as NumPy's ``x.mean``/``x.var`` compute them (same order, same
    floats; see the comment above), invstd = 1 / sqrt(var + eps) in x's dtype, and
    y = gamma * ((x - mean) * invstd) + beta as ``bn_forward``: everything bit for bit as
    ``BatchNorm`` computes it with the array code. xhat is not stored: ``bn_backward_x``
    recomputes it from x (the same floats), which saves writing a batch-sized array and
    reading nothing more back. Needs x.size > 0."""
    n, c = x.shape[:2]
    dt = x.dtype
    shape3 = (n, c, x.size // (n * c)) if c > 1 else (1, 1, x.size)
    y = np.empty_like(x)
    mean, var, invstd = np.empty(c, dt), np.empty(c, dt), np.empty(c, dt)
    _bn_train_forward(x.reshape(shape3), gamma, beta, dt.type(eps), mean, var, invstd,
                      y.reshape(shape3))
    return mean, var, invstd, y


def bn_forward(x, mean, invstd, gamma, beta):
    """(xhat, y) of ``BatchNormTrain.forward`` for C-contiguous x (N, C, H, W) and per-channel
    float vectors of x's dtype: xhat = (x - mean) * invstd, y = gamma * xhat + beta, the
    array code's floats."""
    xhat, y = np.empty_like(x), np.empty_like(x)
    if x.size:
        _bn_forward(x, mean, invstd, gamma, beta, xhat, y)
    return xhat, y


@jit(parallel=True)
def _bn_backward(g, src, mean, invstd, gamma, from_x, count, gx, ggamma, gbeta):
    # per channel: the two sums over its planes, then its input gradient, while the planes
    # of g and src are still in cache (one read of each from memory, not two). src is xhat,
    # or x when from_x: then xhat = (x - mean) * invstd, the forward's floats
    n, c = g.shape[0], g.shape[1]
    dt = g.dtype.type
    for ch in prange(c):
        m, s = mean[ch], invstd[ch]
        a = 0.0
        bsum = 0.0
        for b in range(n):
            gg, sv = g[b, ch].reshape(-1), src[b, ch].reshape(-1)
            for t in range(gg.size):
                xh = (sv[t] - m) * s if from_x else sv[t]
                a += np.float64(gg[t])
                bsum += np.float64(gg[t]) * np.float64(xh)
        gbeta[ch], ggamma[ch] = dt(a), dt(bsum)
        gm = gamma[ch]
        a1 = dt(np.float64(gm) * a / count)
        a2 = dt(np.float64(gm) * bsum / count)
        for b in range(n):
            gg, sv, out = g[b, ch].reshape(-1), src[b, ch].reshape(-1), gx[b, ch].reshape(-1)
            for t in range(gg.size):
                xh = (sv[t] - m) * s if from_x else sv[t]
                out[t] = s * ((gg[t] * gm - a1) - xh * a2)


def _bn_backward_call(g, src, mean, invstd, gamma, from_x):
    c = g.shape[1]
    count = g.size // c if c else 0
    gx = np.empty_like(g)
    ggamma, gbeta = np.zeros(c, g.dtype), np.zeros(c, g.dtype)
    if g.size:
        _bn_backward(g, src, mean, invstd, gamma, from_x, max(count, 1), gx, ggamma, gbeta)
    return gx, ggamma, gbeta


def bn_backward_x(g, x, mean, invstd, gamma):
    """``bn_backward(g, xhat, invstd, gamma)`` with xhat = (x - mean) * invstd recomputed from
    x (the floats ``bn_train_forward`` computes it as): the same values, bit for bit."""
    return _bn_backward_call(g, x, mean, invstd, gamma, True)


def bn_backward(g, xhat, invstd, gamma):
    """(g_x, g_gamma, g_beta) of ``BatchNormTrain.backward`` (no synchronisation) for
    C-contiguous g and xhat (N, C, H, W) and per-channel invstd, gamma of their dtype:

        g_beta = sum g,  g_gamma = sum g * xhat  (over N, H, W; float64, rounded once)
        g_x    = invstd * (g * gamma - gamma * g_beta / m - xhat * (gamma * g_gamma / m))

    with m = N*H*W: the array code's values within rounding (see the comment above)."""
    return _bn_backward_call(g, xhat, invstd, invstd, gamma, False)  # (mean unused)
