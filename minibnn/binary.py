"""Binarization ops: sign with the straight-through estimator, weight binarization, AP2.

Courbariaux, Hubara, Soudry, El-Yaniv, Bengio, "Binarized Neural Networks", arXiv:1602.02830
(2016). Convention throughout minibnn: sign(0) = +1, never ``np.sign`` (which gives 0).
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from . import backend
from .backend import get_array_module
from .functional import (_fused, compiled_glue, conv2d_backward, conv2d_forward, conv_output_shape,
                         im2col, kernel_offsets)
from .tensor import Function, Tensor


def sign(x):
    """Raw-array sign with sign(0) = +1: ``where(x >= 0, 1, -1)`` in ``x``'s float dtype."""
    if _fused(x):  # the same where(), one launch
        from .kernels import cupy_fused
        return cupy_fused.sign(x)
    if x.dtype.kind == "f" and (glue := _elementwise_glue(x)) is not None:  # numba: one pass
        return glue.sign(x)
    xp = get_array_module(x)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    return xp.where(x >= 0, dtype.type(1), dtype.type(-1))


def _elementwise_glue(x):
    """The numba backend's compiled sign kernels (``kernels.numba_conv``: ``sign``,
    ``sign_ste``, the values of the array code here in one pass) when they take ``x``,
    else None."""
    glue = compiled_glue(x)
    return glue if glue is not None and hasattr(glue, "sign_ste") else None


class SignSTE(Function):
    """Activation binarization (paper eq. 1 and Section 1.3).

    forward:  q = sign(x), with sign(0) = +1
    backward: g_x = g_q * 1{|x| <= 1}, the derivative of hard tanh
    """

    def forward(self, x):
        if _fused(x):  # both lines in one launch
            from .kernels import cupy_fused
            q, keep = cupy_fused.sign_ste(x)
            self.save(keep)
            return q
        if x.dtype.kind == "f" and (glue := _elementwise_glue(x)) is not None:  # numba
            q, keep = glue.sign_ste(x)
            self.save(keep)
            return q
        self.save(abs(x) <= 1)
        return sign(x)

    def backward(self, g):
        keep = self.saved[0]
        if g.dtype.kind == "f" and (glue := _elementwise_glue(g)) is not None \
                and hasattr(glue, "sign_ste_backward") and keep.dtype == np.bool_:
            return (glue.sign_ste_backward(g, keep),)  # numba: the same product, one pass
        return (g * keep,)


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


# --- which product runs: the XNOR kernel or a float GEMM ---------------------------------
#
# A product of +-1 operands is a sum of +-1 terms: an integer of magnitude <= K, which float32
# holds exactly while K < 2**24. So the XNOR-popcount kernel and the float BLAS product give
# the same numbers, and which one runs is a question of speed only. That depends on the
# backend, the CPU or GPU and the shape: packing the operands costs a pass over each, the
# XNOR GEMM then does 64 MACs per word; a small batch or a thin layer may not repay the
# packing, and NumPy's reference XNOR (``np.bitwise_count``) rarely beats BLAS at all.
# With the "auto" setting each product shape is timed once on first use (both paths, after
# a warm-up) and the faster one is kept for that shape in this process.

PRODUCT_PATHS = ("auto", "xnor", "float")
_product_path = None  # resolved from MINIBNN_BINARY_PRODUCT on first use
_choices = {}         # (backend, op, shape...) -> "xnor" | "float"
FLOAT_EXACT_K = 2 ** 24  # float32 holds every integer of magnitude <= 2**24


def product_path():
    """How products of +-1 operands run in binary layers: "auto" (default; the faster path
    per shape, measured on first use), "xnor" (always the XNOR-popcount kernel) or "float"
    (always the float product). Set by ``set_product_path`` or ``MINIBNN_BINARY_PRODUCT``."""
    global _product_path
    if _product_path is None:
        _product_path = _check_path(os.environ.get("MINIBNN_BINARY_PRODUCT", "auto"),
                                    "MINIBNN_BINARY_PRODUCT")
    return _product_path


def _check_path(name, what):
    name = str(name).strip().lower()
    if name not in PRODUCT_PATHS:
        raise ValueError(f"{what}: expected one of {', '.join(PRODUCT_PATHS)}, got {name!r}")
    return name


def set_product_path(name):
    """Choose how binary layers multiply (see ``product_path``); returns the previous one."""
    global _product_path
    previous = product_path()
    _product_path = _check_path(name, "set_product_path")
    return previous


def product_choices():
    """{(backend, op, shape...): "xnor" | "float"}: what "auto" measured so far."""
    return dict(_choices)


def _timed(fn, repeats):
    out, best = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        backend.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


_defer_nan = [False]  # inside deferred_nan_checks(): GPU packing checks NaN without a sync


@contextlib.contextmanager
def deferring_nan_checks():
    """The deferral of :func:`deferred_nan_checks` without its report at the end: for code
    that reports with :func:`raise_deferred_nan` itself (``graphs.GraphedStep``'s caller)."""
    previous = _defer_nan[0]
    _defer_nan[0] = True
    try:
        yield
    finally:
        _defer_nan[0] = previous


@contextlib.contextmanager
def deferred_nan_checks():
    """Within this block, a binary layer's packing of a GPU array does not read its NaN check
    back at once (that waits for the GPU, once per layer and step): a NaN sets a flag on the
    device, and :func:`raise_deferred_nan` reports it when called (``train.train_epoch`` does
    at each read of the loss) and when the block ends. CPU arrays are checked at once, as
    outside the block."""
    outermost = not _defer_nan[0]
    with deferring_nan_checks():
        yield
    if outermost:
        raise_deferred_nan()


def raise_deferred_nan():
    """Raise ValueError if a deferred check (see :func:`deferred_nan_checks`) met a NaN since
    the last call; a no-op when the GPU backend was never used."""
    if backend.active() == "cupy":
        from .kernels import cupy_gpu
        if cupy_gpu.nan_seen(reset=True):
            raise ValueError("x: cannot binarize NaN (it has no sign): a binary layer's input "
                             "or weights held NaN")


def _pack(kern, a):
    """``kern.pack_rows(a)``, with the NaN check deferred for GPU arrays inside
    :func:`deferred_nan_checks`."""
    if _defer_nan[0] and backend.is_cupy_array(a):
        return kern.pack_rows(a, check_nan="defer")
    return kern.pack_rows(a)


def _run_product(op, key, k, run_xnor, run_float):
    """The result of ``run_xnor()`` or ``run_float()`` (equal values), whichever path the
    setting picks for this shape; under "auto" the first call times both."""
    setting = product_path()
    if k >= FLOAT_EXACT_K or setting == "xnor":
        return run_xnor()
    if setting == "float":
        return run_float()
    key = (backend.active(), op) + tuple(int(v) for v in key)
    choice = _choices.get(key)
    if choice == "xnor":
        return run_xnor()
    if choice == "float":
        return run_float()
    run_xnor()  # warm-up: JIT compilation, first allocations
    run_float()
    out_x, t_x = _timed(run_xnor, 2)
    out_f, t_f = _timed(run_float, 2)
    _choices[key] = "xnor" if t_x <= t_f else "float"
    return out_x if t_x <= t_f else out_f


class BinaryLinearFn(Function):
    """y = x W_b^T for +-1 input x (B, K) and +-1 weight W_b (N, K), the product of a hidden
    binary layer (paper Sections 3 and 4: a . b = K - 2 popcount(a XOR b)).

    forward:  both operands packed 64 signs to a word along K, multiplied by the active
              backend's XNOR-popcount kernel; the integer result is exact in float. Where
              a float GEMM is faster for this shape (``product_path``), that runs instead:
              the same integers, exact in float32 while K < 2**24.
    backward: as for any product, g_x = g W_b and g_W = g^T x. The straight-through
              estimators sit around this op, not in it: SignSTE masked the gradient that
              reaches x's pre-activation, and BinarizeWeights hands g_W to the latent W.
              Both products have a +-1 operand: ``backend.matmul_pm1`` runs them as split
              bf16 GEMMs when ``backend.bf16_backward`` is on (opt-in).
    """

    def forward(self, x, wb):
        if x.ndim != 2 or wb.ndim != 2 or x.shape[1] != wb.shape[1]:
            raise ValueError(f"binary_linear: input of shape {x.shape} does not fit weight of "
                             f"shape {wb.shape}; expected (batch, {wb.shape[-1]})")
        self.save(x, wb)
        kern = backend.kernel_module()

        def run_xnor():
            return kern.xnor_gemm(_pack(kern, x), _pack(kern, wb), x.shape[1]).astype(x.dtype)

        def run_float():
            return backend.matmul(x, wb.T.astype(x.dtype, copy=False))

        return _run_product("linear", (x.shape[0], x.shape[1], wb.shape[0]), x.shape[1],
                            run_xnor, run_float)

    def backward(self, g):
        x, wb = self.saved  # both +-1: each product may run as split bf16 (bf16_backward)
        gx = backend.matmul_pm1(g, wb, "b") if self.needs_input_grad[0] else None
        gw = backend.matmul_pm1(g.T, x, "b") if self.needs_input_grad[1] else None
        return gx, gw


def binary_linear(x, wb):
    """x W_b^T through the XNOR-popcount kernel. x (batch, K) and W_b (N, K) must hold only
    +-1 (a value >= 0 counts as +1): the caller promises it, nothing scans the values."""
    return BinaryLinearFn.apply(x, wb)


# --- binary convolution ----------------------------------------------------------------
#
# The XNOR path orders K = kh*kw*C tap-major, channel-minor, (i, j, c), unlike im2col's
# (c, i, j): each tap then reads C adjacent values of an NHWC copy, the patch matrix comes
# out row-major (fast to pack), and a later kernel could pack channels once per pixel.
# Only the order of the patches and of the weight rows must agree; the sum is the same.

def conv_weight_rows(w):
    """Weight (O, C, kh, kw) as rows (O, kh*kw*C) in the (i, j, c) order of
    ``conv_sign_patches``: ``w.transpose(0, 2, 3, 1).reshape(O, -1)``."""
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def conv_sign_patches(x, kh, kw, stride=1, padding=0):
    """The kh x kw patches of sign(x) as bits, ready for ``pack_rows``: bool
    (N*Ho*Wo, kh*kw*C), rows (n, ho, wo), columns (i, j, c) (see ``conv_weight_rows``):

        patches[(n, ho, wo), (i, j, c)] = xpad[n, c, ho*stride + i, wo*stride + j] >= 0

    where the taps that fall in the padding are True, i.e. +1 (a zero has no sign): a
    product with these patches must subtract ``padding_correction``. One slice copy per
    kernel offset; x (N, C, H, W) may be any real array (a value >= 0 is +1).
    """
    n, c, h, w = x.shape
    _, _, ho, wo = conv_output_shape(x.shape, (1, c, kh, kw), stride, padding,
                                     op="conv_sign_patches")
    xp = get_array_module(x)
    bits = xp.ones((n, h + 2 * padding, w + 2 * padding, c), dtype=bool)  # NHWC, border +1
    bits[:, padding:padding + h, padding:padding + w, :] = (x >= 0).transpose(0, 2, 3, 1)
    out = xp.empty((n, ho, wo, kh, kw, c), dtype=bool)
    for i, j, rows, columns in kernel_offsets(kh, kw, stride, ho, wo):
        out[:, :, :, i, j, :] = bits[:, rows, columns, :]
    return out.reshape(n * ho * wo, kh * kw * c)


def padding_correction(wb, in_hw, stride=1, padding=0):
    """What +1 padding adds to a binary convolution, int32 (O, Ho, Wo):

        corr[o, ho, wo] = sum of wb[o, c, i, j] over the taps (c, i, j) of window (ho, wo)
                          that fall in the padding

    ``xnor(x padded with +1) - corr`` is exactly ``conv2d(x, wb, stride, padding)`` (zero
    padding); see ``xnor_conv2d``. It depends on the weight and the geometry only, not on
    the input. The padding mask m (1 on the border, 0 inside) is the same in every channel,
    so corr = conv2d(m, sum_c wb[:, c]), a product of size (Ho*Wo, kh*kw) x (kh*kw, O).
    ``wb`` (O, C, kh, kw) is taken as signs (a value >= 0 is +1); ``in_hw`` = (H, W).
    """
    o, c, kh, kw = wb.shape
    h, w = (int(v) for v in in_hw)
    _, _, ho, wo = conv_output_shape((1, c, h, w), wb.shape, stride, padding,
                                     op="padding_correction")
    xp = get_array_module(wb)
    if padding == 0:
        return xp.zeros((o, ho, wo), dtype=np.int32)
    wsum = sign(wb).astype(np.float32).sum(axis=1)  # (O, kh, kw); integers, exact
    mask = xp.ones((1, 1, h + 2 * padding, w + 2 * padding), dtype=np.float32)
    mask[:, :, padding:padding + h, padding:padding + w] = 0
    corr = backend.matmul(wsum.reshape(o, -1), im2col(mask, kh, kw, stride).T)  # (O, Ho*Wo)
    return xp.rint(corr).astype(np.int32).reshape(o, ho, wo)


def xnor_conv2d(x, wb, stride=1, padding=0, dtype=np.int32):
    """conv2d(x, wb, stride, padding) for +-1 x and wb by one XNOR-popcount GEMM, exact.

    Zero padding has no sign, so the patches are taken with the border padded by +1
    (bit 1) and the difference is subtracted. For output (n, o, ho, wo) let T be the taps
    of the window, B the ones in the padding, x~ the +1-padded input:

        xnor[n, o, ho, wo] = sum_{t in T} wb[o, t] x~[n, t]
                           = sum_{t in T, t not in B} wb[o, t] x[n, t] + sum_{t in B} wb[o, t]
                           = conv2d(x, wb)[n, o, ho, wo] + corr[o, ho, wo]

    so conv2d = xnor - corr, with ``corr = padding_correction(wb, (H, W), stride, padding)``
    (integers throughout, exact). The GEMM multiplies ``pack_rows(conv_weight_rows(wb))``
    (O, words) by ``pack_rows(conv_sign_patches(x))`` (N*Ho*Wo, words) on the active
    backend's kernel. Returns (N, O, Ho, Wo) C-contiguous in ``dtype``; raw arrays, values
    >= 0 count as +1, no gradient.
    """
    n, o, ho, wo = conv_output_shape(x.shape, wb.shape, stride, padding, op="xnor_conv2d")
    kh, kw = wb.shape[2:]
    kern = backend.kernel_module()
    if (glue := compiled_glue(x)) is not None:  # numba, cupy: sign, patches, packing in one go
        patches = glue.pack_sign_patches(x, kh, kw, stride, padding)
    else:
        patches = kern.pack_rows(conv_sign_patches(x, kh, kw, stride, padding))
    # weights as the left operand: the product (O, N*Ho*Wo) becomes NCHW by moving whole
    # Ho*Wo planes, cheaper than transposing (N*Ho*Wo, O)
    out = kern.xnor_gemm(_pack(kern, conv_weight_rows(wb)), patches, wb[0].size)
    corr = padding_correction(wb, x.shape[2:], stride, padding) if padding else None
    if glue is not None and hasattr(glue, "conv_output"):  # numba: the lines below, one pass
        return glue.conv_output(out, corr, n, ho, wo, dtype)
    out = out.reshape(o, n, ho * wo)
    if padding:
        out -= corr.reshape(o, 1, ho * wo)
    return out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3).astype(dtype, order="C")


class BinaryConv2dFn(Function):
    """out = conv2d(x, W_b, stride, padding) with zero padding, for +-1 input x (N, C, H, W)
    and +-1 weight W_b (O, C, kh, kw): the convolution of a hidden binary layer.

    forward:  ``xnor_conv2d``: one XNOR-popcount GEMM on the patches of x padded with +1,
              minus the padding correction; exact integers, returned in x's dtype. Where
              the float im2col + GEMM is faster for this shape (``product_path``), that
              runs instead (same integers) and its patches serve the backward too.
    backward: that of the zero-padded float convolution (``functional.conv2d_backward``):
              g_x = col2im(g2 @ W2), g_W = g2^T im2col(x) with x padded by ZEROS (the
              +1 border is only a device of the forward; its taps contribute nothing).
              W_b and the patches of x (+-1 and 0) are exact in bf16: both products go
              through ``backend.matmul_pm1`` (split bf16 GEMMs when opted in).
    """

    def forward(self, x, wb, stride=1, padding=0):
        self.save(x, wb)
        self.stride, self.padding, self.patches = stride, padding, None
        conv_output_shape(x.shape, wb.shape, stride, padding, op="binary_conv2d")  # shape check

        def run_xnor():
            self.patches = None
            return xnor_conv2d(x, wb, stride, padding, dtype=x.dtype)

        def run_float():
            out, patches = conv2d_forward(x, wb.astype(x.dtype, copy=False), stride, padding)
            self.patches = patches if self.needs_input_grad[1] else None
            return out

        return _run_product("conv2d", x.shape + wb.shape + (stride, padding), wb[0].size,
                            run_xnor, run_float)

    def backward(self, g):
        x, wb = self.saved
        patches, self.patches = self.patches, None
        glue = compiled_glue(g)
        if glue is not None and hasattr(glue, "binary_conv2d_backward") \
                and glue.direct_backward_fits(x, g, wb, self.stride, self.padding):
            # numba: no patch matrices; g_x the same floats, g_w within rounding
            return glue.binary_conv2d_backward(g, x, wb, self.stride, self.padding,
                                               *self.needs_input_grad)
        if self.needs_input_grad[1] and patches is None:
            if (backend.bf16_backward() != "off" and glue is not None and x.dtype == np.float32
                    and hasattr(glue, "im2col")):
                # cupy, split bf16 backward: the +-1 / 0 patches as bf16 bits in one pass
                # (half the bytes of float32, and no separate rounding pass in matmul_pm1)
                patches = glue.im2col(x, wb.shape[2], wb.shape[3], self.stride, self.padding,
                                      bf16=True)
            else:
                patches = im2col(x, wb.shape[2], wb.shape[3], self.stride, self.padding)
        return conv2d_backward(g, x.shape, wb, self.stride, self.padding, patches,
                               need_x=self.needs_input_grad[0], pm1_product=backend.matmul_pm1)


def binary_conv2d(x, wb, stride=1, padding=0):
    """conv2d(x, W_b, stride, padding) (zero padding) through the XNOR-popcount kernel. x
    (N, C, H, W) and W_b (O, C, kh, kw) must hold only +-1 (a value >= 0 counts as +1):
    the caller promises it, nothing scans the values."""
    return BinaryConv2dFn.apply(x, wb, stride=stride, padding=padding)
