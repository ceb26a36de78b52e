"""Fused elementwise kernels for the cupy backend: one launch where the array code makes many.

A training step on the GPU is launch-bound at the paper's sizes: counted on the 3x4096 MLP,
one step made about 360 CuPy calls, of which Adam's in-place lines were about 190 (twelve
per parameter), and each call costs 20-35 us of host time, far more than the GPU needs for
it. Here each optimizer update of one parameter is one kernel, and so are batch norm's
elementwise passes, sign with its straight-through mask, and dropout with its mask (drawn on
the GPU, so no mask crosses from the host).

Every kernel computes the same operations in the same order and precision as the array code
it replaces (in ``minibnn.optim``, ``nn``, ``functional`` and ``binary``), compiled with
``--fmad=false`` so that no multiply-add is contracted into an FMA: the results are the same
floats, which the GPU tests check bit for bit against the NumPy backend.

``enabled()`` says whether the fused kernels are used (default yes; ``MINIBNN_CUPY_FUSED=0``
or ``with disabled():`` runs the array code on the GPU instead, for comparison).
"""

import contextlib
import os

import numpy as np

__all__ = ["enabled", "disabled", "adam_update", "ema_update", "sign", "sign_ste", "dropout",
           "bn_forward", "bn_invstd", "bn_backward_products", "bn_backward_input", "split_bf16",
           "to_bf16", "to_bf16_x3", "sum3", "BF16_ROUND", "SPLIT_BF16", "SPLIT_BF16_PREAMBLE"]

_OPTIONS = ("--fmad=false",)
_kernels = {}
_enabled = [os.environ.get("MINIBNN_CUPY_FUSED", "1").strip() not in ("0", "false", "no")]


def enabled():
    """True when the optimizers and batch norms use the fused kernels on CuPy arrays."""
    return _enabled[0]


@contextlib.contextmanager
def disabled():
    """Run the array code (many launches) instead of the fused kernels inside this block."""
    previous = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = previous


def _kernel(name):
    kernel = _kernels.get(name)
    if kernel is None:
        import cupy
        in_params, out_params, body = _SOURCES[name]
        kernel = cupy.ElementwiseKernel(in_params, out_params, body, f"minibnn_{name}",
                                        options=_OPTIONS, preamble=_PREAMBLES.get(name, ""))
        _kernels[name] = kernel
    return kernel


_SOURCES = {
    # optim.Adam._delta, then Optimizer.step's w -= delta and clip, line by line
    "adam": (
        "T g, T b1, T c1, T b2, T c2, T eps, float64 alpha, T lo, T hi, bool clip",
        "T w, T m, T v",
        """
        T d = g * c1;              // delta = (1 - beta1) * g
        m = m * b1;                // m *= beta1
        m = m + d;                 // m += delta
        d = g * g;                 // delta = g * g
        d = d * c2;                // delta *= 1 - beta2
        v = v * b2;                // v *= beta2
        v = v + d;                 // v += delta
        d = sqrt(v);               // delta = sqrt(v)
        d = d + eps;               // delta += eps
        d = m / d;                 // delta = m / delta
        d = (T)((double)d * alpha);  // delta *= alpha_t (a float64 scalar: rounded once)
        T nw = w - d;              // w -= delta
        if (clip) {                // clip(w, -clip, clip); NaN stays NaN as in np.clip
            nw = nw < lo ? lo : (nw > hi ? hi : nw);
        }
        w = nw;
        """,
    ),
    # nn._BatchNormBase._update_running: r = (1 - m) * r + m * float32(new)
    "ema": (
        "S x, T c, T mom",
        "T r",
        """
        T a = c * r;               // (1 - momentum) * running
        T b = mom * (T)x;          // momentum * new.astype(float32)
        r = a + b;
        """,
    ),
}


_SOURCES.update({
    # binary.sign: where(x >= 0, 1, -1) (NaN >= 0 is false, so NaN -> -1, as there)
    "sign": ("T x", "T q", "q = x >= (T)0 ? (T)1 : (T)-1;"),
    # binary.SignSTE.forward: keep = abs(x) <= 1, q = sign(x)
    "sign_ste": ("T x", "T q, bool keep",
                 "keep = fabs(x) <= (T)1; q = x >= (T)0 ? (T)1 : (T)-1;"),
    # functional.Dropout.forward on the GPU: the keep mask of functional.dropout_keep (a
    # SplitMix64 hash of key and element index, see there), m = keep * scale, y = a * m
    "dropout": (
        "T a, uint64 key, uint64 offset, uint64 thr, T scale",
        "T y, T m",
        """
        unsigned long long z = key + (offset + (unsigned long long)i + 1ULL)
                               * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z = z ^ (z >> 31);
        m = (z >> 40) >= thr ? scale : (T)0;
        y = a * m;
        """,
    ),
    # functional.BatchNormTrain.forward: invstd = 1 / sqrt(var + eps), cast to x's dtype
    "bn_invstd": ("S var, S eps", "T invstd",
                  "S s = sqrt(var + eps); S r = (S)1 / s; invstd = (T)r;"),
    # xhat = (x - mean) * invstd, y = gamma * xhat + beta (per-channel arrays broadcast)
    "bn_forward": ("T x, T mean, T invstd, T gamma, T beta", "T xhat, T y",
                   "T d = x - mean; xhat = d * invstd; T t = gamma * xhat; y = t + beta;"),
    # BatchNormTrain.backward's products: g * xhat, gxhat = g * gamma, gxhat * xhat
    "bn_backward_products": ("T g, T gamma, T xhat", "T gx2, T gxhat, T gxx",
                             "gx2 = g * xhat; gxhat = g * gamma; gxx = gxhat * xhat;"),
    # gx = invstd * (gxhat - m1 - xhat * m2), in that order
    "bn_backward_input": ("T invstd, T gxhat, T m1, T xhat, T m2", "T gx",
                          "T a = gxhat - m1; T b = xhat * m2; T c = a - b; gx = invstd * c;"),
})


# bf16 rounding to nearest even on the float32 bit pattern u, as kernels.bf16.round_bits: NaN
# stays a quiet NaN, everything else rounds up by half an ulp of bf16 plus the tie bit.
BF16_ROUND = """
    unsigned int h = (u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u)
                                                     : ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
"""
# kernels.bf16.split: parts j = 0, 1, 2 of x at parts[j * n + i]; a non-finite part (exponent
# bits all ones) ends the split with zeros, so inf stays inf instead of inf - inf = NaN.
# The remainder r - part is exact in float32 but may be subnormal, and CuPy compiles every
# kernel with -ftz=true (cupy/cuda/compiler.py appends it to the options), which flushes
# float32 subnormal operands and results to zero, conversions to and from float64 included.
# So the subtraction runs on float64 values built from the bit patterns by integer
# arithmetic (float64 is never flushed, and every float32 is a normal float64) and the
# exact float32 result is read back the same way (SPLIT_BF16_PREAMBLE).
SPLIT_BF16_PREAMBLE = """
__device__ double minibnn_f32_bits_to_f64(unsigned int u) {
    unsigned long long sign = (unsigned long long)(u >> 31) << 63;
    int e = (int)((u >> 23) & 0xFFu);
    unsigned int m = u & 0x7FFFFFu;
    if (e == 0) {                         /* zero or subnormal */
        if (m == 0u) return __longlong_as_double((long long)sign);
        int shift = __clz(m) - 8;         /* moves the leading one to bit 23 */
        m = (m << shift) & 0x7FFFFFu;
        e = 1 - shift;
    }
    return __longlong_as_double((long long)(sign | ((unsigned long long)(e + 896) << 52)
                                            | ((unsigned long long)m << 29)));
}
/* d must be a float32 value (finite, normal or subnormal in float32): its float32 bits */
__device__ unsigned int minibnn_f64_to_f32_bits(double d) {
    unsigned long long b = (unsigned long long)__double_as_longlong(d);
    unsigned int sign = (unsigned int)(b >> 63) << 31;
    int e = (int)((b >> 52) & 0x7FFu) - 896;   /* float32's biased exponent */
    unsigned int m = (unsigned int)((b >> 29) & 0x7FFFFFu);
    if (((b >> 52) & 0x7FFu) == 0u) return sign;          /* +-0 */
    if (e >= 1) return sign | ((unsigned int)e << 23) | m;
    return sign | ((m | 0x800000u) >> (1 - e));             /* a float32 subnormal */
}
"""
SPLIT_BF16 = """
    unsigned int v = __float_as_uint(x);
    for (int j = 0; j < 3; j++) {
        unsigned int u = v;
""" + BF16_ROUND + """
        parts[j * n + i] = (unsigned short)h;
        v = (h & 0x7F80u) == 0x7F80u ? 0u
            : minibnn_f64_to_f32_bits(minibnn_f32_bits_to_f64(u) - minibnn_f32_bits_to_f64(h << 16));
    }
"""
# bf16(x) of a (rows, cols) x written three times: side by side (rows, 3 cols) when
# along_cols, else stacked (3 rows, cols); i is x's C-order index, whatever its strides
TO_BF16_X3 = """
    unsigned int u = __float_as_uint(x);
""" + BF16_ROUND + """
    long long r = i / cols, c = i - r * cols;
    long long at = along_cols ? r * 3 * cols + c : i;
    long long step = along_cols ? cols : rows * cols;
    b[at] = (unsigned short)h;
    b[at + step] = (unsigned short)h;
    b[at + 2 * step] = (unsigned short)h;
"""
_PREAMBLES = {"split_bf16": SPLIT_BF16_PREAMBLE}  # device functions a kernel's body calls
_SOURCES.update({
    "split_bf16": ("float32 x, int64 n", "raw uint16 parts", SPLIT_BF16),
    "to_bf16": ("float32 x", "uint16 b",
                "unsigned int u = __float_as_uint(x);" + BF16_ROUND + "b = (unsigned short)h;"),
    "to_bf16_x3": ("float32 x, int64 rows, int64 cols, bool along_cols", "raw uint16 b",
                   TO_BF16_X3),
    # the three partial products of a split product, summed in this order
    "sum3": ("float32 p, float32 q, float32 r", "float32 y", "y = (p + q) + r;"),
})


# The same two kernels with their per-step scalar read from device memory (a uint64 slot of
# ``vals``; a float64 is stored by its bits): inside a CUDA graph a scalar passed by value
# would be frozen at capture, so ``minibnn.graphs`` refreshes the slots before each replay.
_SOURCES["adam_dev"] = (
    _SOURCES["adam"][0].replace("float64 alpha", "raw uint64 vals, int32 slot"),
    _SOURCES["adam"][1],
    "double alpha = __longlong_as_double((long long)vals[slot]);\n" + _SOURCES["adam"][2],
)
_SOURCES["dropout_dev"] = (
    _SOURCES["dropout"][0].replace("uint64 key", "raw uint64 vals, int32 slot"),
    _SOURCES["dropout"][1],
    "unsigned long long key = vals[slot];\n" + _SOURCES["dropout"][2],
)


def split_bf16(x):
    """The three bf16 parts of float32 CuPy array x (``kernels.bf16.split``: exact for
    2**-110 <= |x| < (2 - 2**-8) 2**127), uint16 bit patterns (3, *x.shape) C-contiguous,
    in one launch. x may be any view (a transpose is read through its strides)."""
    import cupy
    parts = cupy.empty(3 * x.size, dtype=np.uint16)
    if x.size:
        _kernel("split_bf16")(x, np.int64(x.size), parts)
    return parts.reshape((3,) + x.shape)


def to_bf16(x):
    """bf16(x) rounded to nearest even as uint16 bit patterns, C-contiguous, in one launch:
    exact for the +-1 and 0 operands of ``backend.split_matmul_pm1``."""
    import cupy
    if not x.size:
        return cupy.empty(x.shape, dtype=np.uint16)
    return _kernel("to_bf16")(x)


def to_bf16_x3(x, axis):
    """bf16(x) of a 2-D float32 CuPy array (rows, cols), three times, in one launch: side by
    side (rows, 3 cols) for ``axis=1``, stacked (3 rows, cols) for ``axis=0``; C-contiguous
    uint16 bit patterns. The +-1 operand of a split product over the concatenated
    reduction axis (``backend.split_matmul_pm1``)."""
    import cupy
    rows, cols = x.shape
    out = cupy.empty((rows, 3 * cols) if axis == 1 else (3 * rows, cols), dtype=np.uint16)
    if x.size:
        _kernel("to_bf16_x3")(x, np.int64(rows), np.int64(cols), axis == 1, out.reshape(-1))
    return out


def sum3(p, q, r):
    """(p + q) + r of three float32 CuPy arrays of one shape (any strides), in one launch."""
    return _kernel("sum3")(p, q, r)


def sign(x):
    """``binary.sign(x)`` for a float CuPy array, in one launch."""
    return _kernel("sign")(x)


def sign_ste(x):
    """(sign(x), abs(x) <= 1) for a float CuPy array, in one launch."""
    return _kernel("sign_ste")(x)


def dropout(a, key, offset, thr, scale, slot=None):
    """(a * m, m) with m = scale where ``functional.dropout_keep(key, ..., offset, thr)``
    keeps, else 0: the mask drawn on the GPU, in one launch. ``slot=(vals, i)``: the key is
    read from ``vals[i]`` on the device (CUDA graphs)."""
    if slot is None:
        return _kernel("dropout")(a, key, offset, thr, a.dtype.type(scale))
    return _kernel("dropout_dev")(a, slot[0], np.int32(slot[1]), offset, thr, a.dtype.type(scale))


def bn_invstd(var, eps, dtype):
    """1 / sqrt(var + eps) in var's precision, cast to ``dtype``, in one launch."""
    import cupy
    out = cupy.empty(var.shape, dtype=dtype)
    return _kernel("bn_invstd")(var, var.dtype.type(eps), out)


def bn_forward(x, mean, invstd, gamma, beta):
    """(xhat, y) of batch norm's training forward, in one launch (per-channel operands
    already shaped to broadcast against x)."""
    return _kernel("bn_forward")(x, mean, invstd, gamma, beta)


def bn_backward_products(g, gamma, xhat):
    """(g * xhat, g * gamma, g * gamma * xhat) in one launch."""
    return _kernel("bn_backward_products")(g, gamma, xhat)


def bn_backward_input(invstd, gxhat, m1, xhat, m2):
    """invstd * (gxhat - m1 - xhat * m2) in one launch."""
    return _kernel("bn_backward_input")(invstd, gxhat, m1, xhat, m2)


def adam_update(w, g, m, v, beta1, beta2, eps, alpha_t, clip=None, slot=None):
    """Adam's moments and step and the latent-weight clip of one parameter, in place, in one
    launch: the lines of ``optim.Adam._delta`` and ``Optimizer.step`` in their order.
    ``slot=(vals, i)``: alpha_t is read from ``vals[i]`` on the device (CUDA graphs)."""
    lo, hi = (-clip, clip) if clip is not None else (0.0, 0.0)
    if slot is None:
        _kernel("adam")(g, beta1, 1 - beta1, beta2, 1 - beta2, eps, float(alpha_t), lo, hi,
                        clip is not None, w, m, v)
    else:
        _kernel("adam_dev")(g, beta1, 1 - beta1, beta2, 1 - beta2, eps, slot[0],
                            np.int32(slot[1]), lo, hi, clip is not None, w, m, v)


def ema_update(running, new, momentum):
    """running = (1 - momentum) * running + momentum * new (new cast to running's dtype
    first), in place, in one launch: batch norm's running statistics."""
    _kernel("ema")(new, 1 - momentum, momentum, running)
