"""Differentiable primitives: one small ``Function`` per op, forward and backward on raw arrays.

Every op here works on NumPy and CuPy arrays alike (``get_array_module``), leaves
broadcasting to ``tensor.unbroadcast``, and is checked by the float64 central-difference
gradient checker in ``tests/test_gradcheck.py``.
"""

from __future__ import annotations

import numpy as np

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
        return a @ b

    def backward(self, g):
        a, b = self.saved
        ga = g @ b.swapaxes(-1, -2) if self.needs_input_grad[0] else None
        gb = a.swapaxes(-1, -2) @ g if self.needs_input_grad[1] else None
        return ga, gb


class Linear(Function):
    """y = x W^T for x (..., in) and W (out, in): the layers' product, with W's gradient
    g^T x computed directly in W's own (out, in) layout rather than through a transpose."""

    def forward(self, x, w):
        if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input of shape {x.shape} does not fit weight of shape "
                             f"{w.shape}; expected (..., {w.shape[1] if w.ndim == 2 else 'in'})")
        self.save(x, w)
        return x @ w.T

    def backward(self, g):
        x, w = self.saved
        gx = g @ w if self.needs_input_grad[0] else None
        gw = None
        if self.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
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


class Dropout(Function):
    """Inverted dropout: zero each unit with probability p, scale survivors by 1/(1-p)."""

    def forward(self, a, p, rng):
        xp = get_array_module(a)
        keep = xp.asarray(rng.random(a.shape, dtype=np.float32) >= p)
        self.save(keep.astype(a.dtype) * a.dtype.type(1.0 / (1.0 - p)))
        return a * self.saved[0]

    def backward(self, g):
        return (g * self.saved[0],)


class BatchNormTrain(Function):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's own mean and
    (biased) variance over ``axes``; the backward pass differentiates through both
    (Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 1)."""

    def forward(self, x, gamma, beta, mean, var, eps, axes):
        shape = [1 if i in axes else n for i, n in enumerate(x.shape)]
        xp = get_array_module(x)
        invstd = (1.0 / xp.sqrt(var + eps)).astype(x.dtype).reshape(shape)
        xhat = (x - mean.reshape(shape)) * invstd
        self.save(xhat, invstd, gamma.reshape(shape))
        self.axes, self.count = axes, x.size // int(np.prod(shape))
        return gamma.reshape(shape) * xhat + beta.reshape(shape)

    def backward(self, g):
        xhat, invstd, gamma = self.saved
        axes = self.axes
        gbeta = g.sum(axis=axes)
        ggamma = (g * xhat).sum(axis=axes)
        gxhat = g * gamma
        gx = invstd * (gxhat - gxhat.mean(axis=axes, keepdims=True)
                       - xhat * (gxhat * xhat).mean(axis=axes, keepdims=True))
        return gx, ggamma, gbeta


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


def dropout(a, p, rng, training=True):
    """Inverted dropout with drop probability ``p``, mask drawn from ``rng`` (a NumPy Generator)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return as_tensor(a)
    return Dropout.apply(a, p=p, rng=rng)


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
