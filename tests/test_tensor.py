"""The autodiff engine: tape, backward order, accumulation, no_grad, detach, dtypes."""

import sys

import numpy as np
import pytest
from arrays import dev, host

from minibnn import backend
from minibnn import functional as F
from minibnn.tensor import Tensor, as_tensor, is_grad_enabled, no_grad, unbroadcast


def leaf(values, dtype=np.float64):
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


# --- backward order and depth -----------------------------------------------------------

def test_chain_of_ten_thousand_ops_backpropagates():
    assert sys.getrecursionlimit() < 10_000  # a recursive walk would fail here
    x = leaf([1.0, 2.0])
    y = x
    for _ in range(5_000):
        y = y * 1.0
        y = y + 0.5
    assert y._ctx is not None
    y.backward(np.array([1.0, 3.0]))
    np.testing.assert_array_equal(host(x.grad), [1.0, 3.0])
    np.testing.assert_array_equal(host(y), [2501.0, 2502.0])


def test_node_reached_by_paths_of_different_length():
    # out = a + b with b = 3 a and a = 2 x: a must receive b's gradient before passing
    # its own on (a topological order that visits a before b loses the b -> a term)
    x = leaf([1.0, -2.0])
    a = x * 2.0
    b = a * 3.0
    (a + b).backward(np.ones(2))
    np.testing.assert_array_equal(host(x.grad), [8.0, 8.0])


def test_leaf_that_is_also_an_input_of_its_own_descendant():
    # d/dx (x * exp(x)) = exp(x) (1 + x): x is a direct parent and also reached via exp(x)
    x = leaf([0.5, -1.0, 2.0])
    (x * x.exp()).sum().backward()
    np.testing.assert_allclose(host(x.grad), np.exp(host(x)) * (1 + host(x)), rtol=1e-12)


def test_deep_diamonds():
    # each level doubles the gradient through two paths: y_{k+1} = y_k + y_k * 1
    x = leaf([1.0])
    y = x
    for _ in range(20):
        y = y + y * 1.0
    y.backward(np.ones(1))
    np.testing.assert_array_equal(host(x.grad), [2.0 ** 20])


# --- accumulation -----------------------------------------------------------------------

def test_tensor_used_twice_accumulates():
    x = leaf([1.0, -3.0, 0.5])
    (x * x).sum().backward()
    np.testing.assert_array_equal(host(x.grad), 2 * host(x))

    z = leaf([1.0, 2.0])
    (z + z + z).sum().backward()
    np.testing.assert_array_equal(host(z.grad), [3.0, 3.0])


def test_gradients_accumulate_across_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [3.0 + 2.0, 3.0 + 4.0])
    x.zero_grad()
    assert x.grad is None
    (x * 5.0).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [5.0, 5.0])


def test_backward_twice_through_the_same_graph():
    x = leaf([2.0])
    y = (x * x).sum()
    y.backward()
    y.backward()
    np.testing.assert_array_equal(host(x.grad), [8.0])


def test_interior_tensors_get_no_grad():
    x = leaf([1.0, 2.0])
    h = x * 2.0
    (h * h).sum().backward()
    assert h.grad is None
    np.testing.assert_array_equal(host(x.grad), 8 * host(x))


# --- no_grad, detach, requires_grad -----------------------------------------------------

def test_no_grad_records_nothing():
    x = leaf([1.0, 2.0])
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0 + 1.0).sum()
        z = F.log_softmax(x)
    assert is_grad_enabled()
    for t in (y, z):
        assert not t.requires_grad and t._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    np.testing.assert_array_equal(host(y), 8.0)  # the values are still computed


def test_no_grad_restores_after_exception_and_nests():
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("x")
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            pass
        assert not is_grad_enabled()
    assert is_grad_enabled()
    assert (leaf([1.0]) * 2.0).requires_grad


def test_detach():
    x = leaf([1.0, 2.0])
    d = (x * 3.0).detach()
    assert not d.requires_grad and d._ctx is None
    np.testing.assert_array_equal(host(d), [3.0, 6.0])
    xd = x.detach()
    assert backend.get_array_module(x.data).shares_memory(xd.data, x.data)
    # the detached copy is a constant: d/dx (x.detach() * x) = x, not 2x
    (x.detach() * x).sum().backward()
    np.testing.assert_array_equal(host(x.grad), host(x))


def test_requires_grad_propagation():
    a = leaf([1.0, 2.0])
    b = Tensor(np.array([3.0, 4.0]))
    assert not b.requires_grad
    c = b * 2.0 + b
    assert not c.requires_grad and c._ctx is None
    d = a * b
    assert d.requires_grad and d._ctx is not None
    d.sum().backward()
    np.testing.assert_array_equal(host(a.grad), [3.0, 4.0])
    assert b.grad is None


def test_backward_on_non_scalar_needs_grad():
    x = leaf([1.0, 2.0])
    with pytest.raises(ValueError, match=r"\(2,\)"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match="does not match"):
        (x * 2.0).backward(np.ones(3))
    y = x * 2.0
    y.backward(np.array([1.0, -1.0]))
    np.testing.assert_array_equal(host(x.grad), [2.0, -2.0])


def test_backward_of_one_element_tensor_defaults_to_one():
    x = leaf([[3.0]])
    (x * x).backward()
    np.testing.assert_array_equal(host(x.grad), [[6.0]])


# --- dtypes -----------------------------------------------------------------------------

@pytest.mark.parametrize("op", [
    lambda t: t + 2.0, lambda t: 2.0 + t, lambda t: t - 1.5, lambda t: 1.5 - t,
    lambda t: t * 0.1, lambda t: 0.1 * t, lambda t: t / 3.0, lambda t: 3.0 / t,
    lambda t: t ** 2.0, lambda t: 2.0 ** t, lambda t: t ** 2, lambda t: t * 3,
    lambda t: F.maximum(t, 0.25), lambda t: F.relu(t), lambda t: F.clip(t, -0.5, 0.5),
    lambda t: t * np.float64(2.0), lambda t: F.mean(t), lambda t: t.max(axis=0),
], ids=["add", "radd", "sub", "rsub", "mul", "rmul", "div", "rdiv", "pow", "rpow", "pow-int",
        "mul-int", "maximum", "relu", "clip", "np-float64-scalar", "mean", "max"])
def test_float32_stays_float32_with_python_scalars(op):
    x = Tensor(np.array([0.5, 1.5, 2.0], dtype=np.float32), requires_grad=True)
    y = op(x)
    assert y.dtype == np.float32
    y.backward(np.ones(y.shape, dtype=np.float32))
    assert x.grad.dtype == np.float32  # and so does its gradient


def test_float64_stays_float64():
    x = leaf([1.0, 2.0])
    assert (x * 2.0).dtype == np.float64
    assert (1.0 - x).dtype == np.float64


def test_constructor_dtypes():
    assert Tensor(1.5).dtype == np.float32  # Python floats become the library's float
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(np.float64(1.5)).dtype == np.float64  # NumPy scalars keep their dtype
    assert Tensor(np.zeros(2)).dtype == np.float64
    assert Tensor([1, 2]).dtype.kind == "i"
    assert Tensor([1.0], dtype=np.float64).dtype == np.float64
    assert Tensor(np.zeros(2), dtype=np.float32).dtype == np.float32
    with pytest.raises(TypeError, match="dtype"):
        Tensor(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="dtype"):
        Tensor(np.array([1.0, 2.0], dtype=object))


def test_as_tensor_takes_dtype_from_like():
    t = Tensor(np.zeros(2, dtype=np.float32))
    assert as_tensor(2.0, like=(t,)).dtype == np.float32
    assert as_tensor(t) is t


def test_ndarray_on_the_left_defers_to_tensor():
    x = leaf([1.0, 2.0])
    y = np.array([3.0, 4.0]) * x
    assert isinstance(y, Tensor) and y.requires_grad
    (np.array([1.0, 1.0]) - y).sum().backward()
    np.testing.assert_array_equal(host(x.grad), [-3.0, -4.0])


# --- unbroadcast and op errors ----------------------------------------------------------

@pytest.mark.parametrize("shape,expected", [
    ((3, 1), np.full((3, 1), 8.0)),
    ((4,), np.full((4,), 6.0)),
    ((1, 4), np.full((1, 4), 6.0)),
    ((), np.array(24.0)),
    ((2, 3, 4), np.ones((2, 3, 4))),
])
def test_unbroadcast(shape, expected):
    g = unbroadcast(dev(np.ones((2, 3, 4))), shape)
    assert g.shape == shape
    np.testing.assert_array_equal(host(g), expected)


@pytest.mark.parametrize("grad_shape,shape", [((4, 3, 2), (2, 3, 4)), ((3,), (2, 3)),
                                              ((2, 5), (2, 3)), ((6,), (2, 3))])
def test_unbroadcast_refuses_a_gradient_that_is_not_a_broadcast(grad_shape, shape):
    with pytest.raises(ValueError, match="not a broadcast"):
        unbroadcast(dev(np.ones(grad_shape)), shape)


def test_a_wrong_backward_shape_is_caught():
    from minibnn.tensor import Function

    class WrongShape(Function):
        def forward(self, a):
            return a * 2

        def backward(self, g):
            return (g.T,)  # wrong: a transposed gradient for a non-square input

    x = leaf(np.ones((2, 3)))
    with pytest.raises(ValueError, match="not a broadcast"):
        WrongShape.apply(x).sum().backward()


def test_broadcast_gradient_shapes():
    a, b = leaf(np.ones((3, 1))), leaf(np.arange(4.0))
    (a * b).sum().backward()
    assert a.grad.shape == (3, 1) and b.grad.shape == (4,)
    np.testing.assert_array_equal(host(a.grad), np.full((3, 1), 6.0))
    np.testing.assert_array_equal(host(b.grad), np.full(4, 3.0))


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        F.matmul(Tensor(np.zeros((2, 3))), Tensor(np.zeros((4, 5))))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,"):
        Tensor(np.zeros((2, 3))).reshape(4, 2)
    with pytest.raises(ValueError, match="empty"):
        F.mean(Tensor(np.zeros((0, 3))), axis=0)


def test_properties():
    t = Tensor(np.zeros((2, 3)))
    assert (t.shape, t.ndim, t.size, len(t)) == ((2, 3), 2, 6, 2)
    assert Tensor(np.array([4.0])).item() == 4.0
    assert isinstance(t.numpy(), np.ndarray)
    assert "requires_grad=True" in repr(leaf([1.0]))
