"""Tensor and Function: a define-by-run tape in the manner of micrograd and tinygrad.

A ``Function`` subclass holds one op: ``forward`` and ``backward`` work on raw arrays
(NumPy or CuPy), and ``apply`` wraps them so that the result remembers its parents.
``Tensor.backward()`` walks that record in reverse topological order (iteratively, so a
chain of any length works) and accumulates gradients into ``.grad`` of the leaves.
Broadcasting is undone in one place, ``unbroadcast``, so no op has to think about it.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import backend

_grad_enabled = True
DEFAULT_DTYPE = np.float32  # what Python floats become; pass float64 arrays for float64


@contextlib.contextmanager
def no_grad():
    """Within this block ops record nothing: no tape, no gradients, less memory."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, back to ``shape``.

    A gradient whose shape cannot be a broadcast of ``shape`` means an op's backward is
    wrong: that raises instead of being reshaped into place.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0 or any(n != 1 and n != g for n, g in zip(shape, grad.shape[extra:])):
        raise ValueError(f"gradient of shape {grad.shape} cannot be reduced to an input of "
                         f"shape {shape}: it is not a broadcast of it (an op's backward "
                         "returned the wrong shape)")
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    grad = grad.sum(axis=axes, keepdims=True) if axes else grad
    return grad.reshape(shape)


class Function:
    """One differentiable op. Subclasses define ``forward(*arrays, **kw)`` and
    ``backward(grad)`` returning one gradient (or None) per tensor input."""

    needs_input_grad = ()

    def save(self, *arrays):
        self.saved = arrays

    def forward(self, *arrays, **kwargs):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **kwargs):
        ctx = cls()
        tensors = [as_tensor(x, like=inputs) for x in inputs]
        ctx.needs_input_grad = tuple(t.requires_grad for t in tensors)
        out = Tensor(ctx.forward(*[t.data for t in tensors], **kwargs))
        if _grad_enabled and any(ctx.needs_input_grad):
            out.requires_grad = True
            out._ctx = ctx
            ctx.parents = tensors
        return out


class Tensor:
    """An n-dimensional array that can record the ops applied to it for ``backward()``."""

    __array_priority__ = 1000  # so that ndarray (op) Tensor defers to Tensor's operators

    def __init__(self, data, requires_grad=False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):  # scalar, list
            arr = np.asarray(data, dtype=dtype)
            if dtype is None and arr.dtype == np.float64 and not isinstance(data, np.generic):
                arr = arr.astype(DEFAULT_DTYPE)  # Python floats become the library's float
            data = arr
        elif dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        if data.dtype.kind not in "fiub":  # before the copy to the GPU (CuPy refuses such dtypes)
            raise TypeError(f"Tensor data must be numeric or bool, got dtype {data.dtype}")
        if isinstance(data, np.ndarray) and backend.active() == "cupy":
            data = backend.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None

    # --- array-like conveniences -------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    def numpy(self):
        """The data as a NumPy array (copied from the GPU under cupy)."""
        return backend.to_numpy(self.data)

    def item(self):
        return self.data.item()

    def detach(self):
        """A tensor sharing this data, cut off from the tape."""
        return Tensor(self.data)

    # --- autodiff -----------------------------------------------------------------------
    def backward(self, grad=None, on_leaf=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` that requires it.

        ``grad`` defaults to 1 for a one-element tensor. The topological order is built with
        an explicit stack, so depth is limited by memory, not Python's recursion limit.
        ``on_leaf(leaf)`` is called as soon as a leaf's gradient is complete (data-parallel
        training starts its all-reduce then, while the rest of the pass runs).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() needs an explicit grad for a tensor of shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad shape {grad.shape} does not match tensor shape {self.shape}")

        order, seen, stack = [], set(), [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:  # mark on expansion, not on push: a node reached again
                continue          # through a longer path must still finish before its users
            seen.add(id(node))
            stack.append((node, True))
            if node._ctx is not None:
                for p in node._ctx.parents:
                    if p.requires_grad and id(p) not in seen:
                        stack.append((p, False))

        grads = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._ctx is None:
                node.grad = g if node.grad is None else node.grad + g
                if on_leaf is not None:
                    on_leaf(node)
                continue
            ctx = node._ctx
            for p, pg in zip(ctx.parents, ctx.backward(g)):
                if pg is None or not p.requires_grad:
                    continue
                pg = unbroadcast(pg, p.shape)
                grads[id(p)] = pg if id(p) not in grads else grads[id(p)] + pg

    def zero_grad(self):
        self.grad = None


def as_tensor(x, like=()):
    """``x`` as a Tensor; Python scalars take the float dtype of the first tensor in ``like``
    (so ``float32_tensor * 2.0`` stays float32)."""
    if isinstance(x, Tensor):
        return x
    for t in like:
        if isinstance(t, Tensor):
            xp = backend.get_array_module(t.data)
            if np.isscalar(x) and t.dtype.kind == "f":
                return Tensor(xp.asarray(x, dtype=t.dtype))
            return Tensor(xp.asarray(x))
    return Tensor(x)


from . import functional as _functional  # noqa: E402,F401  (attaches operators to Tensor)
