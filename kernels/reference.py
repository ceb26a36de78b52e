"""NumPy reference for bit packing and the XNOR-popcount matrix product.

This module is the ground truth the fast backends are tested against; it favours
clarity over speed.

Conventions (Courbariaux et al., "Binarized Neural Networks", arXiv:1602.02830,
Sections 3 and 4; the interface every backend shares is written out in the
:mod:`kernels` package docstring, kernels/__init__.py): a value x is binarized to
sign(x) with sign(0) = +1. Bit 1 stands for +1 and bit 0 for -1. Rows are packed along their
last axis K, least significant bit first, into little-endian uint64 words; the
``ceil(K/64)*64 - K`` padding bits of the last word are 0. For two packed
+-1 vectors of length K,

    a . b = (#agreeing bits) - (#disagreeing bits) = K - 2 * popcount(a XOR b),

and the padding bits, being 0 in both operands, never disagree.
"""

import numpy as np

__all__ = [
    "WORD_BITS",
    "n_words",
    "pad_mask",
    "pack_rows",
    "unpack_rows",
    "xnor_gemm",
    "check_gemm_operands",
    "check_pack_input",
    "PLANES",
    "pack_bitplanes",
    "bitplane_gemm",
    "check_bitplane_operands",
    "check_pixels",
    "pack_threshold",
    "check_threshold_operands",
]

WORD_BITS = 64


def n_words(k):
    """Number of uint64 words that hold k bits: ceil(k / 64)."""
    return (int(k) + WORD_BITS - 1) // WORD_BITS


def pad_mask(k):
    """uint64 mask of the valid bits of the last word of a k-bit row (all ones if 64 | k)."""
    r = int(k) % WORD_BITS
    return np.uint64(0xFFFFFFFFFFFFFFFF) if r == 0 else np.uint64((1 << r) - 1)


def _describe(x):
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def check_pack_input(x, name="x"):
    """Validate an array to be packed; return it as an ndarray-like with ndim >= 1.

    Accepts bool, integer and real floating dtypes of any layout. Raises TypeError
    for other dtypes (complex, object, ...) and ValueError for 0-d input.
    NaN is checked by the packers themselves (it has no sign).
    """
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = np.asarray(x)
    kind = x.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"{name}: expected a bool, integer or real floating array to binarize, "
            f"got {_describe(x)}"
        )
    if x.ndim == 0:
        raise ValueError(f"{name}: expected an array of shape (..., K), got a 0-d array")
    return x


def pack_rows(x):
    """Binarize and pack ``x`` of shape (..., K) into uint64 words of shape (..., ceil(K/64)).

    bit = (x >= 0) for numbers, so sign(0) = +1; for bool input bit = x. Bits run
    least significant first along K; padding bits are 0. A 1-D input is one row:
    (K,) -> (ceil(K/64),). NaN raises ValueError. Equivalent to
    ``np.packbits(x >= 0, axis=-1, bitorder="little")`` padded to a multiple of
    8 bytes and viewed as little-endian uint64.
    """
    x = check_pack_input(np.asarray(x))
    if x.dtype.kind == "b":
        bits = x
    else:
        if x.dtype.kind == "f" and np.isnan(x).any():
            raise ValueError(f"x: cannot binarize NaN (it has no sign); input has {_describe(x)}")
        bits = x >= 0
    k = x.shape[-1]
    w = n_words(k)
    packed = np.packbits(bits, axis=-1, bitorder="little")  # (..., ceil(K/8)) uint8
    padded = np.zeros(x.shape[:-1] + (w * 8,), dtype=np.uint8)
    padded[..., : packed.shape[-1]] = packed
    return padded.view("<u8").astype(np.uint64, copy=False)


def unpack_rows(packed, k, dtype=np.float32):
    """Inverse of :func:`pack_rows`: words (..., W) -> +-1 values (..., k) of ``dtype``.

    Requires W == ceil(k/64); padding bits are ignored.
    """
    packed = np.asarray(packed)
    _check_words(packed, "packed")
    k = _check_k(k)
    if packed.ndim == 0 or packed.shape[-1] != n_words(k):
        raise ValueError(
            f"packed: expected shape (..., {n_words(k)}) for k={k} "
            f"(ceil(k/64) words), got {_describe(packed)}"
        )
    as_bytes = np.ascontiguousarray(packed).astype("<u8", copy=False).view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=-1, count=k, bitorder="little")
    return np.where(bits.astype(bool), 1, -1).astype(dtype)


def _check_words(x, name):
    if x.dtype != np.uint64:
        hint = ""
        if x.dtype.kind in "fc":
            hint = " (pack real-valued data with pack_rows first)"
        raise ValueError(f"{name}: expected packed uint64 words, got {_describe(x)}{hint}")


def _check_k(k):
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k: expected a non-negative integer bit count, got {k!r}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k: expected a non-negative integer bit count, got {k}")
    return k


def check_gemm_operands(a, b, k, check_padding=True):
    """Validate the operands of ``xnor_gemm(a, b, k)``; return k as a Python int.

    ``a`` (M, W) and ``b`` (N, W) must be 2-D uint64 arrays (NumPy or CuPy) with
    W == ceil(k/64); k >= 0. With ``check_padding`` the padding bits of the last
    word (bits k mod 64 .. 63) must be 0, since a nonzero padding bit would be
    counted as a disagreement; this reads one column of each operand (on a GPU it
    synchronizes, so the CuPy wrapper skips it). Raises ValueError naming the
    argument, its shape and dtype and what was expected.
    """
    k = _check_k(k)
    w = n_words(k)
    for name, x, rows in (("a", a, "M"), ("b", b, "N")):
        if not hasattr(x, "dtype") or not hasattr(x, "ndim"):
            raise ValueError(f"{name}: expected a 2-D uint64 array ({rows}, W), got {type(x).__name__}")
        _check_words(x, name)
        if x.ndim != 2:
            raise ValueError(
                f"{name}: expected a 2-D array ({rows}, W) of packed words, got {_describe(x)}"
            )
        if x.shape[1] != w:
            raise ValueError(
                f"{name}: expected {w} words per row for k={k} (W = ceil(k/64)), "
                f"got {_describe(x)}"
            )
    if check_padding and k % WORD_BITS and w:
        inv = ~pad_mask(k)
        for name, x in (("a", a), ("b", b)):
            if x.shape[0] and bool((x[:, w - 1] & inv).any()):
                raise ValueError(
                    f"{name}: padding bits {k % WORD_BITS}..63 of the last word must be 0 "
                    f"for k={k}; pack the rows with pack_rows"
                )
    return k


def xnor_gemm(a, b, k):
    """Binary matrix product of packed +-1 rows: out[i, j] = k - 2 * popcount(a[i] XOR b[j]).

    ``a`` (M, W) holds the rows of the left factor, ``b`` (N, W) the columns of the
    right factor (i.e. B transposed), both packed along K with :func:`pack_rows`.
    Returns int32 (M, N), equal to ``unpack(a) @ unpack(b).T``.
    """
    k = check_gemm_operands(a, b, k)
    a = np.asarray(a)
    b = np.asarray(b)
    m, n = a.shape[0], b.shape[0]
    out = np.empty((m, n), dtype=np.int32)
    # A few rows of A at a time: their (rows, N, W) XOR temporary stays near 2^16 words
    # (512 KiB), and a narrow B (a convolution's few channels) is not one Python step per row.
    step = max(1, _XOR_WORDS // max(1, n * a.shape[1]))
    for i in range(0, m, step):
        disagree = np.bitwise_count(a[i:i + step, None, :] ^ b[None, :, :]).sum(
            axis=2, dtype=np.int64)
        out[i:i + step] = k - 2 * disagree
    return out


_XOR_WORDS = 1 << 16  # words of XOR temporary per step of :func:`xnor_gemm`


# ----------------------------------------------------------- 8-bit input by bit planes

PLANES = 8  # bits of a uint8 pixel


def check_pixels(x, name="x"):
    """Validate uint8 input of shape (M, K) for :func:`pack_bitplanes`."""
    if getattr(x, "dtype", None) != np.uint8 or x.ndim != 2:
        raise ValueError(f"{name}: expected uint8 pixels of shape (M, K), got {_describe(x)}")
    return x


def pack_bitplanes(x):
    """uint8 pixels (M, K) -> their 8 bit planes packed, uint64 (M, 8, ceil(K/64)).

    Plane n of row i holds bit n of every pixel (bit 1 = +1), packed as :func:`pack_rows`
    packs: with y^n = 2 x^n - 1 in +-1, ``2 x - 255 = sum_n 2^n y^n``.
    """
    x = check_pixels(np.asarray(x))
    shifts = np.arange(PLANES, dtype=np.uint8)[:, None]
    return pack_rows(((x[:, None, :] >> shifts) & 1).astype(bool))


def check_bitplane_operands(planes, b, k):
    """Validate ``bitplane_gemm`` operands (planes (M, 8, W), b (N, W)); return k."""
    _check_words(planes, "planes")
    if planes.ndim != 3 or planes.shape[1] != PLANES:
        raise ValueError(f"planes: expected shape (M, {PLANES}, W) from pack_bitplanes, got "
                         f"{_describe(planes)}")
    return check_gemm_operands(planes[:, 0], b, k)


def bitplane_gemm(planes, b, k):
    """The first layer on 8-bit input (paper Section 1.6): int32 (M, N) with

        z[i, j] = sum_{n=0..7} 2^n (y^n_i . w_j) = (2 x_i - 255) . w_j

    where y^n_i . w_j = k - 2 popcount(planes[i, n] XOR b[j]) is one XNOR-popcount
    product per plane, combined by shift-add (Horner's rule).
    """
    k = check_bitplane_operands(planes, b, k)
    z = np.zeros((planes.shape[0], b.shape[0]), dtype=np.int32)
    for n in range(PLANES - 1, -1, -1):
        z <<= 1
        z += xnor_gemm(planes[:, n], b, k)
    return z


def check_threshold_operands(z, threshold):
    """Validate ``pack_threshold`` operands: ``z`` a real 2-D (M, N) array, ``threshold`` a
    real (N,) or (P, N) array with P >= 1 dividing M. Returns P."""
    for name, x in (("z", z), ("threshold", threshold)):
        kind = getattr(getattr(x, "dtype", None), "kind", None)
        if kind not in ("i", "u", "f"):
            raise ValueError(f"{name}: expected an integer or real floating array, got "
                             f"{_describe(x)}")
    if z.ndim != 2:
        raise ValueError(f"z: expected a 2-D array (M, N), got {_describe(z)}")
    return check_threshold_table(threshold, *z.shape)


def check_threshold_table(threshold, m, n):
    """Validate the shape of a threshold table for M x N outputs: (N,) or (P, N) with
    P >= 1 dividing M. Returns P."""
    if threshold.ndim not in (1, 2) or threshold.shape[-1] != n or \
            (threshold.ndim == 2 and (threshold.shape[0] < 1 or m % threshold.shape[0])):
        raise ValueError(f"threshold: expected shape ({n},) or (P, {n}) with P dividing "
                         f"M = {m}, got {_describe(threshold)}")
    return 1 if threshold.ndim == 1 else threshold.shape[0]


def pack_threshold(z, threshold):
    """Binarize ``z`` against per-unit thresholds and pack: uint64 (M, ceil(N/64)) with

        bit (i, j) = z[i, j] >= threshold[j]            (threshold (N,)), or
        bit (i, j) = z[i, j] >= threshold[i mod P, j]   (threshold (P, N): a table per
                                                          output position, for convolutions)

    packed as :func:`pack_rows` packs (bit 1 = +1): a frozen hidden layer's sign(BN(z)).
    """
    p = check_threshold_operands(np.asarray(z), np.asarray(threshold))
    z, threshold = np.asarray(z), np.asarray(threshold)
    m, n = z.shape
    fire = z.reshape(-1, p, n) >= threshold.reshape(1, -1, n)
    return pack_rows(fire.reshape(m, n))
