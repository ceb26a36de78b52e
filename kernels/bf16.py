"""NumPy model of bfloat16 rounding and of the exact three-part bf16 split of float32.

bfloat16 keeps float32's sign and 8 exponent bits and the top 7 of its 23 stored significand
bits (8 significant bits with the implicit one), so a bf16 number is the top half of a
float32 bit pattern and the bf16 value of a pattern ``h`` is the float32 ``h << 16``.
NumPy has no bf16 dtype: here (and in ``kernels.cupy_fused``' CUDA kernels, which do the
same integer arithmetic) bf16 numbers travel as uint16 bit patterns.

``split(x)`` writes a float32 array as three bf16 parts, x = p0 + p1 + p2 with
p0 = bf16(x), p1 = bf16(x - p0), p2 = bf16(x - p0 - p1), each rounded to nearest even.
Every difference is exact in float32 (it is a multiple of x's last-bit unit, no larger
than half a unit of the previous part's last bit), and after two parts at most 8
significant bits remain, which p2 holds exactly. So the split is exact for every float32 x
with

    2**-110 <= |x| < (2 - 2**-8) * 2**127    (the bf16 midpoint above bf16's largest finite)

and zero. Below 2**-110 the last parts fall under bf16's smallest subnormal (2**-133; bf16
has float32's exponent range but only 7 stored bits) and are rounded there: |error| <=
2**-134. From (2 - 2**-8) * 2**127 up to float32's largest, p0 rounds to infinity. A
non-finite part ends the split: the later parts are 0, so inf stays inf (not inf - inf =
NaN) and NaN stays NaN.

A product with one operand that is exactly bf16 (+-1, 0, small integers) then equals the
float32 product up to the order of float32 accumulation: p_j * s is exact, and the three
partial products are summed in float32 (``split_matmul``: (P0 + P1) + P2, the order of
the GPU's "output" layout; its "reduction" layout sums all 3K terms in cuBLAS's order).
This is what ``minibnn.backend.split_matmul_pm1`` runs with cuBLAS GemmEx on the GPU.
"""

import numpy as np

__all__ = ["PARTS", "round_bits", "to_float32", "split", "split_matmul", "check_split_operands"]

PARTS = 3  # 3 x 8 significant bits cover float32's 24


def round_bits(x):
    """bf16(x) rounded to nearest, ties to even, as uint16 bit patterns (x float32). NaN
    stays a (quiet) NaN; values past the bf16 midpoint above its largest finite become inf."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x40)
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def to_float32(bits):
    """The float32 values of bf16 bit patterns (uint16): exact. A CuPy array stays on the
    GPU (the arithmetic is the same)."""
    if not hasattr(bits, "astype"):  # lists, scalars: as NumPy
        bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint16, copy=False).astype(np.uint32) << np.uint32(16)).view(np.float32)


def split(x, parts=PARTS):
    """uint16 (parts, *x.shape): the bf16 parts of float32 x, x = sum of their values
    (exact in the range given in the module docstring)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"split: expected float32, got {x.dtype}")
    out = np.empty((parts,) + x.shape, dtype=np.uint16)
    r = x.copy()
    for j in range(parts):
        out[j] = round_bits(r)
        b = to_float32(out[j])
        done = (out[j] & np.uint16(0x7F80)) == np.uint16(0x7F80)  # inf or NaN: no remainder
        with np.errstate(invalid="ignore"):
            r = np.where(done, np.float32(0), r - b).astype(np.float32)
    return out


def check_split_operands(a, b, exact):
    """ValueError unless a (M, K) @ b (K, N) are 2-D float32 and ``exact`` names one (the
    exact operand may also come as its bf16 bit patterns, uint16)."""
    if exact not in ("a", "b"):
        raise ValueError(f"exact: expected 'a' or 'b' (the operand that is exactly bf16, e.g. "
                         f"+-1), got {exact!r}")
    f, s = (b, a) if exact == "a" else (a, b)
    if (getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2
            or a.shape[1] != b.shape[0] or f.dtype != np.float32
            or s.dtype not in (np.float32, np.uint16)):
        raise ValueError(f"split matmul: expected 2-D float32 (M, K) @ (K, N), got "
                         f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')} @ "
                         f"{getattr(b, 'shape', type(b).__name__)} {getattr(b, 'dtype', '')}")


def split_matmul(a, b, exact):
    """a @ b as the GPU path computes it: the float32 operand split in three bf16 parts, the
    operand named by ``exact`` ("a" or "b") rounded to bf16 (exact for +-1 and 0), and the
    three partial products summed in float32, (a_0 b + a_1 b) + a_2 b. NumPy arrays."""
    check_split_operands(a, b, exact)
    f = b if exact == "a" else a
    s = a if exact == "a" else b
    s = to_float32(s if s.dtype == np.uint16 else round_bits(s))
    out = None
    for part in split(f):
        p = to_float32(part)
        prod = s @ p if exact == "a" else p @ s
        out = prod if out is None else (out + prod).astype(np.float32)
    return out
