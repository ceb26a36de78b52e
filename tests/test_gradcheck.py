"""Every differentiable op against float64 central differences (tests/gradcheck.py).

Inputs are sampled away from kinks: clip/hardtanh/relu/maximum arguments stay at least
0.05 from their switching points, and reduced values for max have no ties.
"""

import numpy as np
import pytest
from arrays import dev, host
from gradcheck import check_grad

from minibnn import functional as F
from minibnn import losses, nn
from minibnn.tensor import Function, Tensor

RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape)


def away_from(*shape, points=(0.0,), margin=0.05, scale=2.0):
    """Uniform in [-scale, scale], nudged so no entry is within ``margin`` of ``points``."""
    x = RNG.uniform(-scale, scale, shape)
    for p in points:
        close = np.abs(x - p) < margin
        x[close] = p + np.where(x[close] >= p, margin, -margin) * 2
    return x


def distinct(*shape, spacing=0.1):
    """Values with no ties (at least ``spacing`` apart), in random order."""
    n = int(np.prod(shape))
    return (RNG.permutation(n) * spacing - n * spacing / 2 + RNG.uniform(0, 0.01, n)).reshape(shape)


def nonzero(*shape, low=0.5, high=2.0):
    return RNG.uniform(low, high, shape) * RNG.choice([-1.0, 1.0], shape)


def positive(*shape, low=0.3, high=2.0):
    return RNG.uniform(low, high, shape)


# --- the checker catches wrong gradients ------------------------------------------------

class _WrongSquare(Function):
    def forward(self, a):
        self.save(a)
        return a * a

    def backward(self, g):
        return (g * self.saved[0],)  # should be 2 * a


class _DroppedElement(Function):
    def forward(self, a):
        return a * 3.0

    def backward(self, g):
        out = g * 3.0
        out.reshape(-1)[-1] = 0.0  # one wrong entry: random directions may miss, elements not
        return (out,)


def test_checker_rejects_wrong_gradient():
    with pytest.raises(AssertionError, match="finite difference"):
        check_grad(lambda a: _WrongSquare.apply(a), [randn(3, 2)])


def test_checker_elementwise_pass_catches_one_bad_entry():
    with pytest.raises(AssertionError, match="element"):
        check_grad(lambda a: _DroppedElement.apply(a), [randn(4)], n_dirs=0)


def test_checker_rejects_float32_output():
    with pytest.raises(AssertionError, match="float64"):
        check_grad(lambda a: Tensor(a.data.astype(np.float32), requires_grad=True), [randn(2)])


def test_checker_accepts_correct_gradient_and_returns_it():
    x = randn(3, 4)
    (g,) = check_grad(lambda a: a * a, [x])
    assert g.shape == x.shape
    # with the weighting W, dL/dx = 2 x W; the ratio g / x is 2 W, not constant
    assert not np.allclose(g / x, (g / x).flat[0])


# --- elementwise arithmetic -------------------------------------------------------------

@pytest.mark.parametrize("op", [F.add, F.sub, F.mul, lambda a, b: a + b, lambda a, b: a - b,
                                lambda a, b: a * b], ids=["add", "sub", "mul", "+", "-", "*"])
def test_binary_arithmetic(op):
    check_grad(op, [randn(3, 4), randn(3, 4)])


def test_div():
    check_grad(F.div, [randn(3, 4), nonzero(3, 4)])
    check_grad(lambda a, b: a / b, [randn(2, 3), nonzero(2, 3)])


def test_reflected_scalar_ops():
    check_grad(lambda a: 2.5 - a, [randn(3)])
    check_grad(lambda a: 2.5 / a, [nonzero(3)])
    check_grad(lambda a: 1.5 * a + 0.5, [randn(3)])


def test_neg():
    check_grad(F.neg, [randn(3, 4)])
    check_grad(lambda a: -a, [randn(5)])


@pytest.mark.parametrize("exponent", [2.0, 3.0, -1.0])
def test_pow_tensor_base_integer_exponent(exponent):
    check_grad(lambda a: a ** exponent, [nonzero(3, 4)])


@pytest.mark.parametrize("exponent", [0.5, 2.5, -1.5])
def test_pow_tensor_base_fractional_exponent(exponent):
    check_grad(lambda a: F.pow(a, exponent), [positive(3, 4)])


def test_pow_tensor_exponent_positive_base():
    check_grad(lambda b: 2.0 ** b, [randn(3, 4)])
    check_grad(lambda a, b: a ** b, [positive(3, 4), randn(3, 4)])
    check_grad(lambda a, b: F.pow(a, b), [positive(2, 3), randn(3)])  # broadcast exponent


def test_exp_log():
    check_grad(F.exp, [randn(3, 4)])
    check_grad(lambda a: a.exp(), [randn(5)])
    check_grad(F.log, [positive(3, 4)])
    check_grad(lambda a: a.log(), [positive(5)])


def test_maximum_and_relu():
    a = randn(4, 5)
    b = a + nonzero(4, 5, low=0.1, high=1.0)  # never tied
    check_grad(F.maximum, [a, b])
    check_grad(F.relu, [away_from(4, 5)])


def test_clip_and_hardtanh():
    check_grad(lambda a: F.clip(a, -0.5, 1.5), [away_from(4, 5, points=(-0.5, 1.5))])
    check_grad(lambda a: a.clip(-1.0, 0.3), [away_from(4, 5, points=(-1.0, 0.3))])
    check_grad(F.hardtanh, [away_from(4, 5, points=(-1.0, 1.0))])
    check_grad(lambda a: nn.HardTanh()(a), [away_from(6, points=(-1.0, 1.0))])


# --- broadcasting -----------------------------------------------------------------------

@pytest.mark.parametrize("shapes", [((3, 1), (4,)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)),
                                    ((), (3,)), ((2, 1, 4), (5, 1))])
@pytest.mark.parametrize("op", [F.add, F.sub, F.mul, F.div], ids=["add", "sub", "mul", "div"])
def test_broadcasting(op, shapes):
    sa, sb = shapes
    b = nonzero(*sb) if op is F.div else randn(*sb)
    check_grad(op, [randn(*sa), b])


# --- linear algebra ---------------------------------------------------------------------

def test_matmul_2d():
    check_grad(F.matmul, [randn(3, 4), randn(4, 5)])
    check_grad(lambda a, b: a @ b, [randn(1, 4), randn(4, 1)])


def test_matmul_batched():
    check_grad(F.matmul, [randn(2, 3, 4), randn(2, 4, 5)])


def test_matmul_broadcast_batch():
    check_grad(F.matmul, [randn(2, 3, 4), randn(4, 5)])
    check_grad(F.matmul, [randn(3, 4), randn(2, 4, 5)])
    check_grad(F.matmul, [randn(2, 1, 3, 4), randn(5, 4, 2)])


# --- reductions -------------------------------------------------------------------------

AXES = [(None, False), (None, True), (0, False), (1, True), (-1, False), ((0, 2), False),
        ((0, 2), True), ((1, 2), False)]


@pytest.mark.parametrize("axis,keepdims", AXES)
def test_sum(axis, keepdims):
    check_grad(lambda a: F.sum(a, axis=axis, keepdims=keepdims), [randn(2, 3, 4)])
    check_grad(lambda a: a.sum(axis=axis, keepdims=keepdims), [randn(3, 2, 2)])


@pytest.mark.parametrize("axis,keepdims", AXES)
def test_mean(axis, keepdims):
    check_grad(lambda a: F.mean(a, axis=axis, keepdims=keepdims), [randn(2, 3, 4)])
    check_grad(lambda a: a.mean(axis=axis, keepdims=keepdims), [randn(3, 2, 2)])


@pytest.mark.parametrize("axis,keepdims", AXES)
def test_max(axis, keepdims):
    check_grad(lambda a: F.max(a, axis=axis, keepdims=keepdims), [distinct(2, 3, 4)])
    check_grad(lambda a: a.max(axis=axis, keepdims=keepdims), [distinct(3, 2, 2)])


def test_max_ties_share_the_gradient():
    x = Tensor(np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), requires_grad=True)
    F.max(x, axis=1).backward(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(host(x.grad), [[0, 0.5, 0.5, 0], [0.5, 0.5, 0.5, 0.5]])


# --- shape ------------------------------------------------------------------------------

def test_reshape():
    check_grad(lambda a: F.reshape(a, 4, 6), [randn(2, 3, 4)])
    check_grad(lambda a: a.reshape((3, -1)), [randn(2, 3, 4)])
    check_grad(lambda a: a.reshape(-1), [randn(2, 3)])


def test_transpose():
    check_grad(F.transpose, [randn(2, 3, 4)])
    check_grad(lambda a: F.transpose(a, (1, 2, 0)), [randn(2, 3, 4)])


@pytest.mark.parametrize("axes", [(-1, 0, 1), (2, -3, -2), (-1, -2, -3), (0, 2, 1)])
def test_transpose_negative_axes(axes):
    """A bug once hid here: argsort of raw negative axes gave a wrong-shaped gradient that
    unbroadcast then reshaped into place. Checked with both call forms."""
    check_grad(lambda a: F.transpose(a, axes), [randn(2, 3, 4)])
    check_grad(lambda a: a.transpose(*axes), [randn(2, 3, 4)])


def test_transpose_refuses_a_non_permutation():
    with pytest.raises(ValueError, match="not a permutation"):
        F.transpose(Tensor(np.zeros((2, 3))), (0, 0))
    with pytest.raises(ValueError, match="not a permutation"):
        F.transpose(Tensor(np.zeros((2, 3))), (0, 2))
    check_grad(lambda a: a.T, [randn(3, 5)])


@pytest.mark.parametrize("index", [
    (slice(1, 3), slice(None, None, 2)),
    (slice(None), 1),
    (slice(None, None, -1),),
    (Ellipsis, slice(1, None)),
    2,
], ids=["slices", "slice-int", "reverse", "ellipsis", "int"])
def test_getitem_basic(index):
    check_grad(lambda a: a[index], [randn(4, 5)])


def test_getitem_integer_arrays_with_repeats():
    check_grad(lambda a: a[np.array([0, 2, 0, 0])], [randn(3, 4)])
    check_grad(lambda a: a[np.array([0, 1, 1, 1]), np.array([2, 2, 0, 2])], [randn(3, 4)])
    check_grad(lambda a: a[:, [3, 3, 1]], [randn(2, 4)])


def test_getitem_repeated_index_accumulates_exactly():
    x = Tensor(np.zeros(3), requires_grad=True)
    x[np.array([1, 1, 1, 2])].backward(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(host(x.grad), [0.0, 6.0, 4.0])


# --- network building blocks ------------------------------------------------------------

def test_log_softmax():
    check_grad(F.log_softmax, [randn(3, 5)])
    check_grad(lambda a: F.log_softmax(a, axis=0), [randn(4, 3)])
    check_grad(lambda a: F.log_softmax(a * 30.0), [randn(2, 4)])  # large logits


def test_dropout_fixed_mask():
    def fn(a):
        return F.dropout(a, 0.4, np.random.default_rng(7))  # same mask on every evaluation

    (g,) = check_grad(fn, [randn(6, 7)])
    assert 0 < np.count_nonzero(g) < g.size  # the mask really dropped and kept something


def _batchnorm(x, gamma, beta, training):
    bn = nn.BatchNorm(x.shape[1])
    bn.gamma, bn.beta = gamma, beta
    bn.running_mean = dev(np.linspace(-0.5, 0.5, x.shape[1]))
    bn.running_var = dev(np.linspace(0.5, 2.0, x.shape[1]))
    bn.train(training)
    return bn(x)


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 2, 3)], ids=["2d", "4d"])
def test_batchnorm_training(shape):
    c = shape[1]
    check_grad(lambda x, g, b: _batchnorm(x, g, b, True),
               [randn(*shape) * 2 + 1, nonzero(c), randn(c)])


def test_batchnorm_training_through_composite_loss():
    # a nonlinear function of the output exercises the mean/var terms of dL/dx fully
    check_grad(lambda x, g, b: (_batchnorm(x, g, b, True) ** 3.0).sum(axis=0),
               [randn(5, 4), nonzero(4), randn(4)])


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 2)], ids=["2d", "4d"])
def test_batchnorm_eval(shape):
    c = shape[1]
    check_grad(lambda x, g, b: _batchnorm(x, g, b, False), [randn(*shape), nonzero(c), randn(c)])


def test_shift_batchnorm_eval_wrt_input():
    def fn(x):
        bn = nn.ShiftBatchNorm(3).eval()
        bn.gamma.data = dev(np.array([0.7, -1.3, 2.9]))
        bn.running_var = dev(np.array([0.3, 1.0, 5.0]))
        return bn(x)

    check_grad(fn, [randn(4, 3)])


def test_linear_layer():
    def fn(x, w, b):
        layer = nn.Linear(4, 3)
        layer.weight, layer.bias = w, b
        return layer(x)

    check_grad(fn, [randn(5, 4), randn(3, 4), randn(3)])


def test_binary_linear_wrt_input():
    w = np.random.default_rng(3).uniform(-1, 1, (3, 4))

    def fn(x):
        layer = nn.BinaryLinear(4, 3)
        layer.weight.data = dev(w)
        return layer(x)

    (g,) = check_grad(fn, [randn(5, 4)])
    assert np.any(g != 0)


# --- losses -----------------------------------------------------------------------------

def test_squared_hinge():
    labels = np.array([0, 2, 1, 2])
    t = -np.ones((4, 3))
    t[np.arange(4), labels] = 1
    # keep 1 - t*y away from 0 (the hinge's kink)
    y = t * (1 - away_from(4, 3, margin=0.1))
    (g,) = check_grad(lambda o: losses.squared_hinge(o, labels), [y])
    assert np.any(g != 0) and np.any(g == 0)  # both active and inactive margins present


def test_cross_entropy():
    labels = np.array([0, 2, 1, 2, 4])
    check_grad(lambda o: losses.cross_entropy(o, labels), [randn(5, 5) * 2])


def test_composite_with_shared_subexpressions():
    # softmax written out by hand: exp(x) feeds both the numerator and the normaliser,
    # so the engine must gather both paths before passing the gradient on
    def softmax(a):
        e = (a - 0.5).exp()
        return e / e.sum(axis=1, keepdims=True)

    check_grad(softmax, [randn(3, 4)])
    check_grad(lambda a, b: (a * b + a) * (b - a).exp(), [randn(2, 3), randn(2, 3)])
