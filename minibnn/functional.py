"""Differentiable primitives: one small ``Function`` per op, forward and backward on raw arrays.

Every op here works on NumPy and CuPy arrays alike (``get_array_module``), leaves
broadcasting to ``tensor.unbroadcast``, and is checked by the float64 central-difference
gradient checker in ``tests/test_gradcheck.py``.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import backend
from .backend import get_array_module, scatter_add
from .tensor import Function, Tensor, as_tensor


def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


def _expand(grad, shape, axis, keepdims):
    """Reshape a reduced gradient so it broadcasts back over ``shape``."""
    if keepdims:
        return grad
    axes = _normalize_axes(axis, len(shape))
    return grad.reshape([1 if i in axes else n for i, n in enumerate(shape)])


# --- elementwise arithmetic ------------------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return g, g


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return g, -g


class Mul(Function):
    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        return g * b, g * a


class Div(Function):
    def forward(self, a, b):
        self.save(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        return g / b, -g * a / (b * b)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Pow(Function):
    """a ** b for a tensor base and exponent (either may be a constant)."""

    def forward(self, a, b):
        out = a ** b
        self.save(a, b, out)
        return out

    def backward(self, g):
        a, b, out = self.saved
        xp = get_array_module(a)
        ga = g * b * a ** (b - 1) if self.needs_input_grad[0] else None
        gb = None
        if self.needs_input_grad[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                gb = g * out * xp.log(xp.where(a > 0, a, 1))
        return ga, gb


class Exp(Function):
    def forward(self, a):
        out = get_array_module(a).exp(a)
        self.save(out)
        return out

    def backward(self, g):
        return (g * self.saved[0],)


class Log(Function):
    def forward(self, a):
        self.save(a)
        return get_array_module(a).log(a)

    def backward(self, g):
        return (g / self.saved[0],)


class Maximum(Function):
    """Elementwise max; at a tie the gradient goes to the first argument."""

    def forward(self, a, b):
        self.save(a >= b)
        return get_array_module(a).maximum(a, b)

    def backward(self, g):
        first = self.saved[0]
        return g * first, g * ~first


class Clip(Function):
    """clip(x, lo, hi); gradient 1 inside [lo, hi], 0 outside (hard tanh for lo=-1, hi=1)."""

    def forward(self, a, lo, hi):
        self.save((a >= lo) & (a <= hi))
        return get_array_module(a).clip(a, lo, hi)

    def backward(self, g):
        return (g * self.saved[0],)


# --- linear algebra and shape ----------------------------------------------------------

class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align; "
                             "expected (..., M, K) @ (..., K, N)")
        self.save(a, b)
        return backend.matmul(a, b)

    def backward(self, g):
        a, b = self.saved
        ga = backend.matmul(g, b.swapaxes(-1, -2)) if self.needs_input_grad[0] else None
        gb = backend.matmul(a.swapaxes(-1, -2), g) if self.needs_input_grad[1] else None
        return ga, gb


class Linear(Function):
    """y = x W^T for x (..., in) and W (out, in): the layers' product, with W's gradient
    g^T x computed directly in W's own (out, in) layout rather than through a transpose."""

    def forward(self, x, w):
        if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input of shape {x.shape} does not fit weight of shape "
                             f"{w.shape}; expected (..., {w.shape[1] if w.ndim == 2 else 'in'})")
        self.save(x, w)
        return backend.matmul(x, w.T)

    def backward(self, g):
        x, w = self.saved
        gx = backend.matmul(g, w) if self.needs_input_grad[0] else None
        gw = None
        if self.needs_input_grad[1]:
            gw = backend.matmul(g.reshape(-1, g.shape[-1]).T, x.reshape(-1, x.shape[-1]))
        return gx, gw


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, g):
        xp = get_array_module(g)
        return (xp.broadcast_to(_expand(g, self.shape, self.axis, self.keepdims), self.shape),)


class Max(Function):
    """Max over axes; the gradient is shared equally among tied maxima."""

    def forward(self, a, axis=None, keepdims=False):
        out = a.max(axis=axis, keepdims=True)
        mask = a == out
        share = mask / mask.sum(axis=axis, keepdims=True)  # float64 from bool / int
        self.save(share.astype(a.dtype) if a.dtype.kind == "f" else share)
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return out if keepdims else out.reshape(
            [n for i, n in enumerate(a.shape) if i not in _normalize_axes(axis, a.ndim)])

    def backward(self, g):
        return (_expand(g, self.shape, self.axis, self.keepdims) * self.saved[0],)


class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {a.shape} into {tuple(shape)}") from None

    def backward(self, g):
        return (g.reshape(self.shape),)


class Transpose(Function):
    """Permute axes; the backward applies the inverse permutation (negative axes are
    normalised first, so argsort sees the true permutation)."""

    def forward(self, a, axes=None):
        if axes is None:
            axes = tuple(range(a.ndim))[::-1]
        axes = tuple(int(i) for i in axes)
        if sorted(i % a.ndim if -a.ndim <= i < a.ndim else i for i in axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the "
                             f"{a.ndim} axes of an array of shape {a.shape}")
        self.axes = tuple(i % a.ndim for i in axes)
        return a.transpose(self.axes)

    def backward(self, g):
        return (g.transpose(tuple(int(i) for i in np.argsort(self.axes))),)


class GetItem(Function):
    """``x[index]`` for basic and integer-array indexing; repeated indices accumulate."""

    def forward(self, a, index):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, g):
        out = get_array_module(g).zeros(self.shape, dtype=g.dtype)
        return (scatter_add(out, self.index, g),)


# --- neural-network building blocks ----------------------------------------------------

class LogSoftmax(Function):
    def forward(self, a, axis=-1):
        xp = get_array_module(a)
        shifted = a - a.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save(out)
        self.axis = axis
        return out

    def backward(self, g):
        out = self.saved[0]
        xp = get_array_module(g)
        return (g - xp.exp(out) * g.sum(axis=self.axis, keepdims=True),)


def _fused(*arrays):
    """True when the arrays are CuPy arrays of one float dtype and the fused GPU kernels
    (``kernels.cupy_fused``) are on: then an op runs its kernel, which computes the lines of
    its array code in their order, to the same floats, in one launch."""
    if not backend.is_cupy_array(arrays[0]):
        return False
    from .kernels import cupy_fused
    dtype = arrays[0].dtype
    return (cupy_fused.enabled() and dtype.kind == "f"
            and all(getattr(a, "dtype", None) == dtype for a in arrays))


_HASH_STEP = np.uint64(0x9E3779B97F4A7C15)
_HASH_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_HASH_MUL2 = np.uint64(0x94D049BB133111EB)


def dropout_threshold(p):
    """The integer threshold of :func:`dropout_keep` for drop probability ``p``:
    ceil(p * 2^24), so that a 24-bit uniform draw is dropped with probability p rounded up
    to a multiple of 2^-24."""
    return int(np.ceil(p * 2.0 ** 24))


def dropout_keep(key, shape, offset, thr, xp=np):
    """The GPU backend's dropout mask: element i (row-major over ``shape``, counted from
    ``offset``) is kept when the top 24 bits of SplitMix64(key + (offset + i + 1) * phi)
    are >= ``thr`` (:func:`dropout_threshold`). SplitMix64's finalizer and the golden-ratio
    increment phi = 0x9E3779B97F4A7C15 are those of Steele, Lea and Flood, "Fast
    Splittable Pseudorandom Number Generators" (OOPSLA 2014). A counter-based draw needs no
    state on the device and no mask from the host: one 63-bit key per call comes from the
    layer's NumPy generator, so runs stay reproducible from the seed and resumable. Written
    with ``xp`` array ops (uint64, wrapping) as the reference of the fused kernel."""
    n = int(np.prod(shape))
    i = xp.arange(n, dtype=np.uint64)
    z = np.uint64(key) + (np.uint64(offset) + i + np.uint64(1)) * _HASH_STEP
    z = (z ^ (z >> np.uint64(30))) * _HASH_MUL1
    z = (z ^ (z >> np.uint64(27))) * _HASH_MUL2
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)) >= np.uint64(thr)).reshape(shape)


class Dropout(Function):
    """Inverted dropout: zero each unit with probability p, scale survivors by 1/(1-p).

    With ``rows=(start, total)``, ``a`` is rows ``start:start + len(a)`` of a batch of
    ``total`` rows: the mask is drawn for the whole batch and those rows are kept, so every
    data-parallel rank draws the same numbers from the shared generator as one process
    does, and its rows get the mask one process would give them (``minibnn.distributed``).

    On the CPU the mask is ``rng.random(shape) >= p``. On the GPU it is drawn on the device
    (:func:`dropout_keep`, one key per call from ``rng``): copying a host-drawn mask to the
    GPU cost a host draw of every element and a transfer per layer and step. So the two
    backends draw different masks from the same seed, each reproducibly.
    """

    def forward(self, a, p, rng, rows=None):
        xp = get_array_module(a)
        if xp is not np:
            key = int(rng.integers(0, 2 ** 63))
            offset = (0 if rows is None else rows[0]) * int(np.prod(a.shape[1:]))
            thr, scale = dropout_threshold(p), 1.0 / (1.0 - p)
            if _fused(a):
                from . import stepvalues
                from .kernels import cupy_fused
                recorder = stepvalues.recording()  # in a CUDA graph: a fresh key per replay
                slot = None if recorder is None else recorder.value(
                    lambda: int(rng.integers(0, 2 ** 63)), key, "u64")
                y, m = cupy_fused.dropout(a, key, offset, thr, scale, slot=slot)
                self.save(m)
                return y
            keep = dropout_keep(key, a.shape, offset, thr, xp)
            self.save(keep.astype(a.dtype) * a.dtype.type(scale))
            return a * self.saved[0]
        if rows is None:
            draw = rng.random(a.shape, dtype=np.float32)
        else:
            start, total = rows
            draw = rng.random((total,) + a.shape[1:], dtype=np.float32)[start:start + a.shape[0]]
        keep = xp.asarray(draw >= p)
        self.save(keep.astype(a.dtype) * a.dtype.type(1.0 / (1.0 - p)))
        return a * self.saved[0]

    def backward(self, g):
        return (g * self.saved[0],)


def _bn_glue(x, axes, *others):
    """The numba backend's batch-norm kernels (``kernels.numba_conv.bn_forward`` and
    ``bn_backward``) when they take this call: C-contiguous NumPy (N, C, H, W) float input,
    statistics over (0, 2, 3), every other array of its dtype; else None (the array code)."""
    glue = compiled_glue(x)
    if glue is None or not hasattr(glue, "bn_backward") or x.ndim != 4 or tuple(axes) != (0, 2, 3):
        return None
    if x.dtype.kind != "f" or not x.flags.c_contiguous:
        return None
    if not all(isinstance(a, type(x)) and a.dtype == x.dtype
               and (a.ndim != 4 or a.flags.c_contiguous) for a in others):
        return None
    return glue


class BatchNormTrain(Function):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's own mean and
    (biased) variance over ``axes``; the backward pass differentiates through both
    (Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 1).

    ``mean=None, var=None``: the statistics are this batch's own, ``x.mean(axis=axes)`` and
    ``x.var(axis=axes)``, computed here (on numba in the same kernel as the forward, to the
    same floats) and appended to the list ``stats`` as (mean, var) for the running averages.

    Synchronised batch norm: when ``mean`` and ``var`` are statistics of a batch split
    across ranks, ``sync`` (an in-place sum over the ranks of a float64 array) and ``count``
    (the batch's size over all ranks) make the backward's two per-channel means,
    mean(g_xhat) and mean(g_xhat * xhat), means over the whole batch too. gamma's and
    beta's gradients stay this rank's sums; the gradient all-reduce adds them up.
    """

    def forward(self, x, gamma, beta, mean, var, eps, axes, sync=None, count=None, stats=None):
        shape = [1 if i in axes else n for i, n in enumerate(x.shape)]
        xp = get_array_module(x)
        self.axes, self.sync = axes, sync
        self.count = x.size // int(np.prod(shape)) if count is None else count
        if mean is None:  # the batch's own statistics: x.mean and x.var over axes
            if not isinstance(stats, list):
                raise TypeError("BatchNormTrain: mean=None (the batch's own statistics) needs "
                                f"stats, a list to append (mean, var) to; got {stats!r}")
            glue = _bn_glue(x, axes, gamma, beta) if x.size and sync is None else None
            if glue is not None and hasattr(glue, "bn_train_forward"):  # numba: one kernel
                mean, var, invstd, y = glue.bn_train_forward(x, gamma, beta, eps)
                stats.append((mean, var))
                # x kept instead of xhat (never written): xhat = (x - centre) * invstd
                self.save(x, invstd.reshape(shape), gamma.reshape(shape))
                self.centre = mean
                return y
            mean = x.mean(axis=axes)
            if backend.is_cupy_array(x):  # fused kernels on or off alike (same floats)
                # x.var's lines, NumPy's order (d = x - mean; d *= d; mean of d): CuPy's own
                # var reduces the broadcast difference in one kernel that ran 10-20x slower
                # than these three over NCHW's axes (0, 2, 3) (about 200 us a call on the
                # CIFAR-10 ConvNet's activations, H200, benchmarks/profile_gpu.py)
                d = x - mean.reshape(shape)
                d *= d
                var = d.mean(axis=axes)
            else:
                var = x.var(axis=axes)
            stats.append((mean, var))
        if _fused(x, mean, gamma, beta) and var.dtype.kind == "f":  # the lines below, 2 launches
            from .kernels import cupy_fused
            invstd = cupy_fused.bn_invstd(var, eps, x.dtype).reshape(shape)
            xhat, y = cupy_fused.bn_forward(x, mean.reshape(shape), invstd, gamma.reshape(shape),
                                            beta.reshape(shape))
            self.save(xhat, invstd, gamma.reshape(shape))
            return y
        invstd = (1.0 / xp.sqrt(var + eps)).astype(x.dtype).reshape(shape)
        if (glue := _bn_glue(x, axes, mean, gamma, beta)) is not None:  # numba: one pass
            xhat, y = glue.bn_forward(x, mean, invstd.reshape(-1), gamma, beta)
            self.save(xhat, invstd, gamma.reshape(shape))
            return y
        xhat = (x - mean.reshape(shape)) * invstd
        self.save(xhat, invstd, gamma.reshape(shape))
        return gamma.reshape(shape) * xhat + beta.reshape(shape)

    def backward(self, g):
        xhat, invstd, gamma = self.saved
        axes = self.axes
        if getattr(self, "centre", None) is not None:  # the numba forward kept x, not xhat
            x = xhat
            if (glue := _bn_glue(g, axes, x, gamma, invstd)) is not None:  # xhat recomputed
                return glue.bn_backward_x(g, x, self.centre, invstd.reshape(-1), gamma.reshape(-1))
            xhat = (x - self.centre.reshape(invstd.shape)) * invstd  # the forward's floats
        if self.sync is None and _fused(g, xhat, gamma, invstd):  # the lines below, fused
            from .kernels import cupy_fused
            gx2, gxhat, gxx = cupy_fused.bn_backward_products(g, gamma, xhat)
            m1 = gxhat.mean(axis=axes, keepdims=True)
            m2 = gxx.mean(axis=axes, keepdims=True)
            gx = cupy_fused.bn_backward_input(invstd, gxhat, m1, xhat, m2)
            return gx, gx2.sum(axis=axes), g.sum(axis=axes)
        if self.sync is None and (glue := _bn_glue(g, axes, xhat, gamma, invstd)) is not None:
            # numba: the two sums in one pass, then the input gradient (values within rounding)
            return glue.bn_backward(g, xhat, invstd.reshape(-1), gamma.reshape(-1))
        gbeta = g.sum(axis=axes)
        ggamma = (g * xhat).sum(axis=axes)
        gxhat = g * gamma
        if self.sync is None:
            m1 = gxhat.mean(axis=axes, keepdims=True)
            m2 = (gxhat * xhat).mean(axis=axes, keepdims=True)
        else:  # one message: both per-channel sums, added over the ranks in float64
            xp = get_array_module(g)
            sums = xp.stack([gxhat.sum(axis=axes, dtype=np.float64),
                             (gxhat * xhat).sum(axis=axes, dtype=np.float64)])
            sums = self.sync(sums) / self.count
            m1, m2 = (s.astype(g.dtype).reshape(invstd.shape) for s in sums)
        gx = invstd * (gxhat - m1 - xhat * m2)
        return gx, ggamma, gbeta


class SyncMean(Function):
    """The mean over ``axes`` (kept as size-1 axes) of an array split across ranks along
    axis 0: this rank's sums and row count, added over the ranks by ``sync`` (an in-place
    float64 sum), divided by the total count. Every rank gets the same mean, so its
    gradient is the sum of every rank's incoming gradient over the total count: the
    backward adds the incoming gradients over the ranks with ``sync`` as well.
    """

    def forward(self, a, axes, sync):
        xp = get_array_module(a)
        local = a.sum(axis=axes, keepdims=True, dtype=np.float64)
        count = a.size // local.size if local.size else 0
        both = sync(xp.concatenate([local.reshape(-1), xp.asarray([count], np.float64)]))
        self.shape, self.sync, self.count = a.shape, sync, float(both[-1])
        if self.count == 0:
            raise ValueError(f"mean over an empty batch (shape {a.shape} on every rank)")
        return (both[:-1] / self.count).astype(a.dtype).reshape(local.shape)

    def backward(self, g):
        xp = get_array_module(g)
        total = self.sync(g.astype(np.float64).reshape(-1)).reshape(g.shape)
        return (xp.broadcast_to((total / self.count).astype(g.dtype), self.shape),)


# --- convolution and pooling (NCHW) ---------------------------------------------------

def _check_int(value, name, op, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{op}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _window_geometry(x_shape, kh, kw, stride, padding, op):
    """(Ho, Wo) of kh x kw windows over a (N, C, H, W) input padded by ``padding``;
    ValueError naming ``op`` and the shapes when the windows do not fit."""
    x_shape = tuple(int(n) for n in x_shape)
    if len(x_shape) != 4:
        raise ValueError(f"{op}: input of shape {x_shape} is not 4-D; expected "
                         "(batch, channels, height, width)")
    kh, kw = _check_int(kh, "kernel height", op, 1), _check_int(kw, "kernel width", op, 1)
    stride = _check_int(stride, "stride", op, 1)
    padding = _check_int(padding, "padding", op, 0)
    hp, wp = x_shape[2] + 2 * padding, x_shape[3] + 2 * padding
    if kh > hp or kw > wp:
        raise ValueError(f"{op}: kernel {kh}x{kw} is larger than the padded input {hp}x{wp} "
                         f"(input of shape {x_shape}, padding {padding})")
    return (hp - kh) // stride + 1, (wp - kw) // stride + 1


def conv_output_shape(x_shape, w_shape, stride=1, padding=0, op="conv2d"):
    """(N, O, Ho, Wo) of ``conv2d(x, w, stride, padding)``, Ho = (H + 2p - kh) // stride + 1.

    Raises ValueError naming ``op`` (the op or layer) and both shapes when x is not
    (N, C, H, W), w not (O, C, kh, kw), the channels differ, the kernel is larger than the
    padded input, or stride (integer >= 1) or padding (integer >= 0) is invalid."""
    x_shape, w_shape = tuple(int(n) for n in x_shape), tuple(int(n) for n in w_shape)
    if len(w_shape) != 4:
        raise ValueError(f"{op}: weight of shape {w_shape} is not 4-D; expected "
                         "(out_channels, in_channels, kernel_height, kernel_width)")
    if len(x_shape) == 4 and x_shape[1] != w_shape[1]:
        raise ValueError(f"{op}: input of shape {x_shape} has {x_shape[1]} channels, the weight "
                         f"of shape {w_shape} expects {w_shape[1]}; expected "
                         f"(batch, {w_shape[1]}, height, width)")
    ho, wo = _window_geometry(x_shape, w_shape[2], w_shape[3], stride, padding, op)
    return x_shape[0], w_shape[0], ho, wo


def pad2d(x, padding, value=0):
    """x (N, C, H, W) with ``padding`` rows and columns of ``value`` added on every side of
    H and W (a new array; x itself when padding is 0)."""
    if padding == 0:
        return x
    xp = get_array_module(x)
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * padding, w + 2 * padding), value, dtype=x.dtype)
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def compiled_glue(x):
    """The active backend's compiled convolution glue (``backend.conv_kernels()``: numba's
    col2im/max pool/sign patches, cupy's CUDA kernels for those and im2col) when it takes
    ``x`` (numba: a NumPy array; cupy: a float32/float64 CuPy array), else None: the array
    code here runs. Both give the same values bit for bit (tests/test_conv_glue.py)."""
    glue = backend.conv_kernels()
    return glue if glue is not None and glue.accepts(x) else None


def kernel_offsets(kh, kw, stride, ho, wo):
    """Yield (i, j, rows, cols) for every kernel offset (i, j) in row-major order, where
    ``xpad[..., rows, cols]`` (rows and cols are slices) holds, for every output position
    (ho, wo), the padded input element that offset reads:
    ``xpad[..., ho*stride + i, wo*stride + j]``."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, slice(i, i + stride * (ho - 1) + 1, stride), \
                slice(j, j + stride * (wo - 1) + 1, stride)


def im2col(x, kh, kw, stride=1, padding=0, pad_value=0):
    """The kh x kw patches of x (N, C, H, W) as rows of a matrix (N*Ho*Wo, C*kh*kw):

        patches[(n, ho, wo), (c, i, j)] = xpad[n, c, ho*stride + i, wo*stride + j]

    rows in (n, ho, wo) order, columns in (c, i, j) order, the order of ``w.reshape(O, -1)``
    for a weight w (O, C, kh, kw), so a convolution is one GEMM: ``patches @ w2.T``.
    ``xpad`` is x with ``padding`` rows and columns of ``pad_value`` around H and W (0 for
    the convolution; +1, i.e. bit 1, for an XNOR product, which then subtracts
    ``binary.padding_correction``).

    Built by one strided slice copy per kernel offset (kh*kw copies, vectorised over N, C
    and positions) into a K-major buffer (C, kh, kw, N, Ho, Wo); the result is that buffer's
    transposed view (F-ordered), which BLAS takes without a copy and ``.T`` makes
    contiguous again. Raw arrays, NumPy or CuPy; no gradient. On the cupy backend a float
    CuPy array takes one CUDA kernel (``cupy_conv.im2col``) that writes the same buffer
    and returns the same view.
    """
    n, c = x.shape[:2]
    ho, wo = _window_geometry(x.shape, kh, kw, stride, padding, "im2col")
    if (glue := compiled_glue(x)) is not None and hasattr(glue, "im2col"):  # cupy: one launch
        return glue.im2col(x, kh, kw, stride, padding, pad_value)
    xpad = pad2d(x, padding, pad_value)
    cols = get_array_module(x).empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i, j, rows, columns in kernel_offsets(kh, kw, stride, ho, wo):
        cols[:, i, j] = xpad[:, :, rows, columns].transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo).T


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """The adjoint of ``im2col`` (zero padding): cols (N*Ho*Wo, C*kh*kw) -> (N, C, H, W).

    Every entry is added back to the input element its patch copied, so an element shared
    by overlapping windows receives the sum of their entries; entries of padding taps are
    dropped. One slice-add per kernel offset (within one offset the targets are distinct,
    so ``+=`` accumulates correctly on NumPy and CuPy alike).
    """
    n, c, h, w = (int(s) for s in x_shape)
    ho, wo = _window_geometry(x_shape, kh, kw, stride, padding, "col2im")
    if tuple(cols.shape) != (n * ho * wo, c * kh * kw):
        raise ValueError(f"col2im: columns of shape {tuple(cols.shape)} do not fit an input of "
                         f"shape {tuple(x_shape)}; expected {(n * ho * wo, c * kh * kw)}")
    if (glue := compiled_glue(cols)) is not None:
        return glue.col2im(cols, x_shape, kh, kw, stride, padding)
    cols = cols.T.reshape(c, kh, kw, n, ho, wo)
    xp = get_array_module(cols)
    out = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    for i, j, rows, columns in kernel_offsets(kh, kw, stride, ho, wo):
        out[:, :, rows, columns] += cols[:, i, j].transpose(1, 0, 2, 3)
    return out[:, :, padding:padding + h, padding:padding + w] if padding else out


def conv2d_backward(g, x_shape, w, stride, padding, patches=None, need_x=True,
                    pm1_product=None):
    """Gradients of out = conv2d(x, w, stride, padding) (zero padding) from g = dL/dout.

    With g2 = g as (N*Ho*Wo, O) and W2 = w.reshape(O, -1):
        g_x = col2im(g2 @ W2)       (None unless ``need_x``)
        g_w = g2^T @ patches        (None when ``patches``, im2col of x, is not given)

    ``pm1_product(a, b, exact)``: for a binary convolution (w and x +-1), the product to use
    instead of ``backend.matmul``, told which operand is +-1 (``backend.matmul_pm1``).
    """
    o = w.shape[0]
    xp = get_array_module(g)
    if (glue := compiled_glue(g)) is not None and hasattr(glue, "swap_planes"):
        g2t = glue.swap_planes(g).reshape(o, -1)  # numba: the copy below, in parallel
    else:
        g2t = xp.ascontiguousarray(g.transpose(1, 0, 2, 3)).reshape(o, -1)  # (O, N*Ho*Wo)
    product = (lambda a, b, exact: backend.matmul(a, b)) if pm1_product is None else pm1_product
    gx = gw = None
    if need_x:
        gx = col2im(product(w.reshape(o, -1).T, g2t, "a").T, x_shape, w.shape[2], w.shape[3],
                    stride, padding)
    if patches is not None:
        gw = product(g2t, patches, "b").reshape(w.shape)
    return gx, gw


def conv2d_forward(x, w, stride=1, padding=0):
    """(out, patches) of the zero-padded convolution of raw arrays x (N, C, H, W) and w
    (O, C, kh, kw): ``patches = im2col(x)`` and one GEMM, out = W2 patches^T with
    W2 = w.reshape(O, C*kh*kw), returned as (N, O, Ho, Wo) C-contiguous. The patches serve
    the weight gradient (``conv2d_backward``)."""
    n, o, ho, wo = conv_output_shape(x.shape, w.shape, stride, padding)
    patches = im2col(x, w.shape[2], w.shape[3], stride, padding)
    out = backend.matmul(w.reshape(o, -1), patches.T).reshape(o, n, ho, wo)
    if (glue := compiled_glue(out)) is not None and hasattr(glue, "swap_planes"):
        return glue.swap_planes(out), patches  # numba: the copy below, in parallel
    return get_array_module(out).ascontiguousarray(out.transpose(1, 0, 2, 3)), patches


class Conv2d(Function):
    """out[n, o] = sum_c x[n, c] (cross-correlated with) w[o, c], zero padding, integer stride.

    forward:  one GEMM, out = im2col(x) @ W2^T with W2 = w.reshape(O, C*kh*kw)
    backward: g_x = col2im(g2 @ W2), g_w = g2^T im2col(x) (see ``conv2d_backward``)
    """

    def forward(self, x, w, stride=1, padding=0):
        out, patches = conv2d_forward(x, w, stride, padding)
        self.save(x.shape, w, patches if self.needs_input_grad[1] else None)
        self.stride, self.padding = stride, padding
        return out

    def backward(self, g):
        x_shape, w, patches = self.saved
        return conv2d_backward(g, x_shape, w, self.stride, self.padding, patches,
                               need_x=self.needs_input_grad[0])


def pool_output_shape(x_shape, k, stride=None, op="max_pool2d"):
    """(N, C, Ho, Wo) of ``max_pool2d(x, k, stride)``: Ho = (H - k) // stride + 1 (floor mode,
    stride defaults to k); ValueError naming ``op`` and the shape when it does not fit."""
    k = _check_int(k, "kernel size", op, 1)
    stride = k if stride is None else stride
    ho, wo = _window_geometry(x_shape, k, k, stride, 0, op)
    return int(x_shape[0]), int(x_shape[1]), ho, wo


class MaxPool2d(Function):
    """Max over k x k windows with a stride, no padding, floor mode (trailing rows and
    columns that do not fill a window are dropped).

    Tie rule: a window's gradient goes entirely to its FIRST maximal element in row-major
    order (as PyTorch and cuDNN), not shared. Ties are common in BNNs, whose convolution
    outputs are integers. With stride < k an element in several windows gets the sum.
    """

    def forward(self, x, k, stride=None):
        stride = k if stride is None else stride
        n, c, ho, wo = pool_output_shape(x.shape, k, stride)
        self.x_shape, self.k, self.stride = x.shape, k, stride
        if (glue := compiled_glue(x)) is not None:
            best, arg = glue.max_pool2d(x, k, stride)
            self.save(arg)
            return best
        xp = get_array_module(x)
        best = arg = None
        for t, (_, _, rows, columns) in enumerate(kernel_offsets(k, k, stride, ho, wo)):
            v = x[:, :, rows, columns]
            if best is None:
                best = v.copy()
                arg = xp.zeros(best.shape, dtype=np.uint8 if k * k < 256 else np.int32)
                continue
            better = v > best  # strict: an equal later element never takes over
            xp.copyto(best, v, where=better)
            xp.copyto(arg, t, where=better)
        self.save(arg)
        return best

    def backward(self, g):
        arg = self.saved[0]
        if (glue := compiled_glue(g)) is not None:
            return (glue.max_pool2d_backward(g, arg, self.x_shape, self.k, self.stride),)
        _, _, ho, wo = g.shape
        gx = get_array_module(g).zeros(self.x_shape, dtype=g.dtype)
        offsets = kernel_offsets(self.k, self.k, self.stride, ho, wo)
        for t, (_, _, rows, columns) in enumerate(offsets):
            gx[:, :, rows, columns] += g * (arg == t)
        return (gx,)


# --- public wrappers -------------------------------------------------------------------

def add(a, b): return Add.apply(a, b)
def sub(a, b): return Sub.apply(a, b)
def mul(a, b): return Mul.apply(a, b)
def div(a, b): return Div.apply(a, b)
def neg(a): return Neg.apply(a)
def pow(a, b): return Pow.apply(a, b)  # noqa: A001  (mirrors the builtin on purpose)
def exp(a): return Exp.apply(a)
def log(a): return Log.apply(a)
def maximum(a, b): return Maximum.apply(a, b)
def relu(a): return Maximum.apply(a, 0.0)
def matmul(a, b): return MatMul.apply(a, b)
def linear(x, w): return Linear.apply(x, w)
def sum(a, axis=None, keepdims=False): return Sum.apply(a, axis=axis, keepdims=keepdims)  # noqa: A001
def max(a, axis=None, keepdims=False): return Max.apply(a, axis=axis, keepdims=keepdims)  # noqa: A001
def reshape(a, *shape): return Reshape.apply(a, shape=_shape_arg(shape))
def transpose(a, *axes):
    """Permute axes as ``ndarray.transpose``: ``transpose(a)`` reverses them;
    ``transpose(a, (2, 0, 1))`` or ``transpose(a, 2, 0, 1)`` (negative axes allowed)."""
    if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
        axes = axes[0]
    return Transpose.apply(a, axes=axes or None)
def log_softmax(a, axis=-1): return LogSoftmax.apply(a, axis=axis)


def conv2d(x, w, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in every deep-learning library), NCHW:
    x (N, C, H, W), w (O, C, kh, kw) -> (N, O, Ho, Wo), Ho = (H + 2*padding - kh) // stride + 1,
    zero padding; one GEMM through ``im2col``. ValueError names the shapes when they do not fit."""
    return Conv2d.apply(x, w, stride=stride, padding=padding)


def max_pool2d(x, k, stride=None):
    """Max over k x k windows of x (N, C, H, W), stride k by default, no padding, floor mode.
    A window's gradient goes to its first maximal element in row-major order."""
    return MaxPool2d.apply(x, k=k, stride=stride)


def clip(a, lo, hi):
    """clip(a, lo, hi) with gradient 1 inside the interval and 0 outside."""
    return Clip.apply(a, lo=lo, hi=hi)


def hardtanh(a):
    """Htanh(x) = clip(x, -1, 1), the paper's surrogate for sign (Section 1.3)."""
    return Clip.apply(a, lo=-1.0, hi=1.0)


def mean(a, axis=None, keepdims=False):
    """Mean over ``axis`` (all axes by default), as a scaled sum."""
    a = as_tensor(a)
    count = int(np.prod([a.shape[i] for i in _normalize_axes(axis, a.ndim)]))
    if count == 0:
        raise ValueError(f"mean over an empty axis of a tensor of shape {a.shape}")
    return Sum.apply(a, axis=axis, keepdims=keepdims) * (1.0 / count)


def dropout(a, p, rng, training=True, rows=None):
    """Inverted dropout with drop probability ``p``, mask drawn from ``rng`` (a NumPy Generator).

    ``rows=(start, total)``: ``a`` holds rows ``start:start + len(a)`` of a batch of ``total``
    rows; the mask is drawn for all ``total`` rows and ``a``'s rows of it are used."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return as_tensor(a)
    if rows is not None:
        start, total = rows
        if not 0 <= start <= start + as_tensor(a).shape[0] <= total:
            raise ValueError(f"dropout rows: rows {start}:{start + as_tensor(a).shape[0]} do not "
                             f"lie in a batch of {total} rows")
    return Dropout.apply(a, p=p, rng=rng, rows=rows)


def sync_mean(a, axes, sync):
    """Mean over ``axes`` (kept) of a batch split across ranks; ``sync`` adds a float64
    array over the ranks in place (see ``SyncMean``)."""
    return SyncMean.apply(a, axes=tuple(axes), sync=sync)


def _shape_arg(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)


# --- operators on Tensor (registered once) ---------------------------------------------

def _rev(fn):
    return lambda self, other: fn(as_tensor(other, like=(self,)), self)


Tensor.__add__ = add
Tensor.__radd__ = _rev(add)
Tensor.__sub__ = sub
Tensor.__rsub__ = _rev(sub)
Tensor.__mul__ = mul
Tensor.__rmul__ = _rev(mul)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = _rev(div)
Tensor.__pow__ = pow
Tensor.__rpow__ = _rev(pow)
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = _rev(matmul)
Tensor.__neg__ = neg
Tensor.__getitem__ = lambda self, index: GetItem.apply(self, index=index)
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.exp = exp
Tensor.log = log
Tensor.reshape = reshape
Tensor.transpose = transpose
Tensor.T = property(lambda self: Transpose.apply(self))
Tensor.clip = clip
