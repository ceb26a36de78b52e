"""CUDA versions of the convolution glue for the cupy backend: im2col, col2im, sign-patch
packing, max pool (source ``conv_glue.cu`` next to this module).

The NumPy code in ``minibnn.functional`` and ``minibnn.binary`` is the reference; each
function here returns the same values, bit for bit, and the cupy backend calls these
instead (``backend.conv_kernels()``), as the numba backend calls
:mod:`minibnn.kernels.numba_conv`. Why they exist: the array code makes one CuPy call per
kernel offset (kh*kw slice copies for im2col, kh*kw slice-adds for col2im, a temporary
per offset for the max pool), and each call costs tens of microseconds of host time, so
a small ConvNet's training step is bound by launches, not by the GPU. Here each function
is one kernel launch (plus the output's allocation), never synchronizes with the host,
and reads its input through its strides (views are not copied first).

Same signatures, layouts and dtypes as ``numba_conv``, plus ``im2col``:

* ``im2col(x, kh, kw, stride, padding, pad_value)`` -> (N*Ho*Wo, C*kh*kw): the patches of
  ``functional.im2col``, as the same transposed (F-ordered) view of a C-contiguous
  (C*kh*kw, N*Ho*Wo) buffer, so the GEMMs after it see the layout they always saw.
* ``col2im(cols, x_shape, kh, kw, stride, padding)``: one thread per input element gathers
  its entries in the kernel-offset order (i, j) row-major starting from 0, the order of
  the NumPy slice-adds, so the floats agree; no atomics.
* ``pack_sign_patches(x, kh, kw, stride, padding)`` -> uint64 (N*Ho*Wo, words):
  ``pack_rows(conv_sign_patches(x, ...))``, one thread per word.
* ``max_pool2d(x, k, stride)`` -> (best, arg), ``max_pool2d_backward(g, arg, x_shape, k,
  stride)``: floor mode, the first maximal element in row-major window order wins (strict
  ``>``); ``arg`` is the window offset i*k + j as uint8 (k*k < 256) or int32. The backward
  adds a window's g only where its arg points (as ``numba_conv``; the NumPy code adds
  ``g * 0`` elsewhere, which differs only for an infinite or NaN g).

Arrays are float32 or float64 CuPy arrays (:func:`accepts`); geometry (shapes, kernel,
stride, padding) is validated by the callers in ``functional`` and ``binary``, dtypes and
the shapes of what is passed here are checked here. Indices are 64-bit throughout.
"""

import numpy as np

from .cupy_gpu import _THREADS, _cp, _function

__all__ = ["accepts", "im2col", "col2im", "pack_sign_patches", "max_pool2d",
           "max_pool2d_backward"]

_SOURCE = "conv_glue.cu"
_MAX_BLOCKS = 1 << 20  # the kernels loop (grid-stride) over whatever a grid this size leaves
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def _is_device(x):
    """True for a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def accepts(x):
    """True when these kernels take ``x``: a float32 or float64 CuPy array (anything else
    runs the array code in ``functional``)."""
    return _is_device(x) and getattr(x, "dtype", None) in _SUFFIX


def _suffix(x, name):
    if not accepts(x):
        raise TypeError(f"{name}: expected a float32 or float64 CuPy array, got "
                        f"{type(x).__name__} of dtype {getattr(x, 'dtype', None)}")
    return _SUFFIX[x.dtype]


def _out_size(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def _strides(x):
    """x's strides in elements (int64), as the kernels index: 0 for a broadcast axis,
    negative for a reversed one."""
    if any(s % x.itemsize for s in x.strides):
        raise ValueError(f"array of shape {tuple(x.shape)}: strides {x.strides} are not whole "
                         f"elements of {x.itemsize} bytes; pass a copy (cupy.ascontiguousarray)")
    return tuple(np.int64(s // x.itemsize) for s in x.strides)


def _launch(kernel, total, args):
    """One launch of ``kernel`` over ``total`` outputs (256 threads a block, a grid-stride
    loop beyond _MAX_BLOCKS blocks); nothing is launched for an empty output."""
    if total > 0:
        blocks = min((total + _THREADS - 1) // _THREADS, _MAX_BLOCKS)
        _function(_SOURCE, kernel)((int(blocks),), (_THREADS,), args)


def _i64(*values):
    return tuple(np.int64(v) for v in values)


def im2col(x, kh, kw, stride=1, padding=0, pad_value=0, bf16=False):
    """The patches of x (N, C, H, W) as ``functional.im2col`` gives them, in one launch:
    (N*Ho*Wo, C*kh*kw), the transposed view of a C-contiguous (C*kh*kw, N*Ho*Wo) buffer;
    padding taps hold ``pad_value``. ``bf16=True`` (float32 x): the same patches as bfloat16
    bit patterns (uint16), ``cupy_fused.to_bf16`` of them written in the same pass."""
    suffix = _suffix(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    if bf16 and x.dtype != np.float32:
        raise TypeError(f"im2col: bf16 patches are made from float32 input, got {x.dtype}")
    n, c, h, w = (int(s) for s in x.shape)
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    out = _cp().empty((c * kh * kw, n * ho * wo), dtype=np.uint16 if bf16 else x.dtype)
    _launch(f"im2col_{suffix}" + ("_bf16" if bf16 else ""), out.size,
            (x, *_i64(n, c, h, w), *_strides(x), *_i64(kh, kw, stride, padding, ho, wo),
             x.dtype.type(pad_value), out))
    return out.T


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """The adjoint of ``im2col`` with zero padding: cols (N*Ho*Wo, C*kh*kw), any layout ->
    (N, C, H, W) C-contiguous, each element the sum of its entries in kernel-offset order."""
    suffix = _suffix(cols, "cols")
    n, c, h, w = (int(s) for s in x_shape)
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    if tuple(cols.shape) != (n * ho * wo, c * kh * kw):
        raise ValueError(f"cols: shape {tuple(cols.shape)} does not fit an input of shape "
                         f"{tuple(x_shape)}; expected {(n * ho * wo, c * kh * kw)}")
    out = _cp().empty((n, c, h, w), dtype=cols.dtype)
    _launch(f"col2im_{suffix}", out.size,
            (cols, *_strides(cols), *_i64(n, c, h, w, kh, kw, stride, padding, ho, wo), out))
    return out


def pack_sign_patches(x, kh, kw, stride=1, padding=0):
    """``pack_rows(conv_sign_patches(x, kh, kw, stride, padding))`` in one launch: uint64
    (N*Ho*Wo, ceil(kh*kw*C / 64)); bit (i*kw + j)*C + c of a row is xpad >= 0, padding
    taps 1, pad bits of the last word 0."""
    suffix = _suffix(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = (int(s) for s in x.shape)
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    words = (kh * kw * c + 63) // 64
    out = _cp().empty((n * ho * wo, words), dtype=np.uint64)
    _launch(f"pack_sign_patches_{suffix}", out.size,
            (x, *_i64(n, c, h, w), *_strides(x),
             *_i64(kh, kw, stride, padding, ho, wo, words), out))
    return out


def _arg_dtype(k):
    return np.dtype(np.uint8) if k * k < 256 else np.dtype(np.int32)


def max_pool2d(x, k, stride):
    """(best, arg) of a k x k max pool of x (N, C, H, W) with ``stride`` (floor mode), both
    (N, C, Ho, Wo) C-contiguous; arg = i*k + j of the first maximal element."""
    suffix = _suffix(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    cp = _cp()
    n, c, h, w = (int(s) for s in x.shape)
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    best = cp.empty((n, c, ho, wo), dtype=x.dtype)
    arg = cp.empty((n, c, ho, wo), dtype=_arg_dtype(k))
    kind = "u8" if arg.dtype == np.uint8 else "i32"
    _launch(f"max_pool2d_{suffix}_{kind}", best.size,
            (x, *_i64(n, c), *_strides(x), *_i64(k, stride, ho, wo), best, arg))
    return best, arg


def max_pool2d_backward(g, arg, x_shape, k, stride):
    """The gradient of ``max_pool2d`` with respect to x, (N, C, H, W) C-contiguous: each
    element sums, in window-offset order, the g of the windows whose arg points at it."""
    suffix = _suffix(g, "g")
    cp = _cp()
    n, c, h, w = (int(s) for s in x_shape)
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    if tuple(g.shape) != (n, c, ho, wo) or tuple(arg.shape) != (n, c, ho, wo):
        raise ValueError(f"g, arg: shapes {tuple(g.shape)} and {tuple(arg.shape)} do not fit "
                         f"a {k}x{k} pool with stride {stride} of an input of shape "
                         f"{tuple(x_shape)}; expected {(n, c, ho, wo)}")
    if arg.dtype != _arg_dtype(k) or not _is_device(arg):
        raise TypeError(f"arg: expected a CuPy array of dtype {_arg_dtype(k)} for k={k}, got "
                        f"{type(arg).__name__} of dtype {arg.dtype}")
    arg = cp.ascontiguousarray(arg)  # the kernel indexes it C-ordered; ours always is
    kind = "u8" if arg.dtype == np.uint8 else "i32"
    out = cp.empty((n, c, h, w), dtype=g.dtype)
    _launch(f"max_pool2d_backward_{suffix}_{kind}", out.size,
            (g, *_strides(g), arg, *_i64(n, c, h, w, k, stride, ho, wo), out))
    return out
