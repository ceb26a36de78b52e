"""Binarization ops: sign with the straight-through estimator, weight binarization, AP2.

Courbariaux, Hubara, Soudry, El-Yaniv, Bengio, "Binarized Neural Networks", arXiv:1602.02830
(2016). Convention throughout minibnn: sign(0) = +1, never ``np.sign`` (which gives 0).
"""

from __future__ import annotations

import numpy as np

from . import backend
from .backend import get_array_module
from .tensor import Function, Tensor


def sign(x):
    """Raw-array sign with sign(0) = +1: ``where(x >= 0, 1, -1)`` in ``x``'s float dtype."""
    xp = get_array_module(x)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    return xp.where(x >= 0, dtype.type(1), dtype.type(-1))


class SignSTE(Function):
    """Activation binarization (paper eq. 1 and Section 1.3).

    forward:  q = sign(x), with sign(0) = +1
    backward: g_x = g_q * 1{|x| <= 1}, the derivative of hard tanh
    """

    def forward(self, x):
        self.save(abs(x) <= 1)
        return sign(x)

    def backward(self, g):
        return (g * self.saved[0],)


class BinarizeWeights(Function):
    """Weight binarization (paper eq. 1 and 2); the latent real weight receives the
    gradient of its binary copy unchanged (it is clipped to [-1, 1] by the optimizer).

    deterministic: w_b = sign(w)
    stochastic:    w_b = +1 with probability sigma(w) = clip((w + 1) / 2, 0, 1), else -1
    """

    def forward(self, w, stochastic=False, rng=None):
        if not stochastic:
            return sign(w)
        if rng is None:
            raise ValueError("stochastic binarization needs rng (a numpy.random.Generator)")
        xp = get_array_module(w)
        p = xp.clip((w + 1) * 0.5, 0, 1)
        u = xp.asarray(rng.random(w.shape, dtype=np.float32))
        return xp.where(u < p, 1, -1).astype(w.dtype)

    def backward(self, g):
        return (g,)


class AP2STE(Function):
    """AP2 rounding with a straight-through gradient (used inside shift-based BN)."""

    def forward(self, x):
        return ap2(x)

    def backward(self, g):
        return (g,)


def sign_ste(x):
    """sign(x) forward, g * 1{|x| <= 1} backward; the BNN activation."""
    return SignSTE.apply(x)


def binarize(w, stochastic=False, rng=None):
    """Binarize latent weights to +-1, deterministically or stochastically (seeded by ``rng``)."""
    return BinarizeWeights.apply(w, stochastic=stochastic, rng=rng)


def ap2_ste(x):
    """ap2(x) forward, identity backward."""
    return AP2STE.apply(x)


def ap2(x):
    """Approximate power of 2 (paper Section 1.4): ap2(x) = sign(x) * 2**round(log2|x|).

    Multiplying by an AP2 value is a bit shift. ap2(0) = 0. Works on raw arrays.
    """
    xp = get_array_module(x)
    x = xp.asarray(x)
    with np.errstate(divide="ignore"):
        mag = xp.exp2(xp.round(xp.log2(xp.abs(x))))
    return (sign(x) * mag).astype(x.dtype if x.dtype.kind == "f" else np.float64)


def binary_matmul(a, b):
    """Exact integer product of two sign matrices, a (M, K) @ b (K, N) -> int32 (M, N).

    Entries are taken as signs (x >= 0 is +1). Both operands are packed 64 signs to a
    word along K and multiplied by the active backend's XNOR-popcount kernel:
    a . b = K - 2 * popcount(a XOR b) (paper Sections 3 and 4). No gradient.
    """
    a = a.data if isinstance(a, Tensor) else a
    b = b.data if isinstance(b, Tensor) else b
    if getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"binary_matmul: shapes {getattr(a, 'shape', type(a).__name__)} and "
                         f"{getattr(b, 'shape', type(b).__name__)} do not align; expected "
                         "(M, K) @ (K, N)")
    kern = backend.kernel_module()
    return kern.xnor_gemm(kern.pack_rows(a), kern.pack_rows(b.T), a.shape[1])


class BinaryLinearFn(Function):
    """y = x W_b^T for +-1 input x (B, K) and +-1 weight W_b (N, K), the product of a hidden
    binary layer (paper Sections 3 and 4: a . b = K - 2 popcount(a XOR b)).

    forward:  both operands packed 64 signs to a word along K, multiplied by the active
              backend's XNOR-popcount kernel; the integer result is exact in float.
    backward: as for any product, g_x = g W_b and g_W = g^T x. The straight-through
              estimators sit around this op, not in it: SignSTE masked the gradient that
              reaches x's pre-activation, and BinarizeWeights hands g_W to the latent W.
    """

    def forward(self, x, wb):
        if x.ndim != 2 or wb.ndim != 2 or x.shape[1] != wb.shape[1]:
            raise ValueError(f"binary_linear: input of shape {x.shape} does not fit weight of "
                             f"shape {wb.shape}; expected (batch, {wb.shape[-1]})")
        self.save(x, wb)
        kern = backend.kernel_module()
        out = kern.xnor_gemm(kern.pack_rows(x), kern.pack_rows(wb), x.shape[1])
        return out.astype(x.dtype)

    def backward(self, g):
        x, wb = self.saved
        gx = g @ wb if self.needs_input_grad[0] else None
        gw = g.T @ x if self.needs_input_grad[1] else None
        return gx, gw


def binary_linear(x, wb):
    """x W_b^T through the XNOR-popcount kernel. x (batch, K) and W_b (N, K) must hold only
    +-1 (a value >= 0 counts as +1): the caller promises it, nothing scans the values."""
    return BinaryLinearFn.apply(x, wb)
