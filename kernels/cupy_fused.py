"""Fused elementwise kernels for the cupy backend: one launch where the array code makes many.

A training step on the GPU is launch-bound at the paper's sizes: counted on the 3x4096 MLP,
one step made about 360 CuPy calls, of which Adam's in-place lines were about 190 (twelve
per parameter), and each call costs 20-35 us of host time, far more than the GPU needs for
it. Here each optimizer update of one parameter is one kernel.

Every kernel computes the same operations in the same order and precision as the array code
it replaces (the NumPy reference in ``minibnn.optim`` and ``minibnn.nn``), compiled with
``--fmad=false`` so that no multiply-add is contracted into an FMA: the results are the same
floats, which the GPU tests check bit for bit against the NumPy backend.

``enabled()`` says whether the fused kernels are used (default yes; ``MINIBNN_CUPY_FUSED=0``
or ``with disabled():`` runs the array code on the GPU instead, for comparison).
"""

import contextlib
import os

__all__ = ["enabled", "disabled", "adam_update", "ema_update"]

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
                                        options=_OPTIONS)
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


def adam_update(w, g, m, v, beta1, beta2, eps, alpha_t, clip=None):
    """Adam's moments and step and the latent-weight clip of one parameter, in place, in one
    launch: the lines of ``optim.Adam._delta`` and ``Optimizer.step`` in their order."""
    lo, hi = (-clip, clip) if clip is not None else (0.0, 0.0)
    _kernel("adam")(g, beta1, 1 - beta1, beta2, 1 - beta2, eps, float(alpha_t), lo, hi,
                    clip is not None, w, m, v)


def ema_update(running, new, momentum):
    """running = (1 - momentum) * running + momentum * new (new cast to running's dtype
    first), in place, in one launch: batch norm's running statistics."""
    _kernel("ema")(new, 1 - momentum, momentum, running)
