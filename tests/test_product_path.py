"""Binary layers run their +-1 products on the XNOR kernel or on a float GEMM, whichever is
faster for the shape ("auto", measured once per shape), or as forced; the numbers are the
same on every path, in the forward and in the gradients, on every backend."""

import numpy as np
import pytest

import minibnn as bnn
from minibnn import Tensor, backend, binary, losses, models, nn, optim, train


@pytest.fixture
def path_setting():
    previous = binary.product_path()
    yield binary.set_product_path
    binary.set_product_path(previous)


def _pm1(rng, shape):
    return np.where(rng.standard_normal(shape) >= 0, 1.0, -1.0).astype(np.float32)


def _linear_and_conv(path):
    """Outputs and gradients of a binary-input linear and conv layer under ``path``."""
    binary.set_product_path(path)
    rng = np.random.default_rng(0)
    out = []
    for layer, shape in ((nn.BinaryLinear(70, 6, binary_input=True, rng=np.random.default_rng(1)),
                          (5, 70)),
                         (nn.BinaryConv2d(3, 4, 3, padding=1, stride=2, binary_input=True,
                                          rng=np.random.default_rng(2)), (2, 3, 7, 6))):
        x = Tensor(backend.asarray(_pm1(rng, shape)), requires_grad=True)
        y = layer(x)
        g = rng.standard_normal(y.shape).astype(np.float32)
        y.backward(backend.asarray(g))
        out += [y.numpy(), backend.to_numpy(x.grad), backend.to_numpy(layer.weight.grad)]
    return out


def test_every_path_gives_the_same_numbers(each_backend, path_setting):
    want = _linear_and_conv("xnor")
    for path in ("float", "auto", "auto"):  # auto: first call measures, second reuses
        for a, b in zip(_linear_and_conv(path), want):
            np.testing.assert_array_equal(a, b)


def test_auto_measures_each_shape_once(each_backend, path_setting, monkeypatch):
    path_setting("auto")
    monkeypatch.setattr(binary, "_choices", {})
    layer = nn.BinaryLinear(130, 9, binary_input=True, rng=np.random.default_rng(0))
    x = Tensor(backend.asarray(_pm1(np.random.default_rng(1), (4, 130))))
    layer(x)
    key = (each_backend, "linear", 4, 130, 9)
    assert binary.product_choices() == {key: binary.product_choices()[key]}
    assert binary.product_choices()[key] in ("xnor", "float")
    calls = []
    monkeypatch.setattr(binary, "_timed", lambda *a: calls.append(a))
    layer(x)  # the shape is known: no second measurement
    assert not calls


def test_forced_paths_run_what_they_say(path_setting, monkeypatch):
    calls = []
    kern = backend.kernel_module()
    real = kern.xnor_gemm
    monkeypatch.setattr(kern, "xnor_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = nn.BinaryLinear(64, 3, binary_input=True, rng=np.random.default_rng(0))
    x = Tensor(_pm1(np.random.default_rng(1), (2, 64)))
    path_setting("float")
    layer(x)
    assert not calls
    path_setting("xnor")
    layer(x)
    assert calls


def test_a_product_too_long_for_float32_always_runs_xnor(path_setting):
    path_setting("float")
    ran = []
    binary._run_product("linear", (1, binary.FLOAT_EXACT_K, 1), binary.FLOAT_EXACT_K,
                        lambda: ran.append("xnor"), lambda: ran.append("float"))
    assert ran == ["xnor"]


def test_bad_setting_is_refused_and_changes_nothing(path_setting, monkeypatch):
    before = binary.product_path()
    with pytest.raises(ValueError, match="set_product_path: expected one of auto, xnor, float"):
        binary.set_product_path("fast")
    assert binary.product_path() == before
    monkeypatch.setattr(binary, "_product_path", None)
    monkeypatch.setenv("MINIBNN_BINARY_PRODUCT", "popcount")
    with pytest.raises(ValueError, match="MINIBNN_BINARY_PRODUCT"):
        binary.product_path()


def test_training_under_auto_equals_training_on_xnor(each_backend, path_setting):
    def losses_after(path):
        path_setting(path)
        model = models.mnist_convnet(channels=(4, 8), hidden=16, rng=bnn.seed(0))
        opt = optim.Adam(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(3):
            x = backend.asarray(rng.uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32))
            y = backend.asarray(rng.integers(0, 10, 8))
            loss, _ = train.train_step(model, opt, losses.squared_hinge, x, y)
            out.append(float(loss.item()))
        return out, [backend.to_numpy(p.data) for p in model.parameters()]
    l_x, p_x = losses_after("xnor")
    l_a, p_a = losses_after("auto")
    assert l_a == l_x
    for a, b in zip(p_a, p_x):
        np.testing.assert_array_equal(a, b)
