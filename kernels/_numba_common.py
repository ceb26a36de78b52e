"""Pieces shared by the Numba GEMM kernels (:mod:`minibnn.kernels.numba_cpu`, :mod:`minibnn.kernels.numba_avx2`).

Kept apart so that both kernel modules import from here and neither imports the other
back: ``numba_cpu -> numba_avx2 -> _numba_common``.
"""

import numpy as np
from numba import njit, types
from numba.extending import intrinsic
from llvmlite import ir

__all__ = ["jit", "popcount64", "store", "pair_counts", "NB_ROWS"]

NB_ROWS = 256  # rows of B per cache block (256 rows x 4096 bits = 128 KiB packed)


def jit(**kw):
    """``njit(cache=True, **kw)``, or without the on-disk cache where numba finds no
    writable cache directory (e.g. a read-only site-packages and no user cache)."""

    def deco(fn):
        try:
            return njit(cache=True, **kw)(fn)
        except RuntimeError:
            return njit(cache=False, **kw)(fn)

    return deco


@intrinsic
def popcount64(typingctx, x):
    """popcount of a uint64 via ``llvm.ctpop.i64`` (one ``popcnt`` on x86-64 with POPCNT)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


@jit(inline="always")
def store(cnt, i, j, s, k, final):
    """Add the partial count ``s`` of one K block to cnt[i, j]; in the last K block
    (``final``) turn the total count into the result k - 2 * count."""
    if final:
        cnt[i, j] = k - 2 * (cnt[i, j] + s)
    else:
        cnt[i, j] += s


@jit()
def pair_counts(a, b, i0, i1, j0, j1, w0, w1, cnt, k, final):
    """cnt[i, j] += popcount(a[i, w0:w1] ^ b[j, w0:w1]) one pair at a time (edge tiles);
    with ``final`` (the last K block) the sum becomes the result k - 2 * count."""
    for i in range(i0, i1):
        for j in range(j0, j1):
            s = np.uint64(0)
            for w in range(w0, w1):
                s += popcount64(a[i, w] ^ b[j, w])
            store(cnt, i, j, np.int32(s), k, final)
