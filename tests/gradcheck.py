"""The one float64 central-difference gradient checker (in the manner of autograd's
``test_util`` and chainer's ``check_backward``).

    from gradcheck import check_grad
    check_grad(lambda a, b: a * b, [a_array, b_array])

``fn`` takes Tensors and returns a Tensor. Its output is reduced to a scalar with a fixed
random weighting W, L(x) = sum(W * fn(x)); the analytic gradient comes from
``out.backward(W)``. For every input, several random unit directions d are checked:

    (L(x + h d) - L(x - h d)) / 2h  ==  <dL/dx, d>

and, when the input is small, every element along its own axis as well. Inputs must be
sampled away from kinks (clip bounds, ties in max, relu at 0) so the difference is valid.
"""

from __future__ import annotations

import numpy as np
from arrays import host

from minibnn.tensor import Tensor

__all__ = ["check_grad"]


def _close(numeric, analytic, rtol, atol):
    return abs(numeric - analytic) <= atol + rtol * (abs(numeric) + abs(analytic))


def check_grad(fn, inputs, *, wrt=None, n_dirs=4, h=1e-6, rtol=1e-5, atol=1e-8,
               full_max_size=64, seed=0):
    """Assert that the backward pass of ``fn`` matches central differences.

    inputs: float64 arrays (or scalars), passed to ``fn`` as Tensors (on the active backend).
    wrt:    indices of the inputs to differentiate (default: all). The others are passed
            as constants (``requires_grad=False``).
    Returns the analytic gradients as NumPy arrays, one per input in ``wrt``.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.array(x, dtype=np.float64) for x in inputs]
    wrt = list(range(len(arrays))) if wrt is None else list(wrt)

    def run(values, grad=False):
        tensors = [Tensor(v.copy(), requires_grad=grad and i in wrt) for i, v in enumerate(values)]
        return tensors, fn(*tensors)

    tensors, out = run(arrays, grad=True)
    assert isinstance(out, Tensor), f"fn must return a Tensor, got {type(out).__name__}"
    assert out.dtype == np.float64, f"fn's output is {out.dtype}; the checker needs float64"
    assert out.requires_grad, "fn's output does not require grad, so nothing can be checked"
    weight = rng.standard_normal(out.shape)
    out.backward(weight)

    def loss(values):
        _, o = run(values)
        assert o.shape == out.shape, f"output shape changed from {out.shape} to {o.shape}"
        return float(np.sum(weight * o.numpy()))

    def numeric(i, direction):
        plus = [a + h * direction if j == i else a for j, a in enumerate(arrays)]
        minus = [a - h * direction if j == i else a for j, a in enumerate(arrays)]
        return (loss(plus) - loss(minus)) / (2 * h)

    grads = []
    for i in wrt:
        x = arrays[i]
        g = tensors[i].grad
        g = np.zeros_like(x) if g is None else host(g)
        assert g.shape == x.shape, f"input {i}: gradient shape {g.shape} != input shape {x.shape}"
        assert g.dtype == np.float64, f"input {i}: gradient dtype {g.dtype}, expected float64"
        grads.append(g)
        for k in range(n_dirs):
            d = rng.standard_normal(x.shape)
            d /= np.linalg.norm(d) if d.size else 1.0
            num, ana = numeric(i, d), float(np.sum(g * d))
            assert _close(num, ana, rtol, atol), (
                f"input {i}, random direction {k}: finite difference {num!r} != "
                f"analytic {ana!r} (difference {num - ana:.3e})")
        if x.size <= full_max_size:
            for flat in range(x.size):
                d = np.zeros(x.size)
                d[flat] = 1.0
                d = d.reshape(x.shape)
                num, ana = numeric(i, d), float(g.reshape(-1)[flat])
                assert _close(num, ana, rtol, atol), (
                    f"input {i}, element {np.unravel_index(flat, x.shape)}: finite difference "
                    f"{num!r} != analytic {ana!r} (difference {num - ana:.3e})")
    return grads
