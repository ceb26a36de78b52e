"""Layers: Module bookkeeping, Linear/BinaryLinear, BatchNorm/ShiftBatchNorm, Dropout, models."""

import math
import re

import numpy as np
import pytest
from arrays import dev, host

from minibnn import models, nn
from minibnn.tensor import Tensor


def rng(seed=0):
    return np.random.default_rng(seed)


def small_net(seed=0):
    return nn.Sequential(nn.Linear(3, 4, rng=rng(seed)), nn.BatchNorm(4),
                         nn.Sign(), nn.BinaryLinear(4, 2, bias=True, rng=rng(seed + 1)))


def ap2_ref(x):
    """sign(x) * 2 ** round(log2 |x|), written independently of minibnn.binary."""
    x = np.asarray(x, dtype=np.float64)
    out = np.where(x >= 0, 1.0, -1.0) * 2.0 ** np.round(np.log2(np.abs(np.where(x == 0, 1, x))))
    return np.where(x == 0, 0.0, out)


# --- Module bookkeeping -----------------------------------------------------------------

def test_named_parameters_order_and_names():
    net = small_net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.gamma", "layers.1.beta",
                     "layers.3.weight", "layers.3.bias"]
    params = net.parameters()
    assert params[0] is net[0].weight and params[2] is net[1].gamma and params[5] is net[3].bias
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)


def test_parameters_skip_absent_bias():
    assert [n for n, _ in nn.Linear(2, 3, bias=False).named_parameters()] == ["weight"]
    assert [n for n, _ in nn.BinaryLinear(2, 3).named_parameters()] == ["weight"]


def test_nested_sequential_names_and_modules():
    inner = nn.Sequential(nn.Linear(2, 2, rng=rng()), nn.Dropout(0.5))
    outer = nn.Sequential(inner, nn.BatchNorm(2))
    assert [n for n, _ in outer.named_parameters()] == [
        "layers.0.layers.0.weight", "layers.0.layers.0.bias", "layers.1.gamma", "layers.1.beta"]
    assert [type(m).__name__ for m in outer.modules()] == [
        "Sequential", "Sequential", "Linear", "Dropout", "BatchNorm"]


def test_train_eval_recurse():
    inner = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm(3))
    outer = nn.Sequential(nn.Linear(3, 3, rng=rng()), inner)
    assert outer.eval() is outer
    assert all(not m.training for m in outer.modules())
    assert outer.train() is outer
    assert all(m.training for m in outer.modules())
    inner.eval()
    assert outer.training and not inner.training and not inner[1].training


def test_zero_grad():
    net = small_net()
    x = Tensor(rng().standard_normal((5, 3)).astype(np.float32))
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_sequential_rejects_non_modules():
    with pytest.raises(TypeError, match="layer 1"):
        nn.Sequential(nn.Sign(), lambda x: x)


# --- state dicts ------------------------------------------------------------------------

def test_state_dict_keys_and_copies():
    net = small_net()
    sd = net.state_dict()
    assert list(sd) == ["layers.0.weight", "layers.0.bias", "layers.1.gamma", "layers.1.beta",
                        "layers.3.weight", "layers.3.bias",
                        "layers.1.running_mean", "layers.1.running_var"]
    sd["layers.0.weight"][...] = 123.0  # a copy: changing it leaves the model alone
    assert not np.any(host(net[0].weight) == 123.0)


def test_state_dict_round_trip():
    a, b = small_net(0), small_net(10)
    x = Tensor(rng(5).standard_normal((6, 3)).astype(np.float32))
    a(x)  # move the running statistics off their initial values
    a.eval(), b.eval()
    assert not np.allclose(host(a(x)), host(b(x)))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(host(a(x)), host(b(x)))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        np.testing.assert_array_equal(va, vb)
    # loading writes into the existing arrays, so optimizers holding them still see them
    w = b[0].weight
    b.load_state_dict(small_net(3).state_dict())
    assert b[0].weight is w


def _assert_state_equal(net, state):
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_load_state_dict_missing_key():
    net = small_net()
    before = net.state_dict()
    sd = small_net(7).state_dict()
    del sd["layers.1.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.running_var'\]"):
        net.load_state_dict(sd)
    _assert_state_equal(net, before)


def test_load_state_dict_unexpected_key():
    net = small_net()
    before = net.state_dict()
    sd = small_net(7).state_dict()
    sd["layers.9.weight"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.9.weight'\]"):
        net.load_state_dict(sd)
    _assert_state_equal(net, before)


def test_load_state_dict_wrong_shape_names_key_and_shapes_and_changes_nothing():
    net = small_net()
    before = net.state_dict()
    sd = small_net(7).state_dict()  # every entry differs from net's ...
    sd["layers.3.weight"] = np.zeros((2, 5), np.float32)  # ... and one has the wrong shape
    with pytest.raises(ValueError, match=r"'layers.3.weight'.*\(2, 5\).*\(2, 4\)"):
        net.load_state_dict(sd)
    _assert_state_equal(net, before)


# --- Linear and BinaryLinear ------------------------------------------------------------

def test_linear_init_and_forward():
    layer = nn.Linear(20, 10, rng=rng())
    limit = math.sqrt(6 / 30)
    w = host(layer.weight)
    assert w.shape == (10, 20) and w.dtype == np.float32
    assert np.all(np.abs(w) <= limit) and w.max() > 0.8 * limit and w.min() < -0.8 * limit
    np.testing.assert_array_equal(host(layer.bias), np.zeros(10))
    layer.bias.data[:] = dev(np.arange(10))
    x = rng(1).standard_normal((4, 20)).astype(np.float32)
    np.testing.assert_allclose(host(layer(Tensor(x))), x @ w.T + np.arange(10),
                               rtol=1e-5, atol=1e-5)


def test_binary_linear_init():
    layer = nn.BinaryLinear(784, 256, rng=rng())
    w = host(layer.weight)
    assert w.shape == (256, 784)
    assert w.min() >= -1.0 and w.max() <= 1.0 and w.min() < -0.99 and w.max() > 0.99
    assert layer.weight.lr_scale == pytest.approx(1 / math.sqrt(1.5 / (784 + 256)), rel=1e-12)
    assert layer.weight.clip == 1.0
    assert layer.bias is None
    assert nn.Linear(3, 4).weight.lr_scale == 1.0 and nn.Linear(3, 4).weight.clip is None


def test_binary_linear_forward_is_x_times_sign_w():
    layer = nn.BinaryLinear(5, 3, rng=rng())
    layer.weight.data[0, 0] = 0.0  # sign(0) = +1
    layer.weight.data[1, 2] = -0.0
    x = rng(2).integers(-3, 4, (4, 5)).astype(np.float32)  # integers: the product is exact
    w_b = np.where(host(layer.weight) >= 0, 1.0, -1.0)
    expected = x @ w_b.T
    np.testing.assert_array_equal(host(layer(Tensor(x))), expected)
    layer.eval()
    np.testing.assert_array_equal(host(layer(Tensor(x))), expected)


def test_binary_linear_gradients():
    layer = nn.BinaryLinear(4, 3, bias=True, rng=rng())
    x = Tensor(rng(1).standard_normal((5, 4)), requires_grad=True)
    g = rng(2).standard_normal((5, 3))
    layer(x).backward(g)
    w_b = np.where(host(layer.weight) >= 0, 1.0, -1.0)
    np.testing.assert_allclose(host(layer.weight.grad), g.T @ host(x), rtol=1e-6)  # STE: unchanged
    np.testing.assert_allclose(host(x.grad), g @ w_b, rtol=1e-6)
    np.testing.assert_allclose(host(layer.bias.grad), g.sum(axis=0), rtol=1e-6)


def test_binary_linear_stochastic_train_vs_eval():
    layer = nn.BinaryLinear(50, 40, stochastic=True, rng=rng(4))
    layer.weight.data[...] = dev(rng(5).uniform(-0.5, 0.5, (40, 50)))
    x = Tensor(np.eye(50, dtype=np.float32))
    a, b = host(layer(x)), host(layer(x))
    assert np.any(a != b)  # training: a fresh random binarization each pass
    layer.eval()
    c, d = host(layer(x)), host(layer(x))
    np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(c, np.where(host(layer.weight) >= 0, 1.0, -1.0).T)


@pytest.mark.parametrize("make", [lambda: nn.Linear(3, 4), lambda: nn.BinaryLinear(3, 4)],
                         ids=["Linear", "BinaryLinear"])
@pytest.mark.parametrize("shape", [(2, 5), (3,), (2, 3, 2)])
def test_linear_wrong_input_shape(make, shape):
    layer = make()
    name = type(layer).__name__
    pattern = f"{name}.*{re.escape(repr(tuple(shape)))}.*{re.escape('(batch, 3)')}"
    with pytest.raises(ValueError, match=pattern):
        layer(Tensor(np.zeros(shape, np.float32)))


@pytest.mark.parametrize("shape", [(2, 3), (2, 4, 3), (5,), (2, 3, 2, 2)])
@pytest.mark.parametrize("cls", [nn.BatchNorm, nn.ShiftBatchNorm])
def test_batchnorm_wrong_input_shape(cls, shape):
    with pytest.raises(ValueError, match=f"{cls.__name__}.*{re.escape(repr(shape))}.*4"):
        cls(4)(Tensor(np.zeros(shape, np.float32)))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        nn.BatchNorm(3, eps=0.0)
    with pytest.raises(ValueError, match="dropout"):
        nn.Dropout(1.0)
    with pytest.raises(ValueError, match="dropout"):
        nn.Dropout(-0.1)


# --- BatchNorm --------------------------------------------------------------------------

def test_batchnorm_training_normalizes_per_feature():
    x = rng(0).standard_normal((256, 5)) * np.array([1, 2, 3, 0.5, 10]) + np.array([0, 5, -3, 1, 2])
    y = host(nn.BatchNorm(5)(Tensor(x.astype(np.float32))))
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=0), 1, atol=5e-4)  # eps = 1e-4 shrinks it a little
    bn = nn.BatchNorm(5)
    bn.gamma.data[:] = dev([1, 2, 3, 4, 5])
    bn.beta.data[:] = dev([-1, 0, 1, 2, 3])
    y = host(bn(Tensor(x.astype(np.float32))))
    np.testing.assert_allclose(y.mean(axis=0), [-1, 0, 1, 2, 3], atol=1e-4)
    np.testing.assert_allclose(y.std(axis=0), [1, 2, 3, 4, 5], rtol=1e-3)


def test_batchnorm_4d_normalizes_per_channel():
    x = rng(1).standard_normal((8, 3, 4, 4)) * np.array([1, 4, 9]).reshape(1, 3, 1, 1) + 3
    y = host(nn.BatchNorm(3)(Tensor(x)))
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-10)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-3)
    assert not np.allclose(y.var(axis=(0, 1)), 1, atol=1e-2)  # not normalised over the wrong axes


def test_batchnorm_running_statistics_momentum():
    bn = nn.BatchNorm(3)
    np.testing.assert_array_equal(host(bn.running_mean), 0)
    np.testing.assert_array_equal(host(bn.running_var), 1)
    x1 = rng(0).standard_normal((10, 3)) * 2 + 1
    x2 = rng(1).standard_normal((10, 3)) * 3 - 2
    bn(Tensor(x1))
    rm = 0.1 * x1.mean(0)
    rv = 0.9 * 1 + 0.1 * x1.var(0)  # biased batch variance
    np.testing.assert_allclose(host(bn.running_mean), rm, rtol=1e-6)
    np.testing.assert_allclose(host(bn.running_var), rv, rtol=1e-6)
    bn(Tensor(x2))
    np.testing.assert_allclose(host(bn.running_mean), 0.9 * rm + 0.1 * x2.mean(0), rtol=1e-6)
    np.testing.assert_allclose(host(bn.running_var), 0.9 * rv + 0.1 * x2.var(0), rtol=1e-6)


def test_batchnorm_eval_uses_running_statistics():
    bn = nn.BatchNorm(3, eps=1e-4)
    bn.running_mean[:] = dev([1.0, -2.0, 0.5])
    bn.running_var[:] = dev([4.0, 0.25, 1.0])
    bn.gamma.data[:] = dev([2.0, 1.0, -1.0])
    bn.beta.data[:] = dev([0.0, 1.0, 3.0])
    bn.eval()
    x = rng(0).standard_normal((7, 3)).astype(np.float32)
    expected = ((x - host(bn.running_mean)) / np.sqrt(host(bn.running_var) + 1e-4)
                * host(bn.gamma) + host(bn.beta))
    np.testing.assert_allclose(host(bn(Tensor(x))), expected, rtol=1e-5, atol=1e-6)
    y1 = host(bn(Tensor(x[:1])))  # a batch of one works and does not depend on the batch
    np.testing.assert_allclose(y1, expected[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(host(bn.running_mean), [1.0, -2.0, 0.5])  # eval does not update


# --- ShiftBatchNorm ---------------------------------------------------------------------

def shift_bn_reference(x, gamma, beta, eps):
    """The paper's Algorithm 3, by hand in NumPy."""
    c = x - x.mean(axis=0)
    var = (c * ap2_ref(c)).mean(axis=0)
    xhat = c * ap2_ref(1 / np.sqrt(var + eps))
    return ap2_ref(gamma) * xhat + beta, var


def test_ap2_ref_agrees_with_paper_examples():
    np.testing.assert_array_equal(ap2_ref([3.0, 0.7, -6.0, 0.0, 1.0]), [4.0, 0.5, -8.0, 0.0, 1.0])


def test_shift_batchnorm_matches_algorithm_3():
    x = rng(0).standard_normal((64, 4)) * np.array([0.3, 1.0, 3.0, 7.0]) + np.array([1, -1, 0, 2])
    gamma, beta = np.array([0.3, 1.7, -0.6, 2.2]), np.array([0.1, -0.2, 0.0, 1.5])
    bn = nn.ShiftBatchNorm(4, eps=1e-4)
    bn.gamma.data, bn.beta.data = dev(gamma.copy()), dev(beta.copy())
    y = host(bn(Tensor(x)))
    expected, var = shift_bn_reference(x, gamma, beta, 1e-4)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    # the running statistics take the batch mean and the shift-based variance
    np.testing.assert_allclose(host(bn.running_mean), 0.1 * x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(host(bn.running_var), 0.9 + 0.1 * var, rtol=1e-6)


def test_shift_batchnorm_float32_matches_algorithm_3():
    x = (rng(1).standard_normal((32, 3)) * 2).astype(np.float32)
    bn = nn.ShiftBatchNorm(3)
    bn.gamma.data[:] = dev([0.9, 3.0, -0.4])
    y = host(bn(Tensor(x)))
    assert y.dtype == np.float32
    expected, _ = shift_bn_reference(x.astype(np.float64), host(bn.gamma).astype(np.float64),
                                     np.zeros(3), 1e-4)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_shift_batchnorm_close_to_standard_batchnorm():
    x = rng(2).standard_normal((128, 6)) * np.array([0.1, 0.5, 1, 2, 5, 20]) + 3
    ys = host(nn.ShiftBatchNorm(6)(Tensor(x)))
    y = host(nn.BatchNorm(6)(Tensor(x)))
    ratio = ys / y  # per feature a single power-of-two-ish factor
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), rtol=1e-9)
    # AP2 in the variance (within 2^±0.5, so 2^±0.25 on 1/std) and AP2 on 1/std (2^±0.5)
    assert np.all((ratio > 2 ** -0.75) & (ratio < 2 ** 0.75))
    np.testing.assert_allclose(ys.mean(axis=0), 0, atol=1e-10)


def test_shift_batchnorm_eval():
    bn = nn.ShiftBatchNorm(3)
    bn.running_mean[:] = dev([0.5, -1.0, 2.0])
    bn.running_var[:] = dev([3.0, 0.2, 1.0])
    bn.gamma.data[:] = dev([1.3, -0.3, 5.0])
    bn.beta.data[:] = dev([0.0, 1.0, -1.0])
    bn.eval()
    x = rng(3).standard_normal((5, 3))
    running_mean, running_var = host(bn.running_mean), host(bn.running_var)
    expected = ((x - running_mean) * ap2_ref(1 / np.sqrt(running_var.astype(np.float64) + 1e-4))
                * ap2_ref(host(bn.gamma)) + host(bn.beta))
    np.testing.assert_allclose(host(bn(Tensor(x))), expected, rtol=1e-6)


# --- Dropout, Sign, HardTanh, Flatten ---------------------------------------------------

def test_dropout_eval_is_identity():
    layer = nn.Dropout(0.5, rng=rng()).eval()
    x = rng(1).standard_normal((10, 10))
    np.testing.assert_array_equal(host(layer(Tensor(x))), x)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_train_keeps_and_scales(p):
    layer = nn.Dropout(p, rng=rng(3))
    n = 100_000
    x = rng(1).uniform(1, 2, n)
    y = host(layer(Tensor(x)))
    kept = y != 0
    assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-12)
    assert np.mean(y) == pytest.approx(np.mean(x), rel=0.02)  # expectation preserved


def test_dropout_masks_differ_between_calls_and_p_zero_is_identity():
    layer = nn.Dropout(0.5, rng=rng(0))
    x = Tensor(np.ones(1000))
    assert np.any(host(layer(x)) != host(layer(x)))
    np.testing.assert_array_equal(host(nn.Dropout(0.0)(x)), np.ones(1000))


def test_hardtanh_and_flatten():
    x = Tensor(np.array([-3.0, -1.0, 0.2, 1.0, 4.0]), requires_grad=True)
    y = nn.HardTanh()(x)
    np.testing.assert_array_equal(host(y), [-1, -1, 0.2, 1, 1])
    y.backward(np.ones(5))
    np.testing.assert_array_equal(host(x.grad), [0, 1, 1, 1, 0])
    z = Tensor(np.arange(24.0).reshape(2, 3, 4), requires_grad=True)
    f = nn.Flatten()(z)
    assert f.shape == (2, 12)
    np.testing.assert_array_equal(host(f)[1], np.arange(12.0, 24.0))
    f.backward(np.ones((2, 12)))
    assert z.grad.shape == (2, 3, 4)


# --- models -----------------------------------------------------------------------------

def test_mnist_mlp_structure():
    model = models.mnist_mlp(hidden=16, layers=2, rng=rng())
    types = [type(m).__name__ for m in model]
    assert types == ["Dropout", "BinaryLinear", "BatchNorm", "Sign", "Dropout",
                     "BinaryLinear", "BatchNorm", "Sign", "Dropout", "BinaryLinear", "BatchNorm"]
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.2, 0.5, 0.5]
    shapes = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.BinaryLinear)]
    assert shapes == [(784, 16), (16, 16), (16, 10)]
    assert [m.num_features for m in model if isinstance(m, nn.BatchNorm)] == [16, 16, 10]
    out = model(Tensor(np.zeros((3, 784), np.float32)))
    assert out.shape == (3, 10)


def test_mnist_mlp_without_dropout_shift_bn_and_config():
    model = models.mnist_mlp(hidden=8, layers=1, in_features=20, classes=4, dropout_in=0.0,
                             dropout_hidden=0.0, bn="shift", stochastic=True, momentum=0.2,
                             eps=1e-3, rng=rng())
    assert [type(m).__name__ for m in model] == [
        "BinaryLinear", "ShiftBatchNorm", "Sign", "BinaryLinear", "ShiftBatchNorm"]
    assert all(m.stochastic for m in model if isinstance(m, nn.BinaryLinear))
    assert all((m.momentum, m.eps) == (0.2, 1e-3) for m in model if isinstance(m, nn.ShiftBatchNorm))
    assert model.config == dict(arch="mnist_mlp", hidden=8, layers=1, in_features=20, classes=4,
                                dropout_in=0.0, dropout_hidden=0.0, bn="shift", stochastic=True,
                                momentum=0.2, eps=1e-3)
    rebuilt = models.build(model.config, rng=rng())
    assert [type(m) for m in rebuilt] == [type(m) for m in model]
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # same shapes and names


def test_mnist_mlp_bad_arguments():
    with pytest.raises(ValueError, match="bn.*'batch'"):
        models.mnist_mlp(hidden=4, layers=1, bn="batch")
    with pytest.raises(ValueError, match="layers"):
        models.mnist_mlp(hidden=4, layers=0)
    with pytest.raises(ValueError, match="architecture"):
        models.build({"arch": "resnet"})


# --- binary input: the recipe says which layers get +-1, nothing scans -----------------

def test_binary_input_flag_is_checked():
    for bad in (1, 0, "train", None):
        with pytest.raises(ValueError, match="binary_input"):
            nn.BinaryLinear(3, 4, binary_input=bad)


@pytest.mark.parametrize("dropout_hidden", [0.0, 0.5])
def test_mnist_mlp_marks_exactly_the_layers_that_receive_signs(dropout_hidden, monkeypatch):
    model = models.mnist_mlp(hidden=32, layers=3, in_features=20, dropout_in=0.2,
                             dropout_hidden=dropout_hidden, rng=rng())
    layers = [m for m in model if isinstance(m, nn.BinaryLinear)]
    hidden = "eval" if dropout_hidden else True
    assert [l.binary_input for l in layers] == [False, hidden, hidden, hidden]
    seen = []
    real = nn.BinaryLinear.forward

    def spy(self, x):
        seen.append((self.uses_xnor(), bool(np.all(np.abs(host(x)) == 1))))
        return real(self, x)

    monkeypatch.setattr(nn.BinaryLinear, "forward", spy)
    x = Tensor(rng(3).uniform(-1, 1, (8, 20)).astype(np.float32))
    for training in (True, False):
        model.train(training)
        seen.clear()
        model(x)
        # every layer on the XNOR path really receives +-1; the others do not
        assert all(binary for xnor, binary in seen if xnor)
        assert [xnor for xnor, _ in seen] == [False] + [not training or not dropout_hidden] * 3
        assert all(not binary for xnor, binary in seen if not xnor)


def test_xnor_path_equals_float_path_with_gradients(each_backend, xnor_products):
    """binary_input=True (XNOR kernel) and False (float product) give the same outputs and
    gradients on +-1 input, 2-D and 3-D."""
    from minibnn import backend
    r = rng(7)
    w = r.uniform(-1, 1, (6, 70)).astype(np.float32)
    for shape in ((5, 70), (2, 3, 70)):
        x_np = np.where(r.standard_normal(shape) >= 0, 1.0, -1.0).astype(np.float32)
        g = r.standard_normal(shape[:-1] + (6,)).astype(np.float32)
        results = []
        for flag in (True, False):
            layer = nn.BinaryLinear(70, 6, binary_input=flag, bias=True)
            layer.weight.data[...] = backend.asarray(w)
            x = Tensor(backend.asarray(x_np), requires_grad=True)
            layer(x).backward(backend.asarray(g))
            results.append([backend.to_numpy(a) for a in
                            (layer(x).data, x.grad, layer.weight.grad, layer.bias.grad)])
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
