"""Numba CPU versions of the convolution glue: col2im, sign-patch packing, max pool.

The NumPy code in ``minibnn.functional`` and ``minibnn.binary`` is the reference; each
function here returns the same values, bit for bit, and the numba backend calls these
instead (``backend.conv_kernels()``). Why they exist: in a small ConvNet the GEMMs are
cheap and the glue is not. The NumPy ``col2im`` of a 16-channel 28x28 layer at batch 100
reads a 45 MB patch matrix with one strided slice-add per kernel offset, and the NumPy
max pool makes a temporary per offset; here every image is one task of a ``prange`` loop
that touches its data once. Measured on a 2-core Zen 4 at batch 100 (best of 10, other
jobs running): col2im 5.6 ms against 11-12 ms, sign-patch packing 4.3 ms against 7.8 ms
(16 channels, 28x28), max pool 0.7-1.0 ms against 8.9 ms. A numba im2col did not beat
NumPy's per-offset slice copies (both write the same patch matrix), so there is none.

Layouts (as the NumPy versions):

* ``col2im(cols, x_shape, kh, kw, stride, padding)``: the adjoint of im2col, zero padding. Every
  input element sums its entries in the order of the kernel offsets (i, j) row-major,
  starting from zero, exactly the order of the NumPy slice-adds, so the floats agree.
* ``pack_sign_patches(x, kh, kw, stride, padding)`` -> uint64 (N*Ho*Wo, words): the
  patches of sign(x) in the (i, j, c) order of ``binary.conv_sign_patches``, padding taps
  +1 (bit 1), packed LSB first 64 to a word with the pad bits of the last word 0, i.e.
  ``pack_rows(conv_sign_patches(x, ...))`` in one pass without the bool matrix.
* ``max_pool2d(x, k, stride)`` -> (best, arg) and ``max_pool2d_backward(g, arg, x_shape,
  k, stride)``: floor mode, no padding; the tie rule of ``functional.MaxPool2d`` (the
  first maximal element in row-major window order wins, strict ``>``); ``arg`` is the
  window offset t = i*k + j as uint8 (k*k < 256) or int32.
"""

import numpy as np
from numba import prange

from ._numba_common import jit

__all__ = ["accepts", "col2im", "pack_sign_patches", "max_pool2d", "max_pool2d_backward"]


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
    # x (N, H, W, C) bool (x >= 0); out (N*Ho*Wo, words) uint64, bit t of a row is its
    # patch entry t = (i*kw + j)*C + c; the word is built in a register, stored when full
    n, h, w, c = x.shape
    words = out.shape[1]
    for b in prange(n):
        for y in range(ho):
            for z in range(wo):
                row = (b * ho + y) * wo + z
                word = np.uint64(0)
                t = 0
                q = 0
                for i in range(kh):
                    yy = y * stride + i - padding
                    for j in range(kw):
                        xx = z * stride + j - padding
                        inside = 0 <= yy < h and 0 <= xx < w
                        for ch in range(c):
                            bit = x[b, yy, xx, ch] if inside else True
                            word |= np.uint64(bit) << np.uint64(t)
                            t += 1
                            if t == 64:
                                out[row, q] = word
                                q += 1
                                word = np.uint64(0)
                                t = 0
                if q < words:
                    out[row, q] = word


def pack_sign_patches(x, kh, kw, stride=1, padding=0):
    """``pack_rows(conv_sign_patches(x, kh, kw, stride, padding))`` in one pass: uint64
    (N*Ho*Wo, ceil(kh*kw*C / 64)); see the module docstring."""
    n, c, h, w = x.shape
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    words = (kh * kw * c + 63) // 64
    out = np.empty((n * ho * wo, words), dtype=np.uint64)
    if out.size:
        nhwc = np.ascontiguousarray((x >= 0).transpose(0, 2, 3, 1))
        _pack_sign_patches(nhwc, kh, kw, stride, padding, ho, wo, out)
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


def max_pool2d(x, k, stride):
    """(best, arg) of a k x k max pool with ``stride`` (floor mode); see the module docstring."""
    n, c, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    best = np.empty((n, c, ho, wo), dtype=x.dtype)
    arg = np.empty((n, c, ho, wo), dtype=np.uint8 if k * k < 256 else np.int32)
    if best.size:
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


def max_pool2d_backward(g, arg, x_shape, k, stride):
    """The gradient of ``max_pool2d`` with respect to x: each window's g to its arg."""
    out = np.zeros(tuple(int(s) for s in x_shape), dtype=g.dtype)
    if g.size:
        _max_pool_backward(np.ascontiguousarray(g), arg, k, stride, out)
    return out

