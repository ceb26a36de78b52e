"""Frozen ConvNets: predictions and every hidden layer's bits equal the model's on MNIST test
images (padding, strides, overlapping and plain pools, negative and zero BN slopes, huge
betas, biases, channel counts that do and do not divide 64), exact integer pre-activations,
save/load (and version-1 MLP files), the models freeze refuses, and the summary rows."""

import json

import numpy as np
import pytest

from minibnn import backend, data, deploy, models, nn, registry, summary
from minibnn import functional as F
from minibnn import train as T
from minibnn.tensor import Tensor, no_grad

from arrays import dev, host
from conftest import backend_params

N_FAST = 1000  # test images of the fast comparisons; the slow ones take all 10,000
N_NUMPY = 300  # the NumPy reference kernels are slow: fewer images there


@pytest.fixture(scope="module")
def mnist():
    m = data.load_mnist()
    return m.test_images, m.test_labels.astype(np.int64), m.train_images[:2000]


def _nchw(x_uint8, dtype=np.float32):
    """data.to_pm1 of uint8 images (n, H, W) as (n, 1, H, W)."""
    x = data.to_pm1(x_uint8, dtype=dtype, flatten=False)
    return x.reshape(len(x), 1, *x.shape[-2:]) if x.ndim == 3 else x


def _plant(model, images, rng):
    """Biases, BN statistics from training-mode passes on MNIST images, then gammas ~ N(0, 1)
    (about half negative), a zero gamma and a huge beta in every batch norm."""
    for layer in model.layers:
        if isinstance(layer, (nn.BinaryConv2d, nn.BinaryLinear)) and layer.bias is not None:
            layer.bias.data[...] = dev(rng.normal(0, 1, layer.bias.data.shape))
    bns = [l for l in model.layers if isinstance(l, (nn.BatchNorm, nn.ShiftBatchNorm))]
    for bn in bns:
        bn.momentum = 0.5
    model.train()
    with no_grad():
        for i in range(0, 600, 200):
            model(Tensor(_nchw(images[i:i + 200])))
    for bn in bns:
        bn.gamma.data[...] = dev(rng.normal(0, 1, bn.gamma.data.shape))
        bn.beta.data[...] = dev(rng.normal(0, 0.3, bn.beta.data.shape))
        bn.gamma.data[0] = 0.0
        bn.beta.data[1] = 1e6
    return model.eval()


def _planted_convnet(images):
    """mnist_convnet(channels=(8, 16), hidden=64): the recipe's layout, channel counts that
    divide 64 (several pixels share a word), planted BN parameters."""
    rng = np.random.default_rng(5)
    return _plant(models.mnist_convnet(channels=(8, 16), hidden=64, rng=rng), images, rng)


def _odd_convnet(images):
    """Everything the recipes do not: biases, shift-based BN, a 5x3 kernel with padding 2
    (non-square output), stride 2, an overlapping 3/2 pool, a conv -> pool -> Sign block
    without BN, a 2x2 kernel without padding, 24 and 70 channels (whole-word slots, 70 in
    two words) and 64 (one word), Dropout."""
    rng = np.random.default_rng(11)
    model = nn.Sequential(
        nn.BinaryConv2d(1, 24, (5, 3), padding=2, bias=True, rng=rng),         # 28 x 30
        nn.ShiftBatchNorm2d(24), nn.Sign(),
        nn.BinaryConv2d(24, 70, 3, stride=2, padding=1, bias=True, binary_input=True,
                        rng=rng),                                              # 14 x 15
        nn.MaxPool2d(3, stride=2), nn.BatchNorm2d(70), nn.Sign(),               # 6 x 7
        nn.BinaryConv2d(70, 64, 2, binary_input=True, rng=rng),                # 5 x 6
        nn.MaxPool2d(2), nn.Sign(),                                            # 2 x 3
        nn.Dropout(0.2, rng=rng), nn.Flatten(),
        nn.BinaryLinear(64 * 2 * 3, 40, bias=True, binary_input="eval", rng=rng),
        nn.BatchNorm(40), nn.Sign(),
        nn.BinaryLinear(40, 10, binary_input=True, rng=rng), nn.ShiftBatchNorm(10))
    return _plant(model, images, rng)


def _model_outputs(model, x_uint8, dtype=np.float32):
    """The model's eval-mode scores, every Sign's output > 0, and every binary layer's output
    (its pre-activation), NumPy, on data.to_pm1(x) in ``dtype``."""
    model.eval()
    h, signs, pre = Tensor(_nchw(x_uint8, dtype)), [], []
    with no_grad():
        for layer in model.layers:
            h = layer(h)
            if isinstance(layer, nn.Sign):
                signs.append(backend.to_numpy(h.data) > 0)
            if isinstance(layer, (nn.BinaryConv2d, nn.BinaryLinear)):
                pre.append(backend.to_numpy(h.data))
    return backend.to_numpy(h.data), signs, pre


@pytest.fixture(scope="module", params=["planted", "odd"])
def case(request, mnist):
    test_x, _, train_x = mnist
    model = (_planted_convnet if request.param == "planted" else _odd_convnet)(train_x)
    shape = None if request.param == "planted" else (1, 28, 28)  # planted: from its config
    frozen = deploy.freeze(model, input_shape=shape)
    scores, signs, pre = _model_outputs(model, test_x[:N_FAST])
    return dict(name=request.param, model=model, frozen=frozen, scores=scores, signs=signs,
                pre=pre)


def _binary_weights(layer):
    return np.where(backend.to_numpy(layer.weight.data) >= 0, 1.0, -1.0)


# ------------------------------------------------------------------ the model, bit for bit

@pytest.mark.parametrize("name", backend_params())
def test_predictions_and_every_hidden_bit_equal_the_model(case, name, mnist):
    n = N_NUMPY if name == "numpy" else N_FAST
    frozen, x, scores = case["frozen"], mnist[0][:n], case["scores"][:n]
    got = frozen.scores(x, backend=name)
    np.testing.assert_array_equal(got.argmax(axis=1), scores.argmax(axis=1))
    np.testing.assert_array_equal(frozen.predict(x, backend=name), got.argmax(axis=1))
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-5 * np.abs(scores).max())
    bits = frozen.activations(x, backend=name)
    assert len(bits) == len(case["signs"]) == len(frozen.layers) - 1
    for b, s in zip(bits, case["signs"]):  # every conv (after its pool) and dense layer
        assert b.shape == s[:n].shape
        np.testing.assert_array_equal(b, s[:n])


def test_the_planted_cases_are_there(case):
    """Negative and zero slopes, constant channels, a huge beta: what the fixtures plant."""
    frozen = case["frozen"]
    convs = [l for l in frozen.layers if l.kind == "conv"]
    with_bn = [l for j, l in enumerate(frozen.layers[:-1])
               if not (case["name"] == "odd" and j == 2)]  # odd: conv 2 has no BN
    for l in with_bn:
        assert np.abs(l.threshold).max() == l.z_max + 1  # gamma = 0 or beta = 1e6: constant
        if l.kind == "conv":
            assert l.negated.any() and not l.negated.all()
    if case["name"] == "odd":
        assert [l.stride for l in convs] == [1, 2, 1] and [l.pool for l in convs] == [
            None, (3, 2), (2, 2)]
        assert not convs[2].negated.any()  # no BN: slope +1, OR-pooled
        assert [l.in_hwc[2] for l in convs] == [1, 24, 70]
        assert frozen.layers[3].in_hwc == (2, 3, 64)


def test_integer_pre_activations_are_the_float_convolutions(case, mnist):
    """Layer 0: z = 256 x (float64 conv of (2x - 255)/256), exact, padding included, and the
    model's float32 conv is that exactly (+ bias). Hidden convs: z = the float64 conv of the
    previous layer's signs. Channels frozen with a negative slope compute -z."""
    frozen, model, x = case["frozen"], case["model"], mnist[0][:300]
    zs = frozen.trace(x, backend="numba")
    layers = [l for l in model.layers if isinstance(l, (nn.BinaryConv2d, nn.BinaryLinear))]
    inputs = [_nchw(x, np.float64)] + [np.where(s, 1.0, -1.0) for s in case["signs"]]
    for j, (z, fl, layer) in enumerate(zip(zs, frozen.layers, layers)):
        if fl.kind != "conv":
            break
        with no_grad():
            exact = host(F.conv2d(Tensor(inputs[j][:300]), Tensor(_binary_weights(layer)),
                                  layer.stride, layer.padding))
        if j == 0:
            exact = 256 * exact
            want32 = (exact / 256).astype(np.float32)  # exact: multiples of 1/256
            if layer.bias is not None:
                want32 = want32 + backend.to_numpy(layer.bias.data).reshape(1, -1, 1, 1)
            np.testing.assert_array_equal(case["pre"][0][:300], want32)
        assert exact.dtype == np.float64 and np.all(exact == np.rint(exact))
        sign = np.where(fl.negated, -1, 1).reshape(1, -1, 1, 1)
        assert z.dtype == np.int32 and z.shape == exact.shape
        np.testing.assert_array_equal(z, sign * exact)
    # the dense layers' z after the convs (columns permuted to (H, W, C) at freeze time)
    dense = next(j for j, l in enumerate(frozen.layers) if l.kind == "dense")
    h = np.where(case["signs"][dense - 1][:300], 1.0, -1.0).reshape(300, -1)
    exact = h @ _binary_weights(layers[dense]).T
    same, negated = np.all(zs[dense] == exact, axis=0), np.all(zs[dense] == -exact, axis=0)
    assert np.all(same | negated)  # per unit: z, or -z for a negative slope


def test_the_frozen_net_is_the_model_in_exact_arithmetic(case, mnist):
    """With float64 thresholds (match_float32=False) the frozen net equals the model run in
    float64, scores to 1e-9."""
    x = mnist[0][:300]
    frozen = deploy.freeze(case["model"], match_float32=False, input_shape=(1, 28, 28))
    scores64, signs64, _ = _model_outputs(case["model"], x, dtype=np.float64)
    got = frozen.scores(x, backend="numba")
    np.testing.assert_array_equal(got.argmax(axis=1), scores64.argmax(axis=1))
    np.testing.assert_allclose(got, scores64, rtol=1e-9, atol=1e-9 * np.abs(scores64).max())
    for b, s in zip(frozen.activations(x, backend="numba"), signs64):
        np.testing.assert_array_equal(b, s)


def test_numpy_equals_numba_bit_for_bit(case, mnist):
    frozen, x = case["frozen"], mnist[0][:200]
    for a, b in zip(frozen.trace(x, backend="numpy"), frozen.trace(x, backend="numba")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(frozen.integer_scores(x, backend="numpy", batch_size=37),
                                  frozen.integer_scores(x, backend="numba"))


@pytest.mark.gpu
@pytest.mark.parametrize("gpu", backend_params(["cupy"]))
def test_cupy_equals_numba_bit_for_bit(case, gpu, mnist):
    frozen, x = case["frozen"], mnist[0][:2000]
    for a, b in zip(frozen.trace(x[:500], backend=gpu), frozen.trace(x[:500], backend="numba")):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(frozen.activations(x[:500], backend=gpu),
                    frozen.activations(x[:500], backend="numba")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(frozen.integer_scores(x, backend=gpu, batch_size=700),
                                  frozen.integer_scores(x, backend="numba"))


@pytest.mark.gpu
@pytest.mark.parametrize("gpu", backend_params(["cupy"]))
def test_cupy_float16_first_layer_equals_numba_bit_for_bit(case, gpu, mnist):
    """The conv first layer on float16 tensor cores (cublasGemmEx, opt-in): the same integer
    pre-activations, bits and scores as numba's bit planes."""
    frozen, x = case["frozen"], mnist[0][:700]
    trace = frozen.trace(x[:200], backend="numba")
    scores = frozen.integer_scores(x, backend="numba")
    previous = frozen.first_layer_method
    try:
        frozen.first_layer_method = "float16"  # (on the GPU only: numba refuses it)
        for a, b in zip(frozen.trace(x[:200], backend=gpu), trace):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(frozen.integer_scores(x, backend=gpu, batch_size=300),
                                      scores)
        assert frozen._first_plans[gpu].method == "float16"
    finally:
        frozen.first_layer_method = previous


@pytest.mark.slow
@pytest.mark.parametrize("name", backend_params(["numba"]))
def test_planted_convnet_equals_the_model_on_all_test_images(name, mnist):
    test_x, _, train_x = mnist
    model = _planted_convnet(train_x)
    frozen = deploy.freeze(model)
    scores, _, _ = _model_outputs(model, test_x)
    got = frozen.scores(test_x, backend=name)
    assert got.shape == (10000, 10)
    np.testing.assert_array_equal(got.argmax(axis=1), scores.argmax(axis=1))
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-5 * np.abs(scores).max())


@pytest.fixture(scope="module")
def trained(mnist):
    """A small mnist_convnet trained for one epoch on 5,000 images (train_epoch, Adam,
    squared hinge), as a user would before freezing it."""
    m = data.load_mnist()
    rng = np.random.default_rng(0)
    model = models.mnist_convnet(channels=(8, 16), hidden=64, rng=rng)
    opt = registry.lookup("optimizer", "adam")(model.parameters(), lr=3e-3)
    loss = registry.lookup("loss", "squared-hinge")
    x, y = _nchw(m.train_images[:5000]), m.train_labels[:5000].astype(np.int64)
    # numba is the fast CPU path for the numpy run; any other backend trains on itself (the
    # model's arrays were made on it, and a GPU model cannot train on a CPU backend)
    with backend.use("numba" if backend.active() == "numpy" else backend.active()):
        T.train_epoch(model, opt, loss, x, y, 100, rng)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", backend_params())
def test_trained_convnet_equals_the_model_on_all_test_images(trained, name, mnist):
    test_x, labels, _ = mnist
    frozen = deploy.freeze(trained)
    scores, _, _ = _model_outputs(trained, test_x)
    got = frozen.predict(test_x, backend=name)
    assert got.shape == (10000,) and got.dtype == np.int64
    np.testing.assert_array_equal(got, scores.argmax(axis=1))
    assert np.mean(got == labels) > 0.6  # it learned something (about 0.79 here)


# ---------------------------------------------------------------------------- the inputs

def test_inputs_accepted_and_refused(case, mnist):
    frozen, x = case["frozen"], mnist[0][:40]
    want = frozen.predict(x, backend="numba")
    np.testing.assert_array_equal(frozen.predict(x[:, None], backend="numba"), want)
    np.testing.assert_array_equal(frozen.predict(x, backend="numba", batch_size=7), want)
    assert frozen.input_shape == (1, 28, 28) and frozen.in_features == 784
    assert frozen.predict(x[:0]).shape == (0,) and frozen.scores(x[:0]).shape == (0, 10)
    with pytest.raises(TypeError, match="uint8"):
        frozen.predict(_nchw(x))
    with pytest.raises(ValueError, match=r"\(n, 1, 28, 28\) or \(n, 28, 28\)"):
        frozen.predict(x.reshape(40, -1))
    with pytest.raises(ValueError, match="shape"):
        frozen.predict(x[:, :27])
    with pytest.raises(ValueError, match="batch_size"):
        frozen.predict(x, batch_size=0)


def test_colour_images_need_their_channels():
    rng = np.random.default_rng(2)
    model = nn.Sequential(nn.BinaryConv2d(3, 8, 3, padding=1, rng=rng), nn.Sign(),
                          nn.Flatten(), nn.BinaryLinear(8 * 6 * 5, 4, rng=rng)).eval()
    frozen = deploy.freeze(model, input_shape=(3, 6, 5))
    x = rng.integers(0, 256, (9, 3, 6, 5), dtype=np.uint8)
    h = np.where(host(F.conv2d(Tensor(_nchw(x, np.float64)), Tensor(_binary_weights(model[0])),
                               1, 1)) >= 0, 1, -1)
    np.testing.assert_array_equal(frozen.scores(x),
                                  h.reshape(9, -1) @ _binary_weights(model[3]).T)
    with pytest.raises(ValueError, match=r"\(n, 3, 6, 5\), got shape \(9, 6, 5\)"):
        frozen.predict(x[:, 0])


# --------------------------------------------------------------------------- the file

@pytest.fixture(scope="module")
def saved(case, tmp_path_factory):
    path = case["frozen"].save(tmp_path_factory.mktemp("frozen") / f"{case['name']}.npz")
    return case, path


def test_save_load_round_trip(saved, mnist):
    case, path = saved
    frozen, back = case["frozen"], deploy.load(path)
    assert deploy.is_frozen_file(path)
    with np.load(path) as z:
        assert int(z["format_version"]) == 2 and "layer0/correction" not in z.files
    assert repr(back) == repr(frozen) and back.input_shape == frozen.input_shape
    for a, b in zip(frozen.layers, back.layers):
        assert a.kind == b.kind
        np.testing.assert_array_equal(a.weight, b.weight)
        if a.kind == "conv":
            assert (a.in_hwc, a.kernel, a.stride, a.padding, a.pool, a.planes) == (
                b.in_hwc, b.kernel, b.stride, b.padding, b.pool, b.planes)
            np.testing.assert_array_equal(a.negated, b.negated)
            np.testing.assert_array_equal(a.correction, b.correction)
    x = mnist[0][:500]
    np.testing.assert_array_equal(back.scores(x, backend="numba"),
                                  frozen.scores(x, backend="numba"))
    assert back.info["float32_adjusted"] == frozen.info["float32_adjusted"]
    float32_bytes = 4 * sum(p.data.size for p in case["model"].parameters())
    assert path.stat().st_size * 10 < float32_bytes


def test_the_stored_correction_is_binarys(case):
    """FrozenConv computes the padding correction from its packed filters: it equals
    binary.padding_correction of the (negated where frozen so) +-1 filters."""
    from minibnn.binary import padding_correction
    convs = [l for l in case["model"].layers if isinstance(l, nn.BinaryConv2d)]
    for conv, fl in zip(convs, [l for l in case["frozen"].layers if l.kind == "conv"]):
        w = _binary_weights(conv) * np.where(fl.negated, -1, 1).reshape(-1, 1, 1, 1)
        want = padding_correction(w, fl.in_hwc[:2], fl.stride, fl.padding)
        np.testing.assert_array_equal(fl.correction, want)


def _rewrite(src, dst, meta=None, **changes):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    if meta is not None:
        m = json.loads(str(arrays["meta"]))
        meta(m)
        arrays["meta"] = np.array(json.dumps(m))
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(dst, **arrays)
    return dst


def test_damaged_conv_entries_are_refused(saved, tmp_path):
    case, good = saved
    frozen = case["frozen"]
    w1 = frozen.layers[1].weight.copy()
    bits = deploy.runtime.slot_bits(frozen.layers[1].c_in)
    # a padding bit: past the last slot (planted: 9 slots of 8 bits), or inside the first
    # slot after its 24 channels (odd: slots of 64 bits)
    pad_bit = 9 * bits if bits < 64 else 30
    w1[0, pad_bit // 64] |= np.uint64(1) << np.uint64(pad_bit % 64)
    t0 = frozen.layers[0].threshold.copy()
    t0[2] = frozen.layers[0].z_max + 2

    def drop_pool(m):
        m["layers"][1]["pool"] = "two"

    def big_kernel(m):
        m["layers"][0]["kernel"] = [40, 40]

    def no_input_shape(m):
        del m["input_shape"]

    def conv_as_dense(m):
        m["layers"][1]["kind"] = "threshold"

    cases = {
        "padding bit": (dict(**{"layer1/weight": w1}), "layer1/weight has nonzero padding"),
        "weight shape": (dict(**{"layer1/weight": w1[:, :1]}), "layer1/weight"),
        "threshold range": (dict(**{"layer0/threshold": t0}), "layer0/threshold beyond"),
        "threshold dtype": (dict(**{"layer0/threshold": t0.astype(np.int64)}),
                            "layer0/threshold"),
        "negated dtype": (dict(**{"layer2/negated": frozen.layers[2].negated.astype(np.uint8)}),
                          "layer2/negated"),
        "negated missing": (dict(**{"layer2/negated": None}), "layer2/negated"),
        "pool": (dict(meta=drop_pool), "layer 1 pool"),
        "geometry": (dict(meta=big_kernel), "layer0/weight|geometry"),
        "input shape": (dict(meta=no_input_shape), "format version 2.*input_shape"),
        "kind": (dict(meta=conv_as_dense), "layer 1 metadata"),
    }
    for label, (changes, message) in cases.items():
        path = _rewrite(good, tmp_path / f"{label}.npz", **changes)
        with pytest.raises(deploy.FrozenFormatError, match=message):
            deploy.load(path)
    path = _rewrite(good, tmp_path / "v3.npz", format_version=np.array(3))
    with pytest.raises(deploy.FrozenFormatError, match="format version 3; this minibnn reads "
                                                       "versions 1, 2"):
        deploy.load(path)


def test_version_1_mlp_files_still_load(tmp_path, mnist):
    """An MLP file in the version-1 layout, written here by hand, loads and predicts as the
    network it came from; an MLP is still saved as version 1."""
    rng = np.random.default_rng(4)
    model = models.mnist_mlp(hidden=48, layers=2, rng=rng).eval()
    frozen = deploy.freeze(model)
    meta = dict(in_features=784, classes=10, info=dict(float32_adjusted=[0, 0]),
                layers=[dict(k=784, n_out=48, planes=8, kind="threshold"),
                        dict(k=48, n_out=48, planes=1, kind="threshold"),
                        dict(k=48, n_out=10, planes=1, kind="output")])
    arrays = {"format": np.array("minibnn.frozen-bnn"), "format_version": np.array(1),
              "meta": np.array(json.dumps(meta))}
    for i, l in enumerate(frozen.layers):
        arrays[f"layer{i}/weight"] = l.weight
        if l.is_output:
            arrays[f"layer{i}/scale"], arrays[f"layer{i}/offset"] = l.scale, l.offset
        else:
            arrays[f"layer{i}/threshold"] = l.threshold
    np.savez(tmp_path / "v1.npz", **arrays)
    old = deploy.load(tmp_path / "v1.npz")
    x = mnist[0][:300]
    np.testing.assert_array_equal(old.scores(x), frozen.scores(x))
    path = frozen.save(tmp_path / "mlp.npz")
    with np.load(path) as z:
        assert int(z["format_version"]) == 1
        assert set(z.files) == set(arrays)
        assert json.loads(str(z["meta"]))["layers"] == meta["layers"]


# ------------------------------------------------------------------ what freeze refuses

def test_freeze_refuses_what_it_cannot_freeze():
    rng = np.random.default_rng(0)

    def conv(c_in, c_out, **kw):
        return nn.BinaryConv2d(c_in, c_out, 3, padding=1, rng=rng, **kw)

    def head(features):
        return [nn.Flatten(), nn.BinaryLinear(features, 3, binary_input=True, rng=rng)]

    shape = dict(input_shape=(1, 4, 4))
    bad = {
        r"MaxPool2d\) does not follow a BinaryConv2d": [nn.MaxPool2d(2), conv(1, 2), nn.Sign(),
                                                        *head(2 * 2 * 2)],
        r"Conv2d\) where a BinaryConv2d or BinaryLinear": [
            nn.Conv2d(1, 2, 3, padding=1, rng=rng), nn.BatchNorm2d(2), nn.Sign(), *head(32)],
        "MaxPool2d.* after the batch norm": [conv(1, 2), nn.BatchNorm2d(2), nn.MaxPool2d(2),
                                             nn.Sign(), *head(8)],
        "where Sign was expected": [conv(1, 2), nn.BatchNorm2d(2), *head(32)],
        r"layer 2 \(MaxPool2d\) does not follow": [conv(1, 2), nn.Sign(), nn.MaxPool2d(2),
                                                  *head(8)],
        "without a Flatten": [conv(1, 2), nn.Sign(), nn.BinaryLinear(32, 3, rng=rng)],
        "after the Flatten": [conv(1, 2), nn.Sign(), nn.Flatten(), conv(2, 2), nn.Sign(),
                              *head(32)],
        "binary_input=True": [conv(1, 2, binary_input=True), nn.Sign(), *head(32)],
        "takes 2 channels": [conv(1, 3), nn.Sign(), conv(2, 2), nn.Sign(), *head(32)],
        "takes 30 inputs but the convolutions give": [conv(1, 2), nn.Sign(), *head(30)],
        "batch norm has 3 features": [conv(1, 2), nn.BatchNorm2d(3), nn.Sign(), *head(32)],
        "ends in Sign": [conv(1, 2), nn.Sign(), nn.Flatten()],
    }
    for message, layers in bad.items():
        with pytest.raises(ValueError, match="cannot freeze: .*" + message):
            deploy.freeze(nn.Sequential(*layers), **shape)
    good = nn.Sequential(conv(1, 2), nn.Sign(), *head(32))
    with pytest.raises(ValueError, match=r"input_shape: a ConvNet's frozen form depends on the "
                                         r"image size; pass input_shape=\(C, H, W\)"):
        deploy.freeze(good)
    with pytest.raises(ValueError, match="input_shape: .* 3 channels"):
        deploy.freeze(good, input_shape=(3, 4, 4))
    with pytest.raises(ValueError, match="input_shape: expected"):
        deploy.freeze(good, input_shape=(4, 4))
    with pytest.raises(ValueError, match="kernel 3x3 is larger"):
        deploy.freeze(nn.Sequential(nn.BinaryConv2d(1, 2, 3, rng=rng), nn.Sign(), *head(2)),
                      input_shape=(1, 2, 2))
    assert deploy.freeze(good, **shape).input_shape == (1, 4, 4)  # and this one freezes


# ---------------------------------------------------------------------------- summary

def test_summary_lists_conv_layers_with_their_macs():
    model = models.mnist_convnet(channels=(4, 8), hidden=16, rng=np.random.default_rng(0))
    s = summary(model.eval())
    convs = [r for r in s.rows if "BinaryConv2d" in r["layer"]]
    # (C_in, C_out, H_out): 1->4 @28, 4->4 @28, 4->8 @14, 8->8 @14; 3x3 kernels
    geometry = [(1, 4, 28), (4, 4, 28), (4, 8, 14), (8, 8, 14)]
    assert [r["binary_params"] for r in convs] == [9 * ci * co for ci, co, _ in geometry]
    macs = [h * h * 9 * ci * co for ci, co, h in geometry]
    assert convs[0]["float_macs"] == macs[0] and convs[0]["binary_macs"] == 0  # pixels in
    assert [r["binary_macs"] for r in convs[1:]] == macs[1:]
    pools = [r for r in s.rows if "MaxPool2d" in r["layer"]]
    assert [r["output"] for r in pools] == [(4, 14, 14), (8, 7, 7)]
    assert [r["params"] for r in s.rows if "BatchNorm2d" in r["layer"]] == [16, 16, 32, 32]
    assert s.totals["binary_macs"] == sum(macs[1:]) + 8 * 7 * 7 * 16 + 16 * 10
    assert "(-1, 4, 28, 28)" in s and "(-1, 392)" in s

    frozen = deploy.freeze(model)
    fs = summary(frozen)
    assert [r["binary_macs"] for r in fs.rows[:4]] == [8 * macs[0]] + macs[1:]
    assert fs.totals["binary_macs"] == 8 * macs[0] + sum(macs[1:]) + 392 * 16 + 16 * 10
    assert fs.rows[0]["input"] == "8-bit" and fs.rows[1]["input"] == "1-bit"
    assert "max-pool 2" in fs.rows[1]["layer"] and fs.rows[1]["output"] == (4, 14, 14)
    assert fs.totals["binary_params"] == s.totals["binary_params"]

    unsized = models.binary_convnet((4,), (8,), 1, 28)  # no config: the size is unknown
    u = summary(unsized)
    assert "pass input_shape" in u and u.rows[0]["output"] is None
    assert summary(unsized, input_shape=(1, 28, 28)).rows[0]["float_macs"] == 28 * 28 * 9 * 4


@pytest.mark.parametrize("c", [1, 3, 16, 64, 70, 128])
@pytest.mark.parametrize("kh,kw,stride,padding", [(3, 3, 1, 1), (3, 2, 2, 0), (2, 3, 1, 2),
                                                   (1, 1, 1, 0)])
def test_numba_patch_words_equal_the_numpy_gather(c, kh, kw, stride, padding):
    """numba's compiled gather of packed patches (numba_cpu.conv_patch_words) writes the
    words of the NumPy slice copies, for channel counts that divide 64 (slots sharing a
    word) and not (whole words per slot), strides, padding up to the kernel size."""
    from types import SimpleNamespace

    from minibnn.deploy import runtime
    from minibnn.kernels import numba_cpu
    rng = np.random.default_rng(c + 10 * kh + stride)
    n, h, w = 3, 7, 6
    bits = rng.random((n, h, w, c)) < 0.5
    packed = runtime.pack_slots(bits.reshape(n, h, w, 1, c), c).reshape(n, h, w, -1)
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    layer = SimpleNamespace(c_in=c, padding=padding, kernel=(kh, kw), conv_hw=(ho, wo),
                            stride=stride, gemm_k=kh * kw * runtime.slot_bits(c))
    want = runtime.conv_patches(packed, layer, np)
    got = runtime.conv_patches(packed, layer, np, numba_cpu)
    assert got.dtype == np.uint64
    assert got.shape == want.shape == (n * ho * wo, -(-layer.gemm_k // 64))
    np.testing.assert_array_equal(got, want)
