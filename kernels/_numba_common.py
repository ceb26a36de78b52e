"""Pieces shared by the Numba GEMM kernels (:mod:`minibnn.kernels.numba_cpu`, :mod:`minibnn.kernels.numba_avx2`).

Kept apart so that both kernel modules import from here and neither imports the other
back: ``numba_cpu -> numba_avx2 -> _numba_common``.

OpenMP wait policy. Numba's parallel loops run on its OpenMP threading layer, whose worker
threads by default spin for a while after each parallel region, waiting for the next one.
In training, every numba kernel is followed by NumPy BLAS calls whose own threads need those
same cores, so the spinning workers slow the BLAS down. Measured on a 2-core AMD EPYC (Zen 4)
with other jobs light: the default MNIST MLP training step (3 x 512, batch 100) took 23-26 ms
on the numba backend with the default policy and 11.8 ms with ``OMP_WAIT_POLICY=PASSIVE``
(numpy backend: 11-13 ms). So, unless the user set it, this module sets it to PASSIVE
before numba starts its threads (the OpenMP runtime reads it when it loads, at the first
parallel launch). A library loaded earlier in the process keeps the policy it started with.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numba import njit, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402
from llvmlite import ir  # noqa: E402

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
