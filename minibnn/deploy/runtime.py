"""The frozen runtime: run a frozen network on a backend with bits, XNOR and popcount.

A ``FrozenBNN`` holds ``FrozenConv`` layers (a ConvNet's convolutions, each with its
max-pool) followed by ``FrozenLayer``s (dense): packed weights, int32 thresholds for hidden
layers, a float64 affine for the output layer. Running it needs only the backend's kernels
(``pack_bitplanes``, ``bitplane_gemm``, ``xnor_gemm``, ``pack_rows``) and its array module
(slicing, shifts, OR/AND on uint64 words); which backend runs is named by ``backend=`` or is
the active one.

Packed activations between layers
---------------------------------
A convolution's output bits stay packed NHWC: uint64 ``(N, H, W, ceil(C/64))``, the C
channels of a pixel packed along C (bit 1 = +1, padding bits 0). A patch is the
concatenation of its kh*kw pixels' channel *slots*, taps in (i, j, c) order
(``binary.conv_weight_rows``), where a slot is ``slot_bits(C)`` bits: C when C divides 64
(1, 2, ..., 32, 64: 64 / C pixels share a word, nothing is wasted) and otherwise whole
words, ``64 ceil(C/64)``, the bits past C being 0 in both operands. Building a patch is
then a gather of words (and, for C < 64, one shift-OR per tap), never a repacking of bits;
its XNOR-popcount product over ``kh*kw*slot_bits(C)`` bits counts every 0-0 slot padding
bit as an agreement, so ``z = xnor - (kh*kw*slot_bits(C) - kh*kw*C)``. The dense layer
after the last convolution reads the same layout over the H*W pixels (its weight columns
were permuted from the model's (C, H, W) flatten order to (H, W, C) at freeze time).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import time
from collections import namedtuple

import numpy as np

from ..kernels.reference import n_words, pack_rows, pad_mask, unpack_rows

from .. import backend as _backend  # the methods' ``backend=`` argument shadows the name
from ..functional import conv_output_shape, kernel_offsets, pool_output_shape

__all__ = ["PLANES", "PIXEL_MAX", "FrozenLayer", "FrozenConv", "FrozenBNN", "first_layer",
           "FIRST_LAYER_METHODS", "float32_is_exact", "float16_exact_on", "int8_available",
           "dense_first_weights", "first_layer_sums", "slot_bits", "pack_slots", "check_chain"]

PLANES = 8  # bits per input pixel
PIXEL_MAX = 255  # |sum_n 2^n y^n| <= 255: the first layer's |z| is at most 255 k
WORD = 64
_DEFAULT_BATCH = {"numpy": 256, "numba": 1024, "cupy": 8192}
_CONV_BATCH = {"numpy": 64, "numba": 128, "cupy": 2048}  # a ConvNet's activations are larger
# cupy, an MLP's NumPy images, default batch size: batches of about this many bytes, so that
# the host copies the next one into page-locked memory while the GPU runs this one
# (:class:`_PinnedFeed`); 10,000 MNIST images go in 4 batches of 2,560 rows and one of 2,320
_HOST_BATCH_BYTES = 2 << 20


FIRST_LAYER_METHODS = ("auto", "bitplanes", "float32", "int8", "float16")
_FLOAT_METHODS = ("float32", "float16")  # float32 sums s = x . w, exact (float32_is_exact)
FLOAT32_INTEGERS = 2 ** 24  # float32 holds every integer of magnitude <= 2^24 exactly


def float32_is_exact(k):
    """True when a float32 product of uint8 rows (k values <= 255) and +-1 weights is exact:
    every partial sum is an integer of magnitude <= 255 k, exact in float32 while
    255 k <= 2^24 (k <= 65793; MNIST's 784 inputs qualify), in any summation order."""
    return PIXEL_MAX * int(k) <= FLOAT32_INTEGERS


def float32_exact_on(name):
    """Whether backend ``name`` multiplies float32 in plain FP32 (so that the "float32" first
    layer is exact): the CPU backends always; cupy when its products go through
    ``kernels.cupy_blas`` (cuBLAS's default math, no TF32) and ``NVIDIA_TF32_OVERRIDE`` does
    not force TF32 on every float32 product."""
    if name != "cupy":
        return True
    if os.environ.get("NVIDIA_TF32_OVERRIDE", "").strip() == "1" or not _backend._direct_blas[0]:
        return False
    from ..kernels import cupy_blas
    return cupy_blas.available() is None


def float16_exact_on(name):
    """None if backend ``name`` runs the "float16" first layer, else why not: cupy with
    ``kernels.cupy_blas.gemm_ex`` working. Pixels 0..255 and +-1 weights are exact in
    float16, so is each product, and GemmEx accumulates them in float32 (CUBLAS_COMPUTE_32F):
    exact while :func:`float32_is_exact` (k), as every partial sum is an integer < 2^24."""
    if name != "cupy":
        return f"'float16' runs on the cupy backend (cuBLAS GemmEx), not on {name!r}"
    if not _backend._direct_blas[0]:
        return "'float16' needs direct cuBLAS, which MINIBNN_CUPY_BLAS=0 turned off"
    from ..kernels import cupy_blas
    return cupy_blas.gemm_ex_available()


def int8_kernels():
    """The module that runs the "int8" first layer on this CPU: ``kernels.numba_vnni``
    (AVX512-VNNI ``vpdpbusd``), else ``kernels.numba_madd`` (AVX2 ``vpmaddubsw``), else None."""
    from ..kernels import numba_madd, numba_vnni

    return next((m for m in (numba_vnni, numba_madd) if m.available()), None)


def int8_available(name):
    """Whether backend ``name`` runs the "int8" first layer: numba on a CPU with AVX512-VNNI
    or AVX2 (:func:`int8_kernels`)."""
    return name == "numba" and int8_kernels() is not None


DenseFirst = namedtuple("DenseFirst", "w_t offset")
DenseFirst.__doc__ = """The first layer's weights for the float32 (float16) method: ``w_t``
float32 (float16) (k, N) +-1 (the packed rows unpacked and transposed for BLAS) and
``offset`` float32 (N,) = 255 sum_k w (exact)."""

Int8First = namedtuple("Int8First", "wp offset n kern")
Int8First.__doc__ = """The first layer's weights for the int8 method: ``wp`` the +-1 weights as
int8 in the layout of ``kern.pack_weights`` (``kern``: :func:`int8_kernels`' module),
``offset`` float32 (N,) = 255 sum_k w, ``n`` = N."""


def dense_first_weights(weight, k, xp=np, method="float32"):
    """:class:`DenseFirst` (``method="float32"`` or ``"float16"``, in array module xp) or
    :class:`Int8First` (``"int8"``, NumPy) of packed first-layer weights (N, ceil(k/64))."""
    w = unpack_rows(_backend.to_numpy(weight), k, np.float32)  # (N, k) of +-1
    offset = (PIXEL_MAX * w.sum(axis=1, dtype=np.float64)).astype(np.float32)
    if method == "int8":
        kern = int8_kernels()
        if kern is None:
            raise ValueError("method: 'int8' needs a CPU with AVX512-VNNI or AVX2")
        return Int8First(kern.pack_weights(w.astype(np.int8)), offset, w.shape[0], kern)
    dtype = np.float16 if method == "float16" else np.float32
    return DenseFirst(xp.asarray(np.ascontiguousarray(w.T, dtype=dtype)), xp.asarray(offset))


def first_layer(x, weight, k, kern, method="bitplanes", dense=None):
    """z = sum_{n=0..7} 2^n (y^n . w) = (2x - 255) . w = 256 (x_f . w) for uint8 rows x
    (B, k), int32 (|z| <= 255 k), by one of four exact methods:

    * ``"bitplanes"`` (the paper's, Section 1.6): the backend packs the eight bit planes and
      runs its bit-plane XNOR GEMM (``kernels.*.bitplane_gemm``: one XNOR-popcount product
      per plane, combined by shift-add);
    * ``"float32"``: s = x . w as a float32 BLAS product of the pixel values with the +-1
      weights, exact while :func:`float32_is_exact` (k); then z = 2 s - 255 sum(w);
    * ``"int8"``: s = x . w as a uint8 x int8 product accumulated in int32 with AVX512-VNNI
      ``vpdpbusd`` (``kernels.numba_vnni``) or AVX2 ``vpmaddubsw`` (``kernels.numba_madd``;
      NumPy input, :func:`int8_available`), then the same;
    * ``"float16"``: s = x . w on the GPU's tensor cores, float16 pixels and weights (both
      exact) accumulated in float32 by ``cublasGemmEx`` (CuPy input, :func:`float16_exact_on`;
      exact while :func:`float32_is_exact` (k)), then the same.

    ``dense``: the :func:`dense_first_weights` of the method (made here when None).
    """
    if method == "bitplanes":
        return kern.bitplane_gemm(kern.pack_bitplanes(x), weight, k)
    if method not in ("float32", "int8", "float16"):
        raise ValueError(f"method: expected 'bitplanes', 'float32', 'int8' or 'float16', got "
                         f"{method!r}")
    if method in _FLOAT_METHODS and not float32_is_exact(k):
        raise ValueError(f"method: {method!r} is not exact for k = {k} inputs (255 k > 2^24); "
                         "use 'bitplanes'")
    xp = _backend.get_array_module(x)
    if method == "int8" and (xp is not np or not int8_available("numba")):
        raise ValueError("method: 'int8' needs NumPy input and a CPU with AVX512-VNNI or AVX2")
    if method == "float16" and (why := float16_exact_on("cupy" if xp is not np else "numpy")):
        raise ValueError(f"method: {why}")
    dense = dense_first_weights(weight, k, xp, method) if dense is None else dense
    s = first_layer_sums(x, dense)
    z = s.astype(np.int32) if method in _FLOAT_METHODS else s.copy()
    z *= 2  # 2 s - 255 sum(w): integers of magnitude <= 2 * 255 k
    z -= dense.offset.astype(np.int32)
    return z


def first_layer_sums(x, dense, ws=None):
    """s = x . w exactly, (B, N): float32 from BLAS for a :class:`DenseFirst` (see
    :func:`float32_is_exact`; float16 weights: ``cupy_blas.gemm_ex`` on float16 pixels),
    int32 from ``vpdpbusd`` or ``vpmaddubsw`` for an :class:`Int8First`. ``ws``: a dict of
    buffers to reuse (the result is then one of them)."""
    xp = _backend.get_array_module(x)
    m = x.shape[0]
    if isinstance(dense, Int8First):
        mp, kp = -(-m // 4) * 4, -(-x.shape[1] // 4) * 4
        cols = dense.wp.shape[0] * dense.wp.shape[2] // 4  # output columns with padding
        return dense.kern.int8_gemm(x, dense.wp, dense.n,
                                    out=_buf(ws, "s8", (mp, cols), np.int32, xp),
                                    x_buf=_buf(ws, "x8", (mp, kp), np.uint8, xp))
    if dense.w_t.dtype == np.float16:  # CuPy arrays (float16_exact_on): tensor cores
        from ..kernels import cupy_blas
        return cupy_blas.gemm_ex(xp.ascontiguousarray(x).astype(np.float16), dense.w_t)
    xf = _buf(ws, "xf", x.shape, np.float32, xp)
    if xf is None:
        xf = x.astype(np.float32)
    else:
        xf[...] = x
    if _backend.is_cupy_array(xf):  # plain FP32 through cuBLAS where it can (no TF32)
        return _backend.matmul(xf, dense.w_t)
    out = _buf(ws, "sf", (m, dense.w_t.shape[1]), np.float32, xp)
    if out is None:
        return xf @ dense.w_t
    return xp.matmul(xf, dense.w_t, out=out)


def sums_threshold(threshold, offset, k):
    """Thresholds on s = x . w equivalent to z = 2 s - offset >= threshold: as s is an
    integer, z >= t iff s >= ceil((t + offset) / 2), clipped to [-255 k - 1, 255 k + 1] (the
    range of s, one past each end) so that the float32 thresholds are exact."""
    t = np.asarray(threshold, np.int64) + np.asarray(offset, np.float64).astype(np.int64)
    t = -((-t) // 2)  # ceil(t / 2)
    bound = PIXEL_MAX * int(k) + 1
    return np.clip(t, -bound, bound).astype(np.float32)


# ----------------------------------------------------------------------- the slot layout

def slot_bits(c):
    """Bits one pixel's ``c`` channels take in a packed patch (or flattened image): ``c``
    when c divides 64 (several pixels share a word), else ``64 ceil(c/64)`` whole words."""
    c = int(c)
    return c if WORD % c == 0 else WORD * n_words(c)


def pack_slots(bits, c):
    """bool (..., L, c) -> uint64 (..., ceil(L slot_bits(c) / 64)): the L pixels' slots
    concatenated, each c bits then ``slot_bits(c) - c`` zero bits, packed as ``pack_rows``."""
    s = slot_bits(c)
    if s != c:
        pad = np.zeros(bits.shape[:-1] + (s - c,), dtype=bool)
        bits = np.concatenate([bits, pad], axis=-1)
    return pack_rows(bits.reshape(bits.shape[:-2] + (-1,)))


def slot_mask(length, c):
    """uint64 words with 1 on every valid bit of ``length`` slots of ``c`` channels."""
    return pack_slots(np.ones((length, c), dtype=bool), c)


def _channel_mask(c):
    """uint64 (ceil(c/64),): the valid bits of one pixel's packed channels (a +1 pixel)."""
    mask = np.full(n_words(c), np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    mask[-1] = pad_mask(c)
    return mask


def _tap_sums(weight, layer):
    """sum over channels of each tap's +-1 weights, int64 (O, kh, kw), from packed rows."""
    o, (kh, kw), c = layer.n_out, layer.kernel, layer.c_in
    if layer.planes == PLANES:
        w = unpack_rows(weight, layer.k, np.int64).reshape(o, kh, kw, c)
    else:
        w = unpack_rows(weight, layer.gemm_k, np.int64).reshape(o, kh, kw, -1)[..., :c]
    return w.sum(axis=-1)


def border_correction(tap_sums, in_hw, stride, padding):
    """corr[o, ho, wo] = sum of tap_sums[o, i, j] over the taps of window (ho, wo) that fall
    in the padding (``binary.padding_correction`` for the channel-summed filter), int32."""
    o, kh, kw = tap_sums.shape
    h, w = in_hw
    _, _, ho, wo = conv_output_shape((1, 1, h, w), (o, 1, kh, kw), stride, padding)
    border = np.ones((h + 2 * padding, w + 2 * padding), dtype=np.int64)
    border[padding:padding + h, padding:padding + w] = 0
    corr = np.zeros((o, ho, wo), dtype=np.int64)
    for i, j, rows, columns in kernel_offsets(kh, kw, stride, ho, wo):
        corr += tap_sums[:, i, j, None, None] * border[rows, columns]
    return corr.astype(np.int32)


# ----------------------------------------------------------------------------- layers

class FrozenLayer:
    """One frozen binary dense layer: ``z = w . input`` as an exact integer, then either

    * hidden: ``bit = z >= threshold`` (int32 per unit), packed for the next layer, or
    * output: ``score = scale * z + offset`` (float64 per unit).

    ``weight`` is uint64 (n_out, ceil(k/64)), rows packed along the k inputs.
    ``planes`` is 8 when the input is uint8 pixels (first layer: ``z = 256 x_f . w``) and
    1 when it is the previous layer's packed bits. ``in_hwc = (H, W, C)`` when the input is
    a convolution's packed (H, W, C) bits (k = H W C): the rows are then packed in slots
    (``pack_slots``: columns in (h, w, c) order, ``gemm_k = H W slot_bits(C)`` bits).
    """

    kind = "dense"

    def __init__(self, weight, k, planes, threshold=None, scale=None, offset=None,
                 in_hwc=None):
        self.weight = weight
        self.k = int(k)
        self.planes = int(planes)
        self.threshold = threshold
        self.scale = scale
        self.offset = offset
        self.in_hwc = None if in_hwc is None else tuple(int(v) for v in in_hwc)
        if self.in_hwc is not None and math.prod(self.in_hwc) != self.k:
            raise ValueError(f"in_hwc: {self.in_hwc} holds {math.prod(self.in_hwc)} inputs, "
                             f"k is {self.k}")

    @property
    def n_out(self):
        return int(self.weight.shape[0])

    @property
    def is_output(self):
        return self.threshold is None

    @property
    def gemm_k(self):
        """Bits of a packed input row: k, or H W slot_bits(C) after a convolution."""
        if self.in_hwc is None:
            return self.k
        h, w, c = self.in_hwc
        return h * w * slot_bits(c)

    @property
    def z_max(self):
        """Largest |z| this layer can produce: k for bits, 255 k for 8-bit input."""
        return self.k * (PIXEL_MAX if self.planes == PLANES else 1)

    @property
    def out_shape(self):
        return (self.n_out,)

    def __repr__(self):
        kind = "output affine" if self.is_output else "threshold"
        src = ("uint8 bit planes" if self.planes == PLANES else
               "packed bits" if self.in_hwc is None else "packed (H, W, C) bits")
        return f"FrozenLayer({self.k} -> {self.n_out}, input {src}, {kind})"


class FrozenConv:
    """One frozen binary convolution with its max-pool, BN and sign: a hidden layer.

    For output position (ho, wo) and channel o the exact integer pre-activation is

        z[o, ho, wo] = xnor(patch with +1 padding, w'_o) - corr[o, ho, wo]

    (``binary.xnor_conv2d``: padded taps are +1 in the patch, and ``corr`` = the sum of
    w'_o over the taps in the padding, ``border_correction``), exactly the zero-padded float
    convolution. Then ``bit = z >= threshold[o]`` and, with a pool, the bits of a window are
    ORed, or ANDed for the ``negated`` channels: the model computes sign(BN(max z)); a
    channel with BN slope > 0 fires iff max z >= t iff some z >= t, one with slope < 0 iff
    max z <= t iff every -z >= -t, and freeze stored -w (so z' = -z) for those. Max-pool
    ties do not matter: only the maximum's value reaches BN.

    ``planes`` = 8: the first layer on uint8 pixels. Padded pixels are 255 (every plane
    bit 1, i.e. +1 in each plane: +255 w per padded tap), so ``z = bitplane_gemm - 255 corr``
    = 256 x the model's float convolution of ``(2x - 255) / 256``; ``weight`` (O,
    ceil(K/64)) packs each filter's K = kh*kw*C taps densely in (i, j, c) order.
    ``planes`` = 1: the input is packed activations; ``weight`` (O, ceil(kh*kw*S/64)) packs
    the filter's slots (``pack_slots``, S = ``slot_bits(C)``).

    ``in_hwc`` = (H, W, C) of the input; ``kernel`` (kh, kw); ``pool`` None or
    (kernel, stride) of a MaxPool2d; ``threshold`` int32 (O,); ``negated`` bool (O,).
    ``correction`` is computed here from the weights and the geometry.
    """

    kind = "conv"
    is_output = False

    def __init__(self, weight, in_hwc, kernel, stride, padding, planes, threshold, negated,
                 pool=None):
        self.weight = weight
        self.in_hwc = tuple(int(v) for v in in_hwc)
        self.kernel = tuple(int(v) for v in kernel)
        self.stride, self.padding, self.planes = int(stride), int(padding), int(planes)
        self.threshold = threshold
        self.negated = negated
        self.pool = None if pool is None else tuple(int(v) for v in pool)
        h, w, c = self.in_hwc
        o = int(weight.shape[0])
        _, _, ho, wo = conv_output_shape((1, c, h, w), (o, c) + self.kernel, self.stride,
                                         self.padding, op="FrozenConv")
        self.conv_hw = (ho, wo)
        if self.pool is None:
            self.out_hw = (ho, wo)
        else:
            self.out_hw = pool_output_shape((1, o, ho, wo), *self.pool, op="FrozenConv pool")[2:]
        self.correction = border_correction(_tap_sums(weight, self), (h, w), self.stride,
                                            self.padding)

    @property
    def n_out(self):
        return int(self.weight.shape[0])

    @property
    def c_in(self):
        return self.in_hwc[2]

    @property
    def k(self):
        """Taps of one filter: kh kw C."""
        return self.kernel[0] * self.kernel[1] * self.c_in

    @property
    def gemm_k(self):
        """Bits of a packed patch: K for 8-bit input, kh kw slot_bits(C) for packed bits."""
        if self.planes == PLANES:
            return self.k
        return self.kernel[0] * self.kernel[1] * slot_bits(self.c_in)

    @property
    def z_max(self):
        return self.k * (PIXEL_MAX if self.planes == PLANES else 1)

    @property
    def out_shape(self):
        """(C, H, W) of the layer's output bits (after the pool)."""
        return (self.n_out,) + tuple(self.out_hw)

    @property
    def macs(self):
        """Binary multiply-accumulates per image (x 8 bit planes on 8-bit input)."""
        return self.planes * self.conv_hw[0] * self.conv_hw[1] * self.k * self.n_out

    def z_offset(self):
        """int64 (Ho*Wo, O): what the XNOR product adds to z, ``pix corr + slot padding``
        (pix = 255 for 8-bit planes, 1 for bits): ``raw = z + z_offset``."""
        pix = PIXEL_MAX if self.planes == PLANES else 1
        off = pix * self.correction.astype(np.int64) + (self.gemm_k - self.k)
        return off.reshape(self.n_out, -1).T

    def position_thresholds(self):
        """int32 (Ho*Wo, O): ``threshold + z_offset``, compared with the raw product."""
        return (self.threshold.astype(np.int64)[None, :] + self.z_offset()).astype(np.int32)

    def __repr__(self):
        h, w, c = self.in_hwc
        src = "uint8 bit planes" if self.planes == PLANES else "packed bits"
        pool = "" if self.pool is None else f", max-pool {self.pool[0]}/{self.pool[1]}"
        return (f"FrozenConv({c}x{h}x{w} -> {'x'.join(map(str, self.out_shape))}, "
                f"{self.kernel[0]}x{self.kernel[1]} stride {self.stride} padding "
                f"{self.padding}{pool}, input {src}, threshold)")


def check_chain(layers):
    """ValueError unless ``layers`` is [FrozenConv ...] [FrozenLayer hidden ...] FrozenLayer
    output, each layer taking what the one before gives."""
    if not layers or not isinstance(layers[-1], FrozenLayer) or not layers[-1].is_output or \
            any(l.is_output for l in layers[:-1]):
        raise ValueError("layers: expected threshold layers followed by one output layer")
    prev = None
    for i, l in enumerate(layers):
        if not isinstance(l, (FrozenConv, FrozenLayer)):
            raise ValueError(f"layers: layer {i} is a {type(l).__name__}, expected FrozenConv "
                             "or FrozenLayer")
        if l.planes != (PLANES if i == 0 else 1):
            raise ValueError(f"layers: layer {i} has planes {l.planes}; the first layer takes "
                             f"{PLANES} bit planes, every other 1")
        if isinstance(l, FrozenConv):
            if prev is not None and (len(prev) != 3 or l.in_hwc != prev[1:] + prev[:1]):
                raise ValueError(f"layers: conv layer {i} takes (H, W, C) = {l.in_hwc}, the "
                                 f"layer before gives {prev}")
        elif prev is not None and len(prev) == 3:
            if l.in_hwc != prev[1:] + prev[:1]:
                raise ValueError(f"layers: dense layer {i} takes in_hwc {l.in_hwc}, the conv "
                                 f"layer before gives (C, H, W) = {prev}")
        elif l.in_hwc is not None or (prev is not None and l.k != prev[0]):
            raise ValueError(f"layers: layer {i} takes {l.k} inputs"
                             + ("" if prev is None else f", the layer before gives {prev[0]}")
                             + ("" if l.in_hwc is None else f" (in_hwc {l.in_hwc} where no "
                                                           "conv layer comes before)"))
        prev = l.out_shape


# ------------------------------------------------------------------------------ the net

# ``gemm_weight``: what the layer's XNOR product takes as its right operand: ``weight``, or
# on a backend with ``prepare_weights`` the weight kept in the kernels' forms too (numba:
# broadcast panels, nibble planes; cupy: the tensor-core kernel's padded rows and popcounts)
_Prepared = namedtuple("_Prepared", "layer weight threshold and_mask gemm_weight")
# How a backend runs the first layer: "bitplanes", "float32", "int8" or "float16" (``dense``
# holds the DenseFirst / Int8First weights and, for a dense hidden first layer,
# ``sums_threshold`` the thresholds on s = x . w); ``weight`` is the layer weight it was made from (a replaced
# one remakes it).
_FirstPlan = namedtuple("_FirstPlan", "method dense sums_threshold weight")
# the first-layer methods are timed on up to this many rows of the first batch (an MLP's
# images, a ConvNet's patches: whole images' worth), by default the whole batch: timed on
# one image's patches (1,024 rows) float32 won every time on a Zen 4, on 16 images it won
# one time in 8, while on the runtime's batch of 128 CIFAR-10 images int8 took 20 ms and
# float32 29 (float32's output leaves the cache): the sample must be the size it runs at.
_TUNE_ROWS = 1 << 17


class FrozenBNN:
    """A frozen binarized MLP or ConvNet: packed weights, integer thresholds, max-pool on
    bits, a float64 output affine.

    ``scores(x)`` and ``predict(x)`` take raw uint8 images: for an MLP (n, in_features) or
    (n, H, W) with H * W = in_features; for a ConvNet (n, C, H, W), or (n, H, W) when C = 1.
    They are the pixels that ``data.to_pm1`` would have scaled. They run on the active
    backend (or the one named by ``backend=``) and return NumPy.

    ``first_layer_method`` picks how the first layer meets the 8-bit pixels (all exact, see
    :func:`first_layer`): ``"bitplanes"``, ``"float32"``, ``"int8"`` (numba on a CPU with
    AVX512-VNNI or AVX2), ``"float16"`` (cupy: tensor cores through cuBLAS GemmEx) or
    ``"auto"`` (the default): the fastest of bitplanes, float32, int8 and float16 where they
    apply, timed once per backend on the whole first batch, taking turns
    (``first_layer_timings`` keeps the times); on cupy "float32" applies where its products
    are plain FP32 (:func:`float32_exact_on`), "float16" where direct cuBLAS GemmEx works
    (:func:`float16_exact_on`), both only while 255 k < 2^24.

    The layers' weight arrays are read, not copied, on NumPy; on the first call of a backend
    they are copied into the kernels' forms (``prepare_weights`` of ``kernels.numba_cpu``
    and ``kernels.cupy_gpu``: on the GPU for cupy) and kept while each layer holds the same
    array: assign a new array to change a weight, do not write into one. On cupy a hidden
    layer's product and its sign(BN) run as one kernel (``cupy_gpu.gemm_threshold``).

    ``cuda_graph`` (cupy, default True): the forward of a batch shape is captured as one
    CUDA graph at its second batch and replayed after (one launch instead of dozens; see
    :class:`_ForwardGraphs`). A capture that fails leaves that shape eager, with the same
    results; ``graph_failures`` keeps why. Set it to False to run every batch eagerly.

    ``host_staging`` (cupy, default True): NumPy images reach the GPU through two
    page-locked buffers, the next batch copied in by the host while the GPU runs the current
    one (:class:`_PinnedFeed`), and an MLP's default batch is then about 2 MB of images
    (``_HOST_BATCH_BYTES``) so that there is a next batch to overlap. False copies each
    batch with ``cupy.asarray`` after the previous batch's result is read (no overlap), in
    the default batches. Results are the same either way; images already on the GPU are used
    where they are.
    """

    def __init__(self, layers, info=None):
        check_chain(layers)
        self.layers = list(layers)
        self.info = dict(info or {})
        self._device_cache = {}
        self._gemm_weights = {}  # (prepare, id(weight)) -> (weight, kernel-ready form)
        self._first_plans = {}
        self.first_layer_timings = {}
        self.first_layer_method = "auto"
        self.cuda_graph = True
        self.host_staging = True
        self._graphs = _ForwardGraphs()

    @property
    def first_layer_method(self):
        return self._first_layer_method

    @first_layer_method.setter
    def first_layer_method(self, method):
        if method not in FIRST_LAYER_METHODS:
            raise ValueError(f"first_layer_method: expected one of {FIRST_LAYER_METHODS}, got "
                             f"{method!r}")
        k = self.layers[0].k
        if method in _FLOAT_METHODS and not float32_is_exact(k):
            raise ValueError(f"first_layer_method: {method!r} is not exact for a first layer of "
                             f"k = {k} inputs (255 k > 2^24); use 'bitplanes' or 'auto'")
        self._first_layer_method = method
        self._first_plans = {}

    @property
    def is_conv(self):
        return isinstance(self.layers[0], FrozenConv)

    @property
    def input_shape(self):
        """(C, H, W) of a ConvNet's images, (in_features,) of an MLP's rows."""
        if self.is_conv:
            h, w, c = self.layers[0].in_hwc
            return (c, h, w)
        return (self.layers[0].k,)

    @property
    def in_features(self):
        return math.prod(self.input_shape)

    @property
    def classes(self):
        return self.layers[-1].n_out

    def __repr__(self):
        shape = lambda s: str(s[0]) if len(s) == 1 else "x".join(map(str, s))  # noqa: E731
        widths = " -> ".join([shape(self.input_shape)] + [shape(l.out_shape)
                                                          for l in self.layers])
        convs = sum(isinstance(l, FrozenConv) for l in self.layers)
        conv = f"{convs} conv + " if convs else ""
        return (f"FrozenBNN({widths}, {conv}{len(self.layers) - 1 - convs} threshold layers + "
                "output affine)")

    def save(self, path):
        """Write this network to one ``.npz`` (atomically: temporary file, then rename);
        the format is ``deploy.fileformat``'s."""
        from .fileformat import save  # fileformat builds FrozenBNNs: it imports this module
        return save(self, path)

    # ----------------------------------------------------------------------------- running

    def scores(self, x, backend=None, batch_size=None):
        """Class scores ``scale * z + offset`` (float64, NumPy (n, classes)); they equal the
        trained model's eval-mode scores up to float32 rounding."""
        return self._run(x, backend, batch_size, final="scores")

    def predict(self, x, backend=None, batch_size=None):
        """Predicted classes (int64, NumPy (n,)): argmax of the scores, first index on a tie."""
        return self._run(x, backend, batch_size, final="predict")

    def integer_scores(self, x, backend=None, batch_size=None):
        """The output layer's exact integer pre-activations z, int32 (n, classes), NumPy."""
        return self._run(x, backend, batch_size, final=None)

    def trace(self, x, backend=None):
        """Every layer's integer pre-activation z for uint8 images ``x`` (one batch), as a list
        of NumPy int32: (n, n_out) for a dense layer, hidden unit j +1 iff
        ``z[:, j] >= layer.threshold[j]``; (n, O, Ho, Wo) for a conv layer, before its pool.
        (For a unit frozen with a negative BN slope, z is minus the model's pre-activation.)"""
        return self._record(x, backend, "trace")

    def activations(self, x, backend=None):
        """Every hidden layer's output bits for uint8 images ``x`` (one batch), bool NumPy
        (True = +1): (n, C, H, W) after a conv layer's pool, (n, n_out) after a dense layer.
        They equal the outputs of the model's Sign layers."""
        return self._record(x, backend, "bits")

    def _record(self, x, backend, what):
        """Run one batch, collecting each layer's ``what`` ("trace": integer z, "bits":
        output bits) as NumPy arrays."""
        x = self._check_input(x)
        name = _backend_name(backend)
        out = []
        xb = _backend.array_module(name).asarray(x)
        layers, kern = self._prepare(name), _backend.kernel_module(name)
        _forward_batch(xb, layers, kern, first=self._first_plan(name, xb, layers[0], kern),
                       **{what: out})
        return [_backend.to_numpy(a) for a in out]

    def layers_on(self, name):
        """``[(layer, weight, threshold)]`` with the arrays in backend ``name``'s array module:
        the layers' own NumPy arrays, or copies on the GPU made once and cached. A conv
        layer's threshold is its ``position_thresholds()`` table (Ho*Wo, O)."""
        return [(p.layer, p.weight, p.threshold) for p in self._prepare(name)]

    def _output_affine(self, name):
        """(scale, offset) of the output layer in backend ``name``'s array module (on the GPU:
        copies made once and kept with the prepared layers)."""
        xp = _backend.array_module(name)
        out = self.layers[-1]
        if xp is np:
            return xp.asarray(out.scale), xp.asarray(out.offset)
        key = name + ":output affine"
        if key not in self._device_cache:
            self._device_cache[key] = (xp.asarray(out.scale), xp.asarray(out.offset))
        return self._device_cache[key]

    def _prepare(self, name):
        xp = _backend.array_module(name)
        if xp is not np and name in self._device_cache:
            return self._device_cache[name]
        prepare = getattr(_backend.kernel_module(name), "prepare_weights", None)
        prepared = []
        for l in self.layers:
            weight = xp.asarray(l.weight)
            gemm_weight = weight
            if prepare is not None and l.planes != PLANES:  # the first layer has its own
                gemm_weight = self._gemm_weight(l.weight, prepare)
            if isinstance(l, FrozenConv):
                and_mask = None
                if l.pool is not None and l.negated.any():
                    and_mask = xp.asarray(pack_rows(l.negated))
                table = xp.ascontiguousarray(xp.asarray(l.position_thresholds()))
                prepared.append(_Prepared(l, weight, table, and_mask, gemm_weight))
            else:
                prepared.append(_Prepared(l, weight, None if l.is_output
                                          else xp.asarray(l.threshold), None, gemm_weight))
        if xp is not np:
            self._device_cache[name] = prepared
        return prepared

    def _gemm_weight(self, weight, prepare):
        """``prepare(weight)`` (the backend's ``prepare_weights``: the weights also in the
        forms its kernels read, made once instead of in every product), kept while the layer
        holds this same array."""
        key = (prepare, id(weight))
        entry = self._gemm_weights.get(key)
        if entry is None or entry[0] is not weight:
            entry = self._gemm_weights[key] = (weight, prepare(weight))
        return entry[1]

    def first_layer_plan(self, x, backend=None):
        """How backend ``backend`` runs the first layer: a namedtuple with ``method``
        (``"bitplanes"``, ``"float32"``, ``"int8"`` or ``"float16"``), ``dense`` (the method's
        weights, or None) and ``sums_threshold`` (for a dense hidden first layer not on bit
        planes, else None). With ``first_layer_method = "auto"`` the first call times the candidates on the
        uint8 batch ``x`` (NumPy rows or images as ``predict`` takes them)."""
        name = _backend_name(backend)
        xb = _backend.array_module(name).asarray(self._check_input(x))
        layers = self._prepare(name)
        return self._first_plan(name, xb, layers[0], _backend.kernel_module(name))

    def _first_plan(self, name, x, first, kern):
        """The :data:`_FirstPlan` of backend ``name``, made (and for ``"auto"`` timed on the
        batch ``x``) on first use and kept while the first layer's weight stays the same."""
        plan = self._first_plans.get(name)
        if plan is not None and plan.weight is first.layer.weight:
            return plan
        layer, xp = first.layer, _backend.array_module(name)
        method = self.first_layer_method
        if method == "int8" and not int8_available(name):
            raise ValueError(f"first_layer_method: 'int8' runs on the numba backend of a CPU "
                             f"with AVX512-VNNI or AVX2, not on backend {name!r} here")
        if method == "float16" and (why := float16_exact_on(name)):
            raise ValueError(f"first_layer_method: {why}")
        candidates = [method]
        if method == "auto":
            candidates = ["bitplanes"]
            if float32_is_exact(layer.k) and float32_exact_on(name):
                candidates.append("float32")
            if int8_available(name):
                candidates.append("int8")
            if float32_is_exact(layer.k) and float16_exact_on(name) is None:
                candidates.append("float16")
        weights = {m: dense_first_weights(first.weight, layer.k, xp, m)
                   for m in candidates if m != "bitplanes"}
        if len(candidates) > 1:
            sample = (x[:_TUNE_ROWS] if isinstance(layer, FrozenLayer) else
                      pixel_patches(x[:max(1, _TUNE_ROWS // math.prod(layer.conv_hw))],
                                    layer, xp))
            if sample.shape[0] == 0:  # nothing to time on: bit planes, decided later
                return _FirstPlan("bitplanes", None, None, layer.weight)
            # each method timed as the forward runs it: a hidden dense first layer with a
            # dense method stops at the sums s (thresholded directly, see _forward_batch),
            # the others compute z
            fused = isinstance(layer, FrozenLayer) and not layer.is_output

            def run(m):
                if fused and m != "bitplanes":
                    return first_layer_sums(sample, weights[m])
                return first_layer(sample, first.weight, layer.k, kern, m, weights.get(m))

            times = _best_times({m: (lambda m=m: run(m)) for m in candidates}, name)
            self.first_layer_timings[name] = times
            method = min(times, key=times.get)
        else:
            method = candidates[0]
        dense, t_s = weights.get(method), None
        if dense is not None and isinstance(layer, FrozenLayer) and not layer.is_output:
            t_s = sums_threshold(layer.threshold, _backend.to_numpy(dense.offset), layer.k)
            t_s = xp.asarray(t_s if method in _FLOAT_METHODS else t_s.astype(np.int32))
        plan = _FirstPlan(method, dense, t_s, layer.weight)
        self._first_plans[name] = plan
        return plan

    def _check_input(self, x):
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            x = np.asarray(x)
        if not self.is_conv:
            if x.dtype != np.uint8:
                raise TypeError(f"x: expected uint8 pixels (0..255) of shape (n, "
                                f"{self.in_features}), got dtype {x.dtype}; a frozen net takes "
                                "the raw 8-bit images, not the [-1, 1] floats of data.to_pm1")
            if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
                raise ValueError(f"x: expected shape (n, {self.in_features}) (or (n, H, W) with "
                                 f"H*W = {self.in_features}), got shape {tuple(x.shape)}")
            return x.reshape(x.shape[0], self.in_features)
        c, h, w = self.input_shape
        alt = f" or (n, {h}, {w})" if c == 1 else ""
        if x.dtype != np.uint8:
            raise TypeError(f"x: expected uint8 images (0..255) of shape (n, {c}, {h}, {w})"
                            f"{alt}, got dtype {x.dtype}; a frozen net takes the raw 8-bit "
                            "images, not the [-1, 1] floats of data.to_pm1")
        if x.ndim == 4 and tuple(x.shape[1:]) == (c, h, w):
            return x
        if c == 1 and x.ndim == 3 and tuple(x.shape[1:]) == (h, w):
            return x.reshape(x.shape[0], 1, h, w)
        raise ValueError(f"x: expected uint8 images of shape (n, {c}, {h}, {w}){alt}, got "
                         f"shape {tuple(x.shape)}")

    @property
    def graph_failures(self):
        """{batch shape and output: why its CUDA graph capture failed} (cupy)."""
        return dict(self._graphs.failed)

    def _run(self, x, name, batch_size, final):
        x = self._check_input(x)
        name = _backend_name(name)
        kern = _backend.kernel_module(name)
        xp = _backend.array_module(name)
        default = (_CONV_BATCH if self.is_conv else _DEFAULT_BATCH)[name]
        staged = name == "cupy" and self.host_staging and isinstance(x, np.ndarray)
        if staged and not self.is_conv:  # (a ConvNet's batch outlasts its copy as it is)
            row = max(1, x.itemsize * math.prod(x.shape[1:]))
            default = min(default, max(256, _HOST_BATCH_BYTES // row // 256 * 256))
        batch = default if batch_size is None else int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        layers = self._prepare(name)
        # the output affine on the device, made once: a CUDA graph of the forward reads these
        # arrays where they were at capture, so they must outlive every replay (arrays made
        # per call were freed and their memory reused: the H200 run's replays read garbage)
        scale, offset = self._output_affine(name)
        results = []
        ws = {} if xp is np else None  # buffers reused by every batch of this call
        plan = None
        graphs = self._graphs if name == "cupy" and self.cuda_graph else None

        def forward(xb):
            z = _forward_batch(xb, layers, kern, first=plan, ws=ws)
            if final is None:
                return z
            s = z * scale + offset
            return s if final == "scores" else xp.argmax(s, axis=1)

        feed = _PinnedFeed(x, batch) if staged and x.shape[0] else None
        for i in range(0, x.shape[0], batch):
            xb = feed.take(i) if feed is not None else xp.asarray(x[i:i + batch])
            if plan is None:
                plan = self._first_plan(name, xb, layers[0], kern)
            if graphs is None:
                r = forward(xb)
            else:  # the graph is of these layers, this first-layer plan and this output
                r = graphs.run((tuple(xb.shape), xb.dtype.str, final, id(layers), id(plan)),
                               xb, forward, keep=(layers, plan, scale, offset))
            if feed is not None:  # the host copies the next batch while the GPU runs this one
                feed.stage(i + batch)
            results.append(_backend.to_numpy(r))  # (waits for the GPU: r, the staged copy)
        if results:
            return np.concatenate(results)
        width = () if final == "predict" else (self.classes,)
        dtype = {None: np.int32, "scores": np.float64, "predict": np.int64}[final]
        return np.zeros((0,) + width, dtype)


class _PinnedFeed:
    """NumPy batches onto the GPU through two page-locked buffers, one batch ahead (cupy).

    ``cupy.asarray`` of a NumPy batch copies it on the host into a page-locked buffer of
    CuPy's pool, then to the GPU; in a loop that reads each batch's result before it sends
    the next, none of that host copying overlaps the GPU's work: 10,000 MNIST images (7.8
    MB) cost about 1.6 ms on the H200 beside 1.08 ms for the frozen 3x4096 forward of them
    on the device. Copies from page-locked memory are DMA transfers that run asynchronously
    to the host (NVIDIA, "CUDA C++ Best Practices Guide", pinned memory and asynchronous
    transfers). So ``stage(i)`` copies the batch starting at row ``i`` into one of two
    page-locked buffers (a host copy) and queues its transfer into one of two device
    buffers on the current stream; ``take(i)`` gives that device batch. ``FrozenBNN._run``
    stages batch i + 1 after it has queued batch i's forward and before it waits for batch
    i's result, so the host's copy overlaps the GPU's work. Reuse is safe because ``_run``
    waits for each batch's result: when a buffer pair is written again (two batches on),
    the transfer out of it and the forward that read it are done. The first batch is staged
    by the constructor."""

    def __init__(self, x, batch):
        self.x, self.batch = x, batch
        shape = (min(batch, x.shape[0]),) + tuple(x.shape[1:])
        cp = _backend.array_module("cupy")
        self.host = [_backend.pinned_empty(shape, x.dtype) for _ in range(2)]
        self.device = [cp.empty(shape, x.dtype) for _ in range(2)]
        self.stream = _backend.current_stream()
        self.staged = {}
        self.stage(0)

    def stage(self, start):
        """Queue the batch of rows ``start:start + batch`` (nothing past the end)."""
        part = self.x[start:start + self.batch]
        if part.shape[0] == 0:
            return
        slot = (start // self.batch) % 2
        host, device = self.host[slot][:part.shape[0]], self.device[slot][:part.shape[0]]
        np.copyto(host, part)
        device.set(host, stream=self.stream)
        self.staged[start] = device

    def take(self, start):
        return self.staged.pop(start)


class _ForwardGraphs:
    """A frozen net's cupy forward, one CUDA graph per batch shape (``FrozenBNN.cuda_graph``).

    The frozen forward of a batch is a few dozen small kernels (pack, product with its
    threshold epilogue, pool, per layer), each launched from Python at 20-35 us: at a
    batch of 100 the launches, not the GPU, set the time. A graph records them once and
    replays them in one launch (NVIDIA, "CUDA C++ Programming Guide", CUDA Graphs), as
    ``minibnn.graphs`` does for the training step. The first batch of a shape runs eagerly
    (it compiles kernels and, for ``first_layer_method = "auto"``, has been timed before);
    the second is captured with ``backend.capture_graph`` (its own memory pool: the graph's
    buffers, the output included, belong to it alone); later ones copy the batch into the
    graph's input array and replay. The output array is overwritten by the next replay, so
    ``_run`` copies it to the host at once. The key holds the identity of the prepared layers
    and the first-layer plan, and the entry keeps both alive (so the identities stay unique):
    new weights or a new plan mean a new graph. A capture that fails (say, a kernel that
    synchronizes) leaves its key eager, with the reason in ``failed``. At most
    ``MAX_GRAPHS`` graphs are kept (each holds its buffers): capturing one more drops the
    oldest."""

    MAX_GRAPHS = 8

    def __init__(self):
        self.stream = None
        self.graphs = {}  # key -> (graph, pool, input array, output array, kept objects)
        self.calls = {}   # key -> eager calls so far
        self.failed = {}  # key -> why its capture failed

    def run(self, key, x, forward, keep):
        entry = self.graphs.get(key)
        if entry is not None:
            graph, _, xs, out, _ = entry
            caller = self._follow_caller()
            with self.stream:
                xs[...] = x
                graph.launch(self.stream)
            _backend.stream_waits_for(caller, self.stream)  # the caller reads out after it
            return out
        if key in self.failed or self.calls.get(key, 0) < 1:
            self.calls[key] = self.calls.get(key, 0) + 1
            return forward(x)
        if self.stream is None:
            self.stream = _backend.capture_stream()
        while len(self.graphs) >= self.MAX_GRAPHS:
            del self.graphs[next(iter(self.graphs))]
        caller = self._follow_caller()
        with self.stream:
            xs = x.copy()
        graph, pool, out, error = _backend.capture_graph(self.stream, lambda: forward(xs))
        if error is not None:
            self.failed[key] = f"{type(error).__name__}: {error}"
            return forward(x)
        self.graphs[key] = (graph, pool, xs, out, keep)
        with self.stream:
            graph.launch(self.stream)
        _backend.stream_waits_for(caller, self.stream)
        return out

    def _follow_caller(self):
        """Make the graphs' stream wait for the work queued so far on the caller's (current)
        stream, which made ``x`` (say, its asynchronous copy from the host); returns that
        stream. The graphs' stream is a blocking one, ordered with the legacy default stream
        anyway; this also orders it after a caller's own non-blocking stream."""
        caller = _backend.current_stream()
        _backend.stream_waits_for(self.stream, caller)
        return caller


# ---------------------------------------------------------------------- the forward pass

def _forward_batch(x, layers, kern, trace=None, bits=None, first=None, ws=None):
    """Integer z of the output layer for one batch of uint8 input ``x`` ((B, k) rows for an
    MLP, (B, C, H, W) images for a ConvNet), the ``FrozenBNN._prepare``d layers, on the
    backend whose kernels are ``kern``. ``trace`` / ``bits`` (lists) collect every layer's z
    and every hidden layer's output bits. ``first``: how to run the first layer (a
    ``_FirstPlan``; None = bit planes). ``ws``: a dict of buffers reused from batch to batch
    (NumPy backends), or None."""
    xp = _backend.get_array_module(x)
    n = x.shape[0]
    # the GEMM with sign(BN) in its epilogue (cupy: no int32 z in memory), unless z is wanted
    fused = None if trace is not None else getattr(kern, "gemm_threshold", None)
    method = "bitplanes" if first is None else first.method
    dense = None if first is None else first.dense
    if trace is not None or bits is not None:
        ws = None  # what is collected must not be overwritten by the next batch
    h = None  # packed activations: (B, H, W, ceil(C/64)) after a conv, (B, words) after dense
    for i, (layer, weight, threshold, and_mask, gemm_weight) in enumerate(layers):
        if isinstance(layer, FrozenConv):
            o, (ho, wo) = layer.n_out, layer.conv_hw
            # bit = raw >= the per-position table (Ho*Wo, O): row r of raw is position r mod Ho*Wo
            if layer.planes != PLANES and fused is not None:
                h = fused(conv_patches(h, layer, xp, kern), gemm_weight, layer.gemm_k,
                          threshold).reshape(n, ho, wo, -1)
            else:
                if layer.planes == PLANES:
                    raw = _conv_first(pixel_patches(x, layer, xp), weight, layer.k, kern,
                                      method, dense)
                else:
                    raw = _conv_gemm(conv_patches(h, layer, xp, kern), gemm_weight,
                                     layer.gemm_k, kern)
                if trace is not None:
                    z = raw.reshape(n, ho * wo, o) - xp.asarray(layer.z_offset())
                    trace.append(z.astype(np.int32).transpose(0, 2, 1).reshape(n, o, ho, wo))
                h = kern.pack_threshold(raw.reshape(n * ho * wo, o), threshold).reshape(
                    n, ho, wo, -1)
            if layer.pool is not None:
                h = pool_words(h, layer.pool, and_mask, xp)
            if bits is not None:
                bits.append(unpack_words(h, o, xp).transpose(0, 3, 1, 2))
            continue
        hidden = threshold is not None
        if layer.planes == PLANES and method != "bitplanes" and hidden and trace is None:
            # fused: threshold the exact sums s = x . w directly (z >= t iff s >= t_s)
            s = first_layer_sums(x, dense, ws)
            h = _pack_threshold(kern, s, first.sums_threshold,
                                _buf(ws, ("h", i), (n, n_words(layer.n_out)), np.uint64, xp))
            if bits is not None:
                bits.append(unpack_words(h, layer.n_out, xp))
            continue
        if layer.planes == PLANES:
            z = first_layer(x, weight, layer.k, kern, method, dense)
        else:
            a = h if layer.in_hwc is None else flatten_words(h, layer.in_hwc[2], xp)
            pad = layer.gemm_k - layer.k  # slot padding bits: 0 in both, counted as +1
            if hidden and fused is not None:
                # z = raw - pad >= t  iff  raw >= t + pad
                h = fused(a, gemm_weight, layer.gemm_k, threshold + pad if pad else threshold)
                if bits is not None:
                    bits.append(unpack_words(h, layer.n_out, xp))
                continue
            out = _buf(ws, ("z", i), (n, layer.n_out), np.int32, xp) if hidden else None
            z = _gemm(kern, a, gemm_weight, layer.gemm_k, out)
            if pad:
                z -= pad
        if trace is not None:
            trace.append(z)
        if not hidden:
            return z
        h = _pack_threshold(kern, z, threshold,  # bit 1 (+1) iff z >= tau
                            _buf(ws, ("h", i), (n, n_words(layer.n_out)), np.uint64, xp))
        if bits is not None:
            bits.append(unpack_words(h, layer.n_out, xp))
    raise AssertionError("unreachable: the last layer is an output layer")


def _buf(ws, key, shape, dtype, xp):
    """The buffer ``ws[key]`` of this shape and dtype (made on first use), or None without ws."""
    if ws is None:
        return None
    b = ws.get(key)
    if b is None or b.shape != tuple(shape) or b.dtype != dtype:
        b = ws[key] = xp.empty(shape, dtype=dtype)
    return b


@functools.lru_cache(maxsize=None)
def _takes_out(fn):
    """Whether a kernel function takes an ``out=`` buffer (``kernels.numba_cpu``'s do)."""
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _gemm(kern, a, weight, k, out):
    if out is not None and _takes_out(kern.xnor_gemm):
        return kern.xnor_gemm(a, weight, k, out=out)
    return kern.xnor_gemm(a, weight, k)


def _pack_threshold(kern, z, threshold, out):
    if out is not None and _takes_out(kern.pack_threshold):
        return kern.pack_threshold(z, threshold, out=out)
    return kern.pack_threshold(z, threshold)


def _best_times(fns, name, rounds=4):
    """{key: best seconds} of the functions ``fns`` ({key: fn}) after a warm-up run each,
    taking turns for ``rounds`` rounds (so a change in the machine's speed falls on all of
    them alike), synchronizing a GPU after each run. One that takes over twice the fastest
    in the first round is not run again (its one time is kept)."""
    sync = (_backend.array_module(name).cuda.Device().synchronize if name == "cupy"
            else lambda: None)
    best = dict.fromkeys(fns, float("inf"))
    running = dict(fns)
    for r in range(rounds + 1):
        for key, fn in running.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                best[key] = min(best[key], time.perf_counter() - t0)
        if r == 1:
            fastest = min(best.values())
            running = {key: fn for key, fn in running.items() if best[key] <= 2 * fastest}
    return best


def _is_reference(kern):
    """The NumPy reference kernels loop in Python over the rows of their left operand."""
    return kern.__name__ == "minibnn.kernels.reference"


def _conv_gemm(patches, weight, k, kern):
    """int32 (B*Ho*Wo, O) XNOR products of patches and filters. On the NumPy reference the
    few filters are the left operand (its Python loop runs over O, not B*Ho*Wo rows)."""
    if _is_reference(kern):
        return kern.xnor_gemm(weight, patches, k).T
    return kern.xnor_gemm(patches, weight, k)


def _conv_first(patches, weight, k, kern, method="bitplanes", dense=None):
    """``first_layer`` on uint8 patches: sum_n 2^n (y^n . w), int32 (B*Ho*Wo, O). With bit
    planes on the NumPy reference, one ``_conv_gemm`` per bit plane combined by shift-add,
    for the reason given there; elsewhere the backend's ``bitplane_gemm`` or float32."""
    if method != "bitplanes" or not _is_reference(kern):
        return first_layer(patches, weight, k, kern, method, dense)
    planes = kern.pack_bitplanes(patches)
    z = None
    for n in range(PLANES - 1, -1, -1):
        y = _conv_gemm(planes[:, n], weight, k, kern)
        z = y if z is None else (z << 1) + y
    return z


def pixel_patches(x, layer, xp):
    """uint8 images (B, C, H, W) -> their patches uint8 (B*Ho*Wo, kh*kw*C), taps in (i, j, c)
    order, padded pixels 255 (+1 in every bit plane; ``z_offset`` removes 255 corr)."""
    n, c, h, w = x.shape
    p, (kh, kw), (ho, wo) = layer.padding, layer.kernel, layer.conv_hw
    nhwc = x.transpose(0, 2, 3, 1)
    if p:
        padded = xp.full((n, h + 2 * p, w + 2 * p, c), PIXEL_MAX, dtype=np.uint8)
        padded[:, p:p + h, p:p + w] = nhwc
    else:
        padded = nhwc
    out = xp.empty((n, ho, wo, kh, kw, c), dtype=np.uint8)
    for i, j, rows, columns in kernel_offsets(kh, kw, layer.stride, ho, wo):
        out[:, :, :, i, j, :] = padded[:, rows, columns, :]
    return out.reshape(n * ho * wo, kh * kw * c)


def conv_patches(h, layer, xp, kern=None):
    """Packed activations (B, H, W, ceil(C/64)) -> packed patches uint64 (B*Ho*Wo, words):
    each tap's channel words gathered into its slot (shifted into a shared word when C
    divides 64), padded pixels all +1 (every valid channel bit set). A kernel module with
    ``conv_patch_words`` (numba) builds the same words in one compiled pass."""
    n, hh, ww, wc = h.shape
    c = layer.c_in
    p, (kh, kw), (ho, wo) = layer.padding, layer.kernel, layer.conv_hw
    s = slot_bits(c)
    if kern is not None and hasattr(kern, "conv_patch_words"):  # numba: one compiled pass
        return kern.conv_patch_words(h, _channel_mask(c), kh, kw, layer.stride, p, s, ho, wo,
                                     n_words(layer.gemm_k))
    if p:
        padded = xp.empty((n, hh + 2 * p, ww + 2 * p, wc), dtype=np.uint64)
        # the +1 pixel of _channel_mask(c), filled from scalars: a host array copied to the
        # GPU here would be a synchronous copy, which fails inside a CUDA graph capture
        padded[...] = np.uint64(0xFFFFFFFFFFFFFFFF)
        padded[..., -1] = np.uint64(pad_mask(c))
        padded[:, p:p + hh, p:p + ww] = h
    else:
        padded = h
    out = xp.zeros((n, ho, wo, n_words(layer.gemm_k)), dtype=np.uint64)
    for t, (_, _, rows, columns) in enumerate(kernel_offsets(kh, kw, layer.stride, ho, wo)):
        tap = padded[:, rows, columns, :]
        if s % WORD == 0:
            out[..., t * wc:(t + 1) * wc] = tap
        else:  # s divides 64: the slot lies inside one word
            word, shift = divmod(t * s, WORD)
            out[..., word] |= tap[..., 0] << np.uint64(shift)
    return out.reshape(n * ho * wo, -1)


def flatten_words(h, c, xp):
    """Packed activations (B, H, W, ceil(C/64)) -> (B, ceil(H W slot_bits(C) / 64)): the
    H*W pixels' slots concatenated, the input row of the dense layer after the convs."""
    n = h.shape[0]
    s = slot_bits(c)
    if s % WORD == 0:
        return h.reshape(n, -1)
    flat = h.reshape(n, -1)  # one word per pixel
    g = WORD // s  # pixels per word: pixel l goes to word l // g at bit (l % g) s
    out = xp.zeros((n, n_words(flat.shape[1] * s)), dtype=np.uint64)
    for r in range(min(g, flat.shape[1])):
        part = flat[:, r::g]
        out[:, :part.shape[1]] |= part << np.uint64(r * s)
    return out


def pool_words(h, pool, and_mask, xp):
    """Max-pool on packed bits (B, H, W, words): per window the OR of the words, and the AND
    for the channels set in ``and_mask`` (uint64 (words,) or None):
    ``pooled = (OR & ~and_mask) | (AND & and_mask)``."""
    k, stride = pool
    _, _, ho, wo = pool_output_shape((h.shape[0], 1) + h.shape[1:3], k, stride)
    any_ = all_ = None
    for _, _, rows, columns in kernel_offsets(k, k, stride, ho, wo):
        v = h[:, rows, columns, :]
        if any_ is None:
            any_ = v.copy()
            all_ = v.copy() if and_mask is not None else None
            continue
        any_ |= v
        if and_mask is not None:
            all_ &= v
    if and_mask is None:
        return any_
    return (any_ & ~and_mask) | (all_ & and_mask)


def unpack_words(h, c, xp):
    """Packed bits (..., words) -> bool (..., c), True = +1."""
    shifts = xp.arange(WORD, dtype=np.uint64)
    bits = ((h[..., None] >> shifts) & np.uint64(1)).astype(bool)
    return bits.reshape(h.shape[:-1] + (-1,))[..., :c]


def _backend_name(name):
    """``name`` checked (BackendUnavailable says why it cannot run), or the active backend."""
    if name is None:
        return _backend.active()
    with _backend.use(name):
        return name
