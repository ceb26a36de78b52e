"""Binarization: sign with the straight-through estimator, weight binarization, AP2."""

import numpy as np
import pytest

from minibnn import nn
from minibnn.binary import ap2, ap2_ste, binarize, sign, sign_ste
from minibnn.tensor import Tensor

from arrays import host

PLANTED = np.array([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0])


# --- sign and its straight-through estimator --------------------------------------------

def test_sign_of_zero_is_plus_one():
    out = sign(PLANTED)
    np.testing.assert_array_equal(out, [-1, -1, -1, 1, 1, 1, 1, 1])
    assert np.signbit(PLANTED[3])  # the planted -0.0 really is negative zero
    assert sign(np.array(0, dtype=np.int64)) == 1
    assert sign(np.array([0, -3], dtype=np.int32)).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sign_ste_forward_and_mask(dtype):
    x = Tensor(PLANTED.astype(dtype), requires_grad=True)
    y = sign_ste(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(host(y), [-1, -1, -1, 1, 1, 1, 1, 1])
    g = np.arange(1.0, 9.0).astype(dtype)
    y.backward(g)
    # g * 1{|x| <= 1}: exactly +-1 passes, +-2 is blocked
    np.testing.assert_array_equal(host(x.grad), g * np.array([0, 1, 1, 1, 1, 1, 1, 0]))
    assert x.grad.dtype == dtype


def test_sign_module_is_sign_ste():
    x = Tensor(PLANTED.copy(), requires_grad=True)
    y = nn.Sign()(x)
    np.testing.assert_array_equal(host(y), [-1, -1, -1, 1, 1, 1, 1, 1])
    y.backward(np.ones(8))
    np.testing.assert_array_equal(host(x.grad), [0, 1, 1, 1, 1, 1, 1, 0])


def test_sign_ste_mask_just_outside_one():
    x = Tensor(np.array([-1.0 - 1e-12, np.nextafter(1.0, 2.0), 1.0 - 1e-12]), requires_grad=True)
    sign_ste(x).backward(np.ones(3))
    np.testing.assert_array_equal(host(x.grad), [0, 0, 1])


# --- deterministic and stochastic weight binarization -----------------------------------

def test_binarize_deterministic_passes_gradient_unchanged():
    w = Tensor(np.array([-3.0, -1.0, -0.2, 0.0, 0.7, 1.0, 5.0]), requires_grad=True)
    wb = binarize(w)
    np.testing.assert_array_equal(host(wb), [-1, -1, -1, 1, 1, 1, 1])
    g = np.array([0.5, -1.0, 2.0, 3.0, -4.0, 6.0, 7.0])
    wb.backward(g)
    np.testing.assert_array_equal(host(w.grad), g)  # no |w| <= 1 mask for weights


def test_binarize_stochastic_gradient_unchanged():
    w = Tensor(np.array([-2.0, 0.3, 2.0]), requires_grad=True)
    binarize(w, stochastic=True, rng=np.random.default_rng(0)).backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(host(w.grad), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("w", [-3.0, -1.0, -0.6, -0.1, 0.0, 0.3, 0.8, 1.0, 1.7])
def test_stochastic_frequency_matches_hard_sigmoid(w):
    n = 40_000
    out = host(binarize(Tensor(np.full(n, w)), stochastic=True, rng=np.random.default_rng(42)))
    assert set(np.unique(out)) <= {-1.0, 1.0}
    freq = np.mean(out == 1)
    p = np.clip((w + 1) / 2, 0, 1)
    if p in (0.0, 1.0):
        assert freq == p  # never / always +1, exactly
    else:
        # 5 standard deviations: a wrong probability (e.g. sigmoid(w), or 1 - p) fails
        assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_stochastic_frequency_per_element_in_one_tensor():
    n = 20_000
    ws = np.array([-1.2, -0.5, 0.0, 0.5, 1.2])
    out = host(binarize(Tensor(np.tile(ws, (n, 1))), stochastic=True, rng=np.random.default_rng(3)))
    freq = (out == 1).mean(axis=0)
    np.testing.assert_allclose(freq, [0.0, 0.25, 0.5, 0.75, 1.0], atol=0.02)
    assert freq[0] == 0.0 and freq[-1] == 1.0


def test_stochastic_same_seed_same_result():
    w = Tensor(np.random.default_rng(0).uniform(-1, 1, (50, 40)))
    a = host(binarize(w, stochastic=True, rng=np.random.default_rng(5)))
    b = host(binarize(w, stochastic=True, rng=np.random.default_rng(5)))
    c = host(binarize(w, stochastic=True, rng=np.random.default_rng(6)))
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


def test_stochastic_keeps_dtype_and_needs_rng():
    w = Tensor(np.zeros(4, dtype=np.float32))
    assert binarize(w, stochastic=True, rng=np.random.default_rng(0)).dtype == np.float32
    with pytest.raises(ValueError, match="rng"):
        binarize(w, stochastic=True)


# --- AP2: power-of-two rounding ---------------------------------------------------------

def test_ap2_exact_powers_of_two_unchanged():
    powers = 2.0 ** np.arange(-20, 21)
    np.testing.assert_array_equal(ap2(powers), powers)
    np.testing.assert_array_equal(ap2(-powers), -powers)


@pytest.mark.parametrize("x,expected", [
    (3.0, 4.0), (5.0, 4.0), (6.0, 8.0), (1.4, 1.0), (1.5, 2.0), (0.7, 0.5), (0.75, 1.0),
    (0.3, 0.25), (0.37, 0.5), (100.0, 128.0), (90.0, 64.0),
    (-3.0, -4.0), (-0.7, -0.5), (-1.4, -1.0), (0.0, 0.0), (-0.0, 0.0),
])
def test_ap2_values(x, expected):
    # ap2(x) = sign(x) * 2 ** round(log2 |x|)
    assert ap2(np.array([x]))[0] == expected


def test_ap2_is_within_sqrt2_of_its_input():
    x = np.random.default_rng(0).uniform(-100, 100, 1000)
    y = ap2(x)
    assert np.all(np.sign(y) == np.sign(x))
    assert np.all(np.log2(np.abs(y)) == np.round(np.log2(np.abs(y))))  # a power of two
    ratio = np.abs(y / x)
    assert np.all((ratio >= 2 ** -0.5) & (ratio <= 2 ** 0.5))


def test_ap2_dtypes():
    assert ap2(np.array([3.0], dtype=np.float32)).dtype == np.float32
    assert ap2(np.array([3.0])).dtype == np.float64
    np.testing.assert_array_equal(ap2(np.array([0, 3, -5])), [0.0, 4.0, -4.0])


def test_ap2_ste_forward_ap2_backward_identity():
    x = Tensor(np.array([3.0, -0.7, 0.0, 8.0]), requires_grad=True)
    y = ap2_ste(x)
    np.testing.assert_array_equal(host(y), [4.0, -0.5, 0.0, 8.0])
    g = np.array([1.0, -2.0, 3.0, 0.5])
    y.backward(g)
    np.testing.assert_array_equal(host(x.grad), g)
